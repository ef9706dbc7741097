"""The step's metric helpers: which metric keys depend on the machine or count verifier
calls, and the per-group statistics a step logs: token means per group (the clip
controller's entropy, the step KL), a controller output's spread over the groups, the
share of groups pinned at a controller's clamp (a controller there has stopped responding),
and the per-group rows of ``--dump-groups`` (what the controllers saw and chose).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

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


GROUPS_FILE = "groups.jsonl"
"""``--dump-groups``: one JSON row per step and group, in the run directory."""


def group_rows(step: int, train_rewards: torch.Tensor, tau: torch.Tensor, eps: torch.Tensor, keep: torch.Tensor,
               probe_rewards: torch.Tensor | None, stats, trained: torch.Tensor | None = None) -> list[dict]:
    """One row per prompt of a step: its train group's pass count (rewards > 0; None when the
    prompt got no train group), the probe's, the statistics the controllers read (reward
    dispersion ``sigma``, skew ``k``, vote entropy ``E``: the probe's, or the train group's
    with ``--clip-from-train``; None without either), its tau and eps (None: not trained).
    ``train_rewards`` are the groups ``keep`` marks; ``trained`` (default ``keep``) marks
    those the update learned from, whose ``eps`` these are (``--filter-groups`` drops some)."""
    trained = keep if trained is None else trained
    sampled = {p: i for i, p in enumerate(keep.nonzero().view(-1).tolist())}
    where = {p: i for i, p in enumerate(trained.nonzero().view(-1).tolist())}
    rows = []
    for p in range(keep.shape[0]):
        i, j = sampled.get(p), where.get(p)
        row = {"step": step, "group": p, "train_pass": None if i is None else int((train_rewards[i] > 0).sum()),
               "train_size": int(train_rewards.shape[1]),
               "probe_pass": None if probe_rewards is None else int((probe_rewards[p] > 0).sum()),
               "sigma": None, "k": None, "E": None, "tau": float(tau[p]),
               "eps": None if j is None else float(eps[j]), "trained": j is not None}
        if stats is not None:
            row.update(sigma=stats.sigma[p], k=stats.skew[p], E=stats.entropy[p])
        rows.append({k: _plain(v) for k, v in row.items()})
    return rows


def _plain(v):
    """A dump value as strict JSON takes it: finite floats to 6 significant digits, else None."""
    if isinstance(v, float):
        return float(f"{v:.6g}") if math.isfinite(v) else None
    return v


def keep_group_rows(path: Path, upto: int) -> None:
    """Keep the rows of a ``groups.jsonl`` with ``step <= upto`` (a resumed run writes the
    later steps again); rewritten whole, as ``metrics.jsonl`` is."""
    if not path.is_file():
        return
    rows = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= upto:
                rows.append(line)
        except (ValueError, KeyError, TypeError):  # a line cut short by a kill: written again
            continue
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(r + "\n" for r in rows))
    tmp.replace(path)

