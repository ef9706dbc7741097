"""The per-token AGPO objective on top of log-probs and entropies (SPEC section 2).

Every implementation produces per-token ``logp`` and entropy ``H`` with a differentiable
fused projection; the clipped surrogate, the KL estimator, the entropy bonus and the
aggregation are O(N) elementwise work written here once. Autograd through this function
yields exactly the two per-token gradient scalars of the SPEC (``g_lp = dloss/dlogp``,
``g_H = dloss/dH``) that the fused backward passes consume, so the heavy
``[N x V]`` work never depends on which options are set.
"""

from __future__ import annotations

import torch

from ._inputs import KL_ESTIMATORS, fail


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

    Returns ``(surr, ratio, clipped)``; ``clipped`` marks tokens whose gradient is cut by
    the trust region (or the dual clip).
    """
    ratio = torch.exp(logp - old_logp)
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


def agpo_objective(logp, entropy, flat, *, beta, kl_estimator, entropy_coef, dual_clip,
                   kl_ratio_weight=False):
    """Loss ``sum_t w_t * l_tok_t`` and detached scalar metrics from per-token logp/H.

    ``kl_ratio_weight`` multiplies the per-token KL by the importance ratio (the
    off-policy correction of DeepSeek-V3.2, TRL's ``use_bias_correction_kl``).

    ``flat`` is the per-token view built by ``_inputs.flatten_loss_inputs``; options are
    checked there, before any projection work.
    """
    surr, ratio, clipped = clipped_surrogate(logp, flat.old_logp, flat.adv, flat.eps_low,
                                             flat.eps_high, dual_clip)
    if flat.is_weight is not None:  # truncated importance sampling: scales the surrogate only
        surr = surr * flat.is_weight
    l_tok = -surr
    kl = None
    if flat.ref_logp is not None:
        kl = kl_penalty(logp, flat.ref_logp, kl_estimator)
        if kl_ratio_weight:
            kl = kl * ratio
        if beta:
            l_tok = l_tok + beta * kl
    if entropy_coef:
        l_tok = l_tok - entropy_coef * entropy
    loss = (flat.weight * l_tok).sum()

    n = max(logp.numel(), 1)
    with torch.no_grad():
        zero = logp.new_zeros(())
        metrics = {
            "clip_frac": clipped.float().sum() / n,
            "ratio_mean": ratio.sum() / n if logp.numel() else zero,
            "kl_mean": kl.sum() / n if kl is not None else zero,
            "entropy_mean": entropy.sum() / n,
        }
    return loss, metrics
