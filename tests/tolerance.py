"""Tolerances for comparing two float computations that differ only in rounding.

Two correct implementations of one sum (another summation order, another BLAS kernel,
another vector width, another thread count, micro-batches instead of one batch, two ranks
instead of one process) agree to within the rounding error of that sum, not bit for bit.
A sum of ``n`` fp32 terms computed in any order is off by at most about
``n * eps * sum|terms|`` (worst case) and typically ``sqrt(n) * eps * sum|terms|``. We do
not know ``sum|terms|`` for every gradient entry, but every entry of one tensor is made of
terms of the same scale, so the tensor's largest entry stands in for it: the comparison
is ``max|a - b| <= eps * sqrt(n) * SAFETY * max|b|`` per tensor. That holds on every
machine (it bounds rounding, not one machine's rounding) and still catches a real bug
(a wrong weight, a dropped micro-batch, a missing rank), which is off by O(1) of the
tensor's scale.
"""

from __future__ import annotations

import math

import torch

SAFETY = 8.0
"""Margin over the typical ``sqrt(n)`` growth: rounding errors of a few chained sums
(forward, backward, accumulation) add up."""


def rounding_tol(dtype: torch.dtype, n_reduce: int, safety: float = SAFETY) -> float:
    """Relative tolerance (to a tensor's scale) of results of ``n_reduce``-term sums in
    ``dtype``: ``eps(dtype) * sqrt(n_reduce) * safety``."""
    return torch.finfo(dtype).eps * math.sqrt(max(n_reduce, 1)) * safety


def assert_close_scaled(actual: dict, expected: dict, *, dtype: torch.dtype, n_reduce: int,
                        safety: float = SAFETY, what: str = "") -> float:
    """Every tensor of ``actual`` equals ``expected``'s to ``rounding_tol`` times that
    tensor's largest magnitude; returns the worst relative error seen (for reports)."""
    assert actual.keys() == expected.keys(), sorted(set(actual) ^ set(expected))
    tol = rounding_tol(dtype, n_reduce, safety)
    worst = 0.0
    for name, want in expected.items():
        got = actual[name].detach().double().cpu()
        want = want.detach().double().cpu()
        scale = float(want.abs().max()) if want.numel() else 0.0
        err = float((got - want).abs().max()) if want.numel() else 0.0
        if scale == 0.0:
            assert err == 0.0, f"{what}{name}: expected all zeros, max |diff| {err:.3g}"
            continue
        worst = max(worst, err / scale)
        assert err <= tol * scale, (f"{what}{name}: max |diff| {err:.3g} > {tol:.3g} x scale {scale:.3g} "
                                    f"(rounding bound for {n_reduce}-term {dtype} sums)")
    return worst


def assert_same_update(actual: dict, expected: dict, start: dict, *, rel: float, what: str = "") -> float:
    """Two runs that should take the same AdamW steps moved the weights alike: the
    difference of their updates ``actual - start`` and ``expected - start`` is at most
    ``rel`` of the update's norm, over all tensors together.

    Entry by entry the runs may differ by up to ``lr`` per step: AdamW's
    ``lr * m / (sqrt(v) + eps)`` turns rounding-level gradient entries (an entry that is
    zero in exact arithmetic, such as a key-projection bias) into steps of a sizeable
    fraction of ``lr`` whose sign is rounding noise. Such entries are few, so they carry a
    negligible share of the whole update's norm, while a run that computed other
    gradients (a dropped rank, a wrong batch) differs by O(1) of it. Returns the measured
    relative difference."""
    assert actual.keys() == expected.keys() and actual.keys() <= start.keys(), sorted(set(actual) ^ set(expected))
    diff = upd = 0.0
    for name, want in expected.items():
        w0 = start[name].double()
        da, db = actual[name].double() - w0, want.double() - w0
        diff += float((da - db).pow(2).sum())
        upd += float(db.pow(2).sum())
    assert upd > 0, f"{what}the weights did not move"
    measured = (diff / upd) ** 0.5
    assert measured <= rel, f"{what}updates differ by {measured:.3g} of their norm (> {rel})"
    return measured
