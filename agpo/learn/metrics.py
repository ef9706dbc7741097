"""The step's metric helpers: which metric keys depend on the machine or count verifier
calls, and the per-group statistics a step logs: token means per group (the clip
controller's entropy, the step KL), a controller output's spread over the groups, and the
share of groups pinned at a controller's clamp (a controller there has stopped responding).
"""

from __future__ import annotations

import torch

TIME_KEYS = ("time/", "perf/")
"""Metric prefixes that depend on the machine's speed (left out of reproducibility checks)."""
VERIFIER_KEYS = ("calls", "timeouts", "errors", "oversized", "unavailable")
"""math-verify counters logged per step as ``verifier/<key>`` (summed over ranks)."""


def verifier_delta(after: dict, before: dict) -> dict:
    """The math-verify counters (``VERIFIER_KEYS``) counted between two snapshots of them."""
    return {k: after[k] - before[k] for k in VERIFIER_KEYS}


def group_token_mean(values: torch.Tensor, mask: torch.Tensor, group_size: int) -> torch.Tensor:
    """Token-mean of ``values [R, C]`` over each group's masked tokens -> ``[R // G]``."""
    m = mask.float()
    num = (values * m).sum(1).view(-1, group_size).sum(1)
    den = m.sum(1).view(-1, group_size).sum(1).clamp(min=1)
    return num / den


def group_stats(prefix: str, t: torch.Tensor) -> dict[str, float]:
    """Mean, spread and range of a per-group controller output over the step's groups."""
    t = t.double()
    sd = float(t.std()) if t.numel() > 1 else 0.0
    return {f"{prefix}/mean": float(t.mean()), f"{prefix}/sd": sd, f"{prefix}/min": float(t.min()),
            f"{prefix}/max": float(t.max())}


def clamp_shares(tau: torch.Tensor, eps: torch.Tensor, c) -> dict[str, float]:
    """Share of the step's groups whose tau / eps sits at a clamp of its controller (``c``:
    the ``ControllerConfig``)."""
    at = lambda t, v: float((t.double() - v).abs().le(1e-6 * max(1.0, abs(v))).double().mean())
    return {"tau/at_max": at(tau, c.tau_max), "tau/at_min": at(tau, c.tau_min),
            "eps/at_max": at(eps, c.eps_max), "eps/at_min": at(eps, c.eps_min)}
