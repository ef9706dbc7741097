"""The ``"agpo"`` advantage estimator for verl: agpo's group advantages per uid.

verl hands an estimator the token-level rewards ``[B, T]``, the response mask and the group
index (the prompt's ``uid`` per row); this one takes each row's outcome reward (the sum of its
token-level rewards), forms ``agpo.algo.stats.group_advantages`` over the rows of each uid
(``(r - mean) / max(std, floor)``, all-equal groups 0; docs/algorithm.md#advantages) and
spreads it over the row's response tokens. Returns ``(advantages, returns)`` as verl's
outcome estimators do (returns = advantages). The dispersion and floor: the AGPO trainer's
(its ``agpo.controller``, set around verl's advantage step with ``settings``); else
``algorithm.agpo`` in the config when given (``dispersion``, ``adv_floor``: the estimator used
alone); else agpo's defaults.
"""

from __future__ import annotations

import contextlib
import contextvars

import torch
from verl.trainer.ppo.core_algos import register_adv_est

from agpo.algo.controllers import ControllerConfig
from agpo.algo.stats import group_advantages


_SETTINGS: contextvars.ContextVar = contextvars.ContextVar("agpo_advantage_settings", default=None)


@contextlib.contextmanager
def settings(dispersion: str, adv_floor: float):
    """The estimator's dispersion and floor inside the block (the AGPO trainer's controller's)."""
    token = _SETTINGS.set((str(dispersion), float(adv_floor)))
    try:
        yield
    finally:
        _SETTINGS.reset(token)


def _settings(config) -> tuple[str, float]:
    if _SETTINGS.get() is not None:
        return _SETTINGS.get()
    default = ControllerConfig()
    block = None
    if config is not None:
        block = config.get("agpo", None) if hasattr(config, "get") else getattr(config, "agpo", None)
    block = block or {}
    return str(block.get("dispersion", default.dispersion)), float(block.get("adv_floor", default.adv_floor))


@register_adv_est("agpo")
def agpo_advantage(token_level_rewards: torch.Tensor, response_mask: torch.Tensor, index, config=None, **kwargs):
    """``(advantages, returns)`` ``[B, T]``: agpo's group advantages per uid (module docstring)."""
    kind, floor = _settings(config)
    scores = token_level_rewards.sum(dim=-1).double()
    adv = torch.zeros_like(scores)
    groups: dict = {}
    for row, uid in enumerate(index.tolist() if hasattr(index, "tolist") else list(index)):
        groups.setdefault(uid, []).append(row)
    for rows in groups.values():
        at = torch.tensor(rows, device=scores.device)
        adv[at] = group_advantages(scores[at].view(1, -1), kind, floor).view(-1).to(adv.dtype)
    out = adv.to(token_level_rewards.dtype).unsqueeze(-1) * response_mask
    return out, out
