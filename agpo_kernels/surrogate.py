"""The per-token AGPO objective on top of log-probs and entropies (docs/algorithm.md#the-policy-loss), by autograd.

The O(N) reference formulation: plain differentiable torch on ``[N]`` vectors. It is what
``impl="reference"`` and the recompute design (``backward="recompute"``) run, and the
oracle that the closed-form epilogues (``epilogue.py``, ``triton_engine/epilogue.py``) of the
forward-gradient design are tested against: autograd through this function yields the two
per-token gradient scalars ``g_lp = dloss/dlogp`` and ``g_H = dloss/dH``.
"""

from __future__ import annotations

import torch

from agpo_kernels.inputs import KL_ESTIMATORS, fail


def kl_penalty(logp: torch.Tensor, ref_logp: torch.Tensor, estimator: str) -> torch.Tensor:
    """Per-token KL(pi || pi_ref) estimate from sampled tokens (k1, k2 or k3)."""
    if estimator == "k1":
        return logp - ref_logp
    if estimator == "k2":
        return 0.5 * (logp - ref_logp) ** 2
    if estimator == "k3":
        d = ref_logp - logp
        return torch.exp(d) - d - 1.0
    fail("kl_estimator", f"unknown {estimator!r}; choose one of {', '.join(KL_ESTIMATORS)}")


def clipped_surrogate(logp, old_logp, adv, eps_low, eps_high, dual_clip=None):
    """PPO/GRPO surrogate ``min(r A, clip(r, 1-eps_low, 1+eps_high) A)`` (+ dual clip).

    ``old_logp`` None: on-policy, the ratio is ``exp(logp - logp.detach())`` (1, with the
    gradient of ``logp``). Returns ``(surr, ratio, clipped)``; ``clipped`` marks tokens
    whose gradient is cut by the trust region (or the dual clip).
    """
    ratio = torch.exp(logp - (logp.detach() if old_logp is None else old_logp))
    # The clamped branch is the minimum exactly when the ratio leaves the trust region on
    # the side the advantage pushes towards; there its gradient is zero.
    clipped = ((adv > 0) & (ratio > 1.0 + eps_high)) | ((adv < 0) & (ratio < 1.0 - eps_low))
    bound = torch.where(adv > 0, 1.0 + eps_high, 1.0 - eps_low)
    surr = torch.where(clipped, bound * adv, ratio * adv)
    if dual_clip is not None:
        dual = (adv < 0) & (surr < dual_clip * adv)
        surr = torch.where(dual, dual_clip * adv, surr)
        clipped = clipped | dual
    return surr, ratio, clipped


def agpo_objective(logp, entropy, rows: dict, opts, n_tokens):
    """Loss ``sum_t w_t * l_tok_t`` and detached scalar metrics from per-row logp/H.

    ``rows``: per-row ``old``, ``ref``, ``isw``, ``keep``, ``adv``, ``eps_low``,
    ``eps_high``, ``weight`` (see ``LossRows.per_row``); ``opts``: ``epilogue.LossOptions``;
    ``n_tokens``: the number of tokens that count (metric denominators).
    ``l_tok = -isw * surr + beta * kl - entropy_coef * H``; ``kl_clamp`` clamps the
    per-token KL to ``[-c, c]``; ``kl_ratio_weight`` multiplies it by the importance ratio,
    differentiated through (DeepSeek-V3.2's off-policy correction, TRL's
    ``use_bias_correction_kl``: the ratio is not detached).
    """
    keep = rows["keep"]
    old, ref, isw = rows["old"], rows["ref"], rows["isw"]
    if keep is not None:  # masked rows (validate=False) were projected but must not count,
        kept = keep != 0  # nor leak NaN/inf from whatever they hold into the gradients
        logp, entropy = (torch.where(kept, t, torch.zeros_like(t)) for t in (logp, entropy))
        old, ref, isw = (None if t is None else torch.where(kept, t, torch.zeros_like(t)) for t in (old, ref, isw))
    surr, ratio, clipped = clipped_surrogate(logp, old, rows["adv"], rows["eps_low"], rows["eps_high"],
                                             opts.dual_clip)
    if isw is not None:
        surr = isw * surr
    l_tok = -surr
    kl = None
    if ref is not None:
        kl = kl_penalty(logp, ref, opts.kl_estimator)
        if opts.kl_clamp is not None:  # verl's and OpenRLHF's +-10: no gradient where it binds
            kl = kl.clamp(-opts.kl_clamp, opts.kl_clamp)
        if opts.kl_ratio_weight:
            kl = kl * ratio
        if opts.beta:
            l_tok = l_tok + opts.beta * kl
    w = rows["weight"] if keep is None else rows["weight"] * keep
    loss = (w * l_tok).sum()
    if opts.entropy_coef:  # the bonus, aggregated by its own weight (entropy_agg)
        w_h = rows["weight_ent"] if keep is None else rows["weight_ent"] * keep
        loss = loss - opts.entropy_coef * (w_h * entropy).sum()

    n = n_tokens.clamp(min=1.0)
    with torch.no_grad():
        def total(x):
            x = x.float()
            return (torch.where(keep != 0, x, torch.zeros_like(x)) if keep is not None else x).sum()
        metrics = {
            "clip_frac": total(clipped) / n,
            "ratio_mean": total(ratio) / n,
            "kl_mean": total(kl) / n if kl is not None else logp.new_zeros(()),
            "entropy_mean": total(entropy) / n,
        }
    return loss, metrics
