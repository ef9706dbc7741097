"""Float64 eager oracle for the fused loss, written independently of agpo_kernels.

It works on the padded ``[B, T]`` layout directly with a mask, using the textbook
``min(r A, clip(r) A)`` form, so it shares no code path with the library.
"""

import torch


def oracle_stats(hidden, weight, bias, targets, temperature):
    """logp, entropy of targets; hidden [..., D] -> [...]; temperature broadcastable."""
    logits = hidden.double() @ weight.double().t()
    if bias is not None:
        logits = logits + bias.double()
    if isinstance(temperature, torch.Tensor):
        logits = logits / temperature.double().unsqueeze(-1)
    else:
        logits = logits / temperature
    logprobs = torch.log_softmax(logits, dim=-1)
    probs = torch.softmax(logits, dim=-1)
    logp = torch.gather(logprobs, -1, targets.unsqueeze(-1)).squeeze(-1)
    entropy = -(probs * logprobs).sum(-1)
    return logp, entropy


def oracle_loss(hidden, weight, targets, adv, old, mask, *, eps_low, eps_high, temperature,
                ref=None, beta=0.0, kl="k3", ent_coef=0.0, dual_clip=None, agg="token-mean",
                bias=None, max_len=None, kl_ratio_weight=False, is_weight=None, kl_clamp=None,
                count_empty=None, ent_agg=None):
    """Padded layout: hidden [B, T, D]; per-sequence adv/eps/temperature as [B] tensors.

    ``old`` None: on-policy (the current log-prob, detached); ``is_weight`` multiplies
    the clipped surrogate term only; ``kl_clamp`` bounds the per-token KL to [-c, c];
    ``count_empty``: whether all-masked sequences count in the seq-mean divisors (None:
    not for seq-mean-token-mean, yes for seq-mean-token-sum-norm); ``ent_agg``: how the
    entropy bonus is aggregated (None: like the loss, ``agg``)."""
    B, T = targets.shape
    col = lambda v: (v if isinstance(v, torch.Tensor) else torch.full((B,), float(v))).double().reshape(B, 1)
    temp = col(temperature)
    logp, ent = oracle_stats(hidden, weight, bias, targets, temp.expand(B, T))
    A, lo, hi = col(adv), col(eps_low), col(eps_high)
    ratio = torch.exp(logp - (logp.detach() if old is None else old.double()))
    s1 = ratio * A
    s2 = torch.clamp(ratio, 1 - lo, 1 + hi) * A
    surr = torch.min(s1, s2)
    if dual_clip is not None:
        surr = torch.where(A < 0, torch.max(surr, dual_clip * A), surr)
    l = -surr if is_weight is None else -is_weight.double() * surr
    kl_t = torch.zeros_like(logp)
    if ref is not None:
        d = logp - ref.double()
        kl_t = {"k1": d, "k2": 0.5 * d * d, "k3": torch.exp(-d) + d - 1}[kl]
        if kl_clamp is not None:
            kl_t = torch.clamp(kl_t, -kl_clamp, kl_clamp)
        if kl_ratio_weight:
            kl_t = kl_t * ratio
        l = l + beta * kl_t
    m = mask.double()
    nonempty = max(int((m.sum(1) > 0).sum()), 1)

    def aggregate(x, mode):
        if mode == "token-mean":
            return (x * m).sum() / m.sum()
        if mode == "seq-mean-token-mean":
            per = (x * m).sum(1) / m.sum(1).clamp(min=1)
            return per.sum() / (B if count_empty else nonempty)
        return (x * m).sum() / ((max_len or T) * (B if count_empty in (None, True) else nonempty))

    loss = aggregate(l, agg) - ent_coef * aggregate(ent, ent_agg or agg)
    clipped = ((A > 0) & (ratio > 1 + hi)) | ((A < 0) & (ratio < 1 - lo))
    if dual_clip is not None:
        clipped = clipped | ((A < 0) & (torch.min(s1, s2) < dual_clip * A))
    n = m.sum()
    metrics = dict(clip_frac=(clipped.double() * m).sum() / n, ratio_mean=(ratio * m).sum() / n,
                   kl_mean=(kl_t * m).sum() / n, entropy_mean=(ent * m).sum() / n,
                   logp=logp * m, entropy=ent * m)
    return loss, metrics
