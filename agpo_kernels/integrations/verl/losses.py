"""The ``"agpo"`` policy loss for verl, and the whole-loss replacement that gives it a clip
range per row.

``agpo_policy_loss`` has verl's ``PolicyLossFn`` signature and is registered as ``"agpo"``:
``agpo_kernels.surrogate.clipped_surrogate`` on verl's per-token log-probs, aggregated by
verl's ``agg_loss`` with the global-batch information verl puts in the config. Its defaults
follow the verl config it is given, so switching ``loss_mode`` from ``vanilla`` to ``agpo``
changes nothing else: the clip range from ``clip_ratio_low``/``clip_ratio_high`` (or
``clip_ratio``), the dual clip from ``clip_ratio_c`` (verl's default 3.0; agpo's own default is
no dual clip). One difference is kept: verl clamps the log-ratio to +-20 before the
exponential, agpo does not (the two agree wherever the ratio is within e^+-20).

A registered loss sees only ``old_log_probs``, ``advantages``, ``response_mask`` and the
importance weights, never a per-row eps. ``agpo_ppo_loss`` (install it with the actor
worker's ``set_loss_fn``) reads the micro-batch's per-row ``agpo_eps`` ``[B]`` and then runs
verl's own ``ppo_loss``, whose policy loss, ``"agpo"``, picks the per-row eps up; entropy
bonus, KL (verl's k3 clamps each token's KL to +-10: ``agpo_loss(kl_clamp=10)`` is the same
loss), importance weights, aggregation and metrics stay verl's.
"""

from __future__ import annotations

import contextvars

import torch
from verl.trainer.ppo.core_algos import agg_loss, register_policy_loss
from verl.utils.torch_functional import masked_mean
from verl.workers.utils.losses import ppo_loss

from agpo_kernels.surrogate import clipped_surrogate

ROW_EPS_KEY = "agpo_eps"
"""The batch field with each row's clip range ``[B]`` (``eps_low = eps_high``), or ``[B, 2]``."""
_ROW_EPS: contextvars.ContextVar = contextvars.ContextVar("agpo_row_eps", default=None)


def _clip_range(config, rows: int, device):
    """``(eps_low, eps_high)``: the rows' own (``agpo_ppo_loss``) as ``[B, 1]``, else the config's."""
    eps = _ROW_EPS.get()
    if eps is not None:
        eps = eps.to(device=device, dtype=torch.float32)
        if eps.shape[0] != rows:
            raise ValueError(f"{ROW_EPS_KEY}: {eps.shape[0]} rows for a micro-batch of {rows}")
        if eps.dim() == 1:
            return eps[:, None], eps[:, None]
        return eps[:, :1], eps[:, 1:2]
    base = config.clip_ratio
    low = config.clip_ratio_low if config.clip_ratio_low is not None else base
    high = config.clip_ratio_high if config.clip_ratio_high is not None else base
    return low, high


@register_policy_loss("agpo")
def agpo_policy_loss(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode: str = "token-mean",
                     config=None, rollout_is_weights=None):
    """verl's ``PolicyLossFn``: ``(loss, metrics)`` of the clipped surrogate (module docstring)."""
    if config is None:
        raise ValueError("config: the 'agpo' policy loss reads the clip range from verl's actor config")
    eps_low, eps_high = _clip_range(config, log_prob.shape[0], log_prob.device)
    dual = config.get("clip_ratio_c", 3.0)
    # the trust region, then the dual clip apart: verl reports where each binds
    surr, ratio, region = clipped_surrogate(log_prob, old_log_prob, advantages, eps_low, eps_high)
    lower = (advantages < 0) & (surr < dual * advantages)
    surr = torch.where(lower, dual * advantages, surr)
    losses = -surr if rollout_is_weights is None else -surr * rollout_is_weights
    loss = agg_loss(loss_mat=losses, loss_mask=response_mask, loss_agg_mode=loss_agg_mode, **config.global_batch_info)
    with torch.no_grad():
        metrics = {"actor/pg_clipfrac": masked_mean(region.float(), response_mask).item(),
                   "actor/ppo_kl": masked_mean(old_log_prob - log_prob, response_mask).item(),
                   "actor/pg_clipfrac_lower": masked_mean(lower.float(), response_mask).item()}
    return loss, metrics


def agpo_ppo_loss(config, model_output, data, dp_group=None):
    """verl's ``ppo_loss`` with each row's clip range from the batch's ``agpo_eps``; install
    with ``actor_rollout_wg.set_loss_fn(functools.partial(agpo_ppo_loss, config=actor_config))``
    and ``actor.policy_loss.loss_mode=agpo``."""
    mode = config.policy_loss.get("loss_mode", "vanilla")
    if mode != "agpo":
        raise ValueError(f"actor.policy_loss.loss_mode: {mode!r}; agpo_ppo_loss's per-row clip range reaches "
                         "only the 'agpo' policy loss: set loss_mode=agpo")
    eps = data[ROW_EPS_KEY] if ROW_EPS_KEY in data.keys() else None
    token = _ROW_EPS.set(eps)
    try:
        return ppo_loss(config, model_output, data, dp_group)
    finally:
        _ROW_EPS.reset(token)
