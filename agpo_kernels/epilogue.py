"""The AGPO epilogue in closed form: per-token loss and its two gradient scalars.

From a row's ``logp`` and entropy ``H`` (and its old/reference log-probs, importance
weight, advantage, clip range and aggregation weight ``w``) this computes, with no
autograd (docs/algorithm.md#gradients):

    ratio = exp(logp - old)                  (old = None: on-policy, ratio 1, d ratio = ratio)
    surr  = min(ratio A, clip(ratio) A)       d surr / d logp = ratio A, or 0 where clipped
            dual clip (A < 0): max(surr, c A) d = 0 where it binds
    kl    = k1 d | k2 d^2/2 | k3 e^-d + d - 1  with d = logp - ref; dkl = 1 | d | 1 - e^-d
            kl_clamp c: clamp(kl, -c, c),      dkl = 0 where it binds
            kl_ratio_weight: kl * ratio,       dkl * ratio + kl * ratio (ratio not detached)
    l     = -isw surr + beta kl
    loss_row = w l - w_H ent_coef H,  g_lp = w (-isw dsurr + beta dkl),  g_H = -w_H ent_coef
            (w_H: the entropy bonus's aggregation weight, w unless ``entropy_agg`` differs)

It is the torch twin of ``triton_engine.epilogue.agpo_epilogue`` and is tested, like it, against
autograd through ``surrogate.agpo_objective`` in float64.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class LossOptions:
    """The loss options one call is built for (compile-time flags of the Triton epilogue)."""

    beta: float = 0.0
    kl_estimator: str = "k3"
    entropy_coef: float = 0.0
    dual_clip: float | None = None
    kl_ratio_weight: bool = False
    kl_clamp: float | None = None

    @property
    def kl_code(self) -> int:
        return {"k1": 1, "k2": 2, "k3": 3}[self.kl_estimator]


def agpo_epilogue(logp, ent, *, old, ref, isw, adv, eps_low, eps_high, weight, weight_ent, keep,
                  opts: LossOptions):
    """Per row ``[c]`` fp32: ``(loss_row, g_lp, g_H, clipped, ratio, kl)``; rows with
    ``keep == 0`` get zeros everywhere (``where``, so garbage in them cannot leak)."""
    ratio = torch.exp(logp - old) if old is not None else torch.ones_like(logp)
    clipped = ((adv > 0) & (ratio > 1.0 + eps_high)) | ((adv < 0) & (ratio < 1.0 - eps_low))
    bound = torch.where(adv > 0, 1.0 + eps_high, 1.0 - eps_low)
    surr = torch.where(clipped, bound * adv, ratio * adv)
    dsurr = torch.where(clipped, torch.zeros_like(ratio), ratio * adv)
    if opts.dual_clip is not None:
        dual = (adv < 0) & (surr < opts.dual_clip * adv)
        surr = torch.where(dual, opts.dual_clip * adv, surr)
        dsurr = torch.where(dual, torch.zeros_like(dsurr), dsurr)
        clipped = clipped | dual
    if isw is not None:
        surr, dsurr = isw * surr, isw * dsurr
    loss, g_lp = -surr, -dsurr
    kl = torch.zeros_like(logp)
    if ref is not None:
        d = logp - ref
        if opts.kl_estimator == "k1":
            kl, dkl = d, torch.ones_like(d)
        elif opts.kl_estimator == "k2":
            kl, dkl = 0.5 * d * d, d
        else:
            e = torch.exp(-d)
            kl, dkl = e + d - 1.0, 1.0 - e
        if opts.kl_clamp is not None:
            cut = kl.abs() > opts.kl_clamp
            kl, dkl = kl.clamp(-opts.kl_clamp, opts.kl_clamp), torch.where(cut, torch.zeros_like(dkl), dkl)
        if opts.kl_ratio_weight:
            kl, dkl = kl * ratio, (dkl + kl) * ratio
        if opts.beta:
            loss, g_lp = loss + opts.beta * kl, g_lp + opts.beta * dkl
    g_h = -opts.entropy_coef * weight_ent  # the entropy bonus, aggregated by its own weight
    out = [weight * loss + g_h * ent, weight * g_lp, g_h, clipped.to(logp.dtype), ratio, kl]
    if keep is not None:
        kept = keep != 0
        out = [torch.where(kept, t, torch.zeros_like(t)) for t in out]
    return tuple(out)
