"""``agpo_loss`` / ``AGPOLoss``: the fused AGPO policy loss from hidden states.

LM-head projection, token log-prob, entropy, KL to a reference and the clipped surrogate
with per-sequence adaptive eps and temperature, without ``[tokens x vocab]`` logits
(SPEC section 2). Padded (``[B, T, D]`` + mask) and packed (``[N, D]`` + ``cu_seqlens``)
layouts; masked tokens are never projected.
"""

from __future__ import annotations

import torch
from torch import nn

from ._inputs import check_head, flatten_loss_inputs, scatter_tokens
from .dispatch import linear_stats
from .surrogate import agpo_objective


def agpo_loss(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
              advantages, old_logp: torch.Tensor, *, mask: torch.Tensor | None = None,
              cu_seqlens: torch.Tensor | None = None, eps_low=0.2, eps_high=None,
              temperature=1.0, ref_logp: torch.Tensor | None = None, beta: float = 0.0,
              kl_estimator: str = "k3", entropy_coef: float = 0.0, dual_clip: float | None = None,
              loss_agg: str = "token-mean", bias: torch.Tensor | None = None, impl: str = "auto",
              max_len: int | None = None, memory_budget: int | None = None,
              kl_ratio_weight: bool = False, is_weight: torch.Tensor | None = None):
    """AGPO / GRPO clipped policy loss computed from hidden states.

    Args:
        hidden: ``[B, T, D]`` (padded) or ``[N, D]`` with ``cu_seqlens`` (packed).
        weight: ``[V, D]`` LM-head weight (same dtype as hidden); ``bias``: optional ``[V]``.
        targets: token ids ``[B, T]`` or ``[N]``: the sampled response tokens.
        advantages: per-sequence ``[B]`` / ``[S]`` (a float broadcasts).
        old_logp: ``[B, T]`` / ``[N]`` log-probs of the behaviour policy (at the same
            temperature); ``ref_logp`` likewise for the reference policy (needed if beta > 0).
        mask: ``[B, T]`` / ``[N]``; 0 drops a token (prompt, padding).
        is_weight: optional ``[B, T]`` / ``[N]`` (like old_logp) detached importance weight
            >= 0 that multiplies each token's clipped surrogate only (not the KL or the
            entropy term), e.g. truncated importance sampling of a rollout engine whose
            log-probs differ from the trainer's. None: 1.
        cu_seqlens: int32 ``[S+1]`` sequence boundaries of the packed layout.
        eps_low, eps_high: clip range, a float or a per-sequence tensor (eps_high None:
            equal to eps_low).
        temperature: a float or a per-sequence tensor; logits are divided by it.
        beta, kl_estimator: weight and estimator ("k1", "k2", "k3") of the reference KL;
            ``kl_ratio_weight=True`` multiplies each token's KL by its importance ratio
            (off-policy bias correction, TRL's ``use_bias_correction_kl``).
        entropy_coef: weight of the entropy bonus; dual_clip: c > 1 caps the loss of
            negative-advantage tokens at ``-c A`` (None: off).
        loss_agg: "token-mean", "seq-mean-token-mean" or "seq-mean-token-sum-norm"
            (Dr. GRPO, normalised by ``max_len``: default the padded length, or the
            longest packed sequence).
        impl: "auto", "torch", "triton" or "reference".

    Returns:
        ``(loss, metrics)``: a scalar loss (differentiable with respect to hidden, weight
        and bias) and a dict with detached per-token ``logp`` and ``entropy`` (shaped like
        targets, 0 where masked) and scalars ``clip_frac``, ``ratio_mean``, ``kl_mean``,
        ``entropy_mean`` (means over unmasked tokens).
    """
    check_head(hidden, weight, bias)
    flat = flatten_loss_inputs(hidden, weight, targets, advantages, old_logp, mask=mask,
                               cu_seqlens=cu_seqlens, eps_low=eps_low, eps_high=eps_high,
                               temperature=temperature, ref_logp=ref_logp, beta=beta,
                               loss_agg=loss_agg, kl_estimator=kl_estimator,
                               dual_clip=dual_clip, max_len=max_len, is_weight=is_weight)
    logp, ent = linear_stats(flat.hidden, weight, bias, flat.targets, flat.temperature,
                             impl=impl, memory_budget=memory_budget)
    loss, metrics = agpo_objective(logp, ent, flat, beta=beta, kl_estimator=kl_estimator,
                                   entropy_coef=entropy_coef, dual_clip=dual_clip,
                                   kl_ratio_weight=kl_ratio_weight)
    metrics["logp"] = scatter_tokens(logp.detach(), flat.index, flat.out_shape)
    metrics["entropy"] = scatter_tokens(ent.detach(), flat.index, flat.out_shape)
    return loss, metrics


class AGPOLoss(nn.Module):
    """Holds the loss options; ``forward`` takes the per-batch tensors.

    Per-call ``eps_low``, ``eps_high`` and ``temperature`` (e.g. the adaptive
    controllers' per-group tensors) override the module's defaults.
    """

    def __init__(self, *, eps_low=0.2, eps_high=None, beta: float = 0.0, kl_estimator: str = "k3",
                 entropy_coef: float = 0.0, dual_clip: float | None = None,
                 loss_agg: str = "token-mean", temperature=1.0, impl: str = "auto",
                 max_len: int | None = None, memory_budget: int | None = None,
                 kl_ratio_weight: bool = False):
        super().__init__()
        self.options = dict(eps_low=eps_low, eps_high=eps_high, beta=beta, kl_estimator=kl_estimator,
                            entropy_coef=entropy_coef, dual_clip=dual_clip, loss_agg=loss_agg,
                            temperature=temperature, impl=impl, max_len=max_len,
                            memory_budget=memory_budget, kl_ratio_weight=kl_ratio_weight)

    def forward(self, hidden, weight, targets, advantages, old_logp, *, mask=None, cu_seqlens=None,
                ref_logp=None, bias=None, is_weight=None, **overrides):
        unknown = set(overrides) - set(self.options)
        if unknown:
            raise TypeError(f"AGPOLoss.forward got unknown options {sorted(unknown)}")
        opts = {**self.options, **overrides}
        return agpo_loss(hidden, weight, targets, advantages, old_logp, mask=mask,
                         cu_seqlens=cu_seqlens, ref_logp=ref_logp, bias=bias, is_weight=is_weight, **opts)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.options.items() if not isinstance(v, torch.Tensor))
