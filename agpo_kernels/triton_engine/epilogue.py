"""The AGPO epilogue as a ``@triton.jit`` helper (inlined into the row kernel).

Closed forms of ``epilogue.agpo_epilogue`` (the torch twin; the formulas are in its
docstring): per row, from ``logp`` and ``H``, the weighted loss, ``g_lp = dL/dlogp``,
``g_H = dL/dH`` and the metric terms. Options are compile-time flags, so a build carries
only the terms it uses; the runtime scalars are the advantage, the clip range and the
aggregation weight of the row's sequence (the adaptive per-sequence eps of AGPO), the old
and reference log-probs and the importance weight.
"""

import triton
import triton.language as tl


@triton.jit
def agpo_epilogue(
    logp, ent,                  # fp32 row statistics
    old, ref, isw,              # fp32 (read only when HAS_OLD / HAS_REF / HAS_ISW)
    adv, e_lo, e_hi, w, w_h,    # fp32 advantage, clip range, aggregation weights (loss, entropy bonus)
    beta, ent_coef, dual_c, kl_c,  # fp32 runtime scalars
    HAS_OLD: tl.constexpr, HAS_REF: tl.constexpr, HAS_ISW: tl.constexpr, KL: tl.constexpr,
    KL_IN_LOSS: tl.constexpr, KL_RATIO: tl.constexpr, DUAL: tl.constexpr, KL_CLAMP: tl.constexpr,
):
    if HAS_OLD:
        ratio = tl.exp(logp - old)
    else:  # on-policy: old = logp detached, ratio 1 with d ratio / d logp = ratio
        ratio = logp * 0.0 + 1.0
    clipped = ((adv > 0) & (ratio > 1.0 + e_hi)) | ((adv < 0) & (ratio < 1.0 - e_lo))
    bound = tl.where(adv > 0, 1.0 + e_hi, 1.0 - e_lo)
    surr = tl.where(clipped, bound * adv, ratio * adv)
    dsurr = tl.where(clipped, 0.0, ratio * adv)
    if DUAL:
        dual = (adv < 0) & (surr < dual_c * adv)
        surr = tl.where(dual, dual_c * adv, surr)
        dsurr = tl.where(dual, 0.0, dsurr)
        clipped = clipped | dual
    if HAS_ISW:
        surr = isw * surr
        dsurr = isw * dsurr
    loss = -surr
    g_lp = -dsurr
    kl = logp * 0.0
    if HAS_REF:
        d = logp - ref
        if KL == 1:
            kl = d
            dkl = d * 0.0 + 1.0
        elif KL == 2:
            kl = 0.5 * d * d
            dkl = d
        else:
            e = tl.exp(-d)
            kl = e + d - 1.0
            dkl = 1.0 - e
        if KL_CLAMP:
            cut = tl.abs(kl) > kl_c
            kl = tl.minimum(tl.maximum(kl, -kl_c), kl_c)
            dkl = tl.where(cut, 0.0, dkl)
        if KL_RATIO:
            dkl = (dkl + kl) * ratio
            kl = kl * ratio
        if KL_IN_LOSS:
            loss = loss + beta * kl
            g_lp = g_lp + beta * dkl
    g_h = -ent_coef * w_h
    return w * loss + g_h * ent, w * g_lp, g_h, clipped.to(tl.float32), ratio, kl
