"""The statistics of scripts/evidence.py: a run's held-out accuracy at a token count, its area
under the curve, whether it collapsed, and the paired comparison of two arms over seeds (t
interval, exact or sampled sign-flip p, the smallest effect the design detects)."""

from __future__ import annotations

import math
import random
import statistics

COLLAPSE_DROP = 0.10
"""Collapse (fixed before the runs): an evaluation this far below the run's best earlier one,
or a final accuracy below the accuracy before RL."""


def at_tokens(curve: list[tuple[int, float]], t: float) -> float:
    """The accuracy at ``t`` tokens, linear between evaluations (the last one past the end)."""
    for (t0, a0), (t1, a1) in zip(curve, curve[1:]):
        if t0 <= t <= t1:
            return a0 if t1 == t0 else a0 + (a1 - a0) * (t - t0) / (t1 - t0)
    return curve[-1][1]


def auc(curve: list[tuple[int, float]], budget: float) -> float:
    """Mean accuracy over the run's first ``budget`` tokens (the area under its curve, on 41
    equally spaced points): less noisy than any single evaluation."""
    return statistics.mean(at_tokens(curve, budget * i / 40) for i in range(41))


def collapsed(curve: list[tuple[int, float]]) -> bool:
    """Whether a held-out curve collapsed, by ``COLLAPSE_DROP``'s rule."""
    accs = [a for _, a in curve]
    drop = any(a < max(accs[:i]) - COLLAPSE_DROP for i, a in enumerate(accs) if i)
    return drop or accs[-1] < accs[0]


T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
       11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120, 17: 2.110, 18: 2.101, 19: 2.093, 20: 2.086}
"""Two-sided 95% quantiles of Student's t by degrees of freedom."""
T80 = {1: 1.376, 2: 1.061, 3: 0.978, 4: 0.941, 5: 0.920, 6: 0.906, 7: 0.896, 8: 0.889, 9: 0.883, 10: 0.879,
       11: 0.876, 12: 0.873, 13: 0.870, 14: 0.868, 15: 0.866, 16: 0.865, 17: 0.863, 18: 0.862, 19: 0.861, 20: 0.860}
"""One-sided 80% quantiles of Student's t by degrees of freedom (the power of ``detectable``)."""


def paired(diffs: list[float], rounds: int = 20000) -> dict:
    """Mean, 95% t interval and two-sided sign-flip permutation p of paired differences."""
    n = len(diffs)
    mean = sum(diffs) / n
    if n < 2:
        return {"n": n, "mean": mean, "lo": math.nan, "hi": math.nan, "p": math.nan}
    half = T95.get(n - 1, 1.96) * statistics.stdev(diffs) / math.sqrt(n)
    observed = abs(sum(diffs)) - 1e-12
    if n <= 16:  # every sign pattern: the exact p
        hits = sum(abs(sum(d if (k >> i) & 1 else -d for i, d in enumerate(diffs))) >= observed for k in range(2 ** n))
        p = hits / 2 ** n
    else:  # sampled patterns, the observed one counted (never p = 0)
        rng = random.Random(0)
        hits = sum(abs(sum(rng.choice((1, -1)) * d for d in diffs)) >= observed for _ in range(rounds))
        p = (hits + 1) / (rounds + 1)
    sd = statistics.stdev(diffs)
    # the smallest true mean difference a design of n paired seeds with this spread finds at
    # 5% two-sided with 80% power (normal approximation with t quantiles)
    detectable = (T95.get(n - 1, 1.96) + T80.get(n - 1, 0.842)) * sd / math.sqrt(n)
    return {"n": n, "mean": mean, "lo": mean - half, "hi": mean + half, "p": p, "sd": sd, "detectable": detectable}
