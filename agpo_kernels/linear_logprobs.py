"""``linear_logprobs``: token log-probs and entropies straight from hidden states.

For scoring rollouts (old and reference log-probs) and any trainer that needs
``log p(y)`` and the policy entropy without ever holding ``[tokens x vocab]`` logits.
"""

from __future__ import annotations

import torch

from ._inputs import check_head, check_targets, fail, temperature_rows
from .dispatch import linear_stats


def linear_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                    bias: torch.Tensor | None = None, temperature=1.0, impl: str = "auto",
                    memory_budget: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-prob of ``targets`` and entropy under ``softmax((hidden @ weight.T + bias) / T)``.

    Args:
        hidden: ``[..., D]`` final hidden states (fp32, bf16 or fp16).
        weight: ``[V, D]`` LM-head weight, same dtype as ``hidden``.
        targets: ``[...]`` integer token ids in ``[0, V)``, shaped like ``hidden[..., 0]``.
        bias: optional ``[V]`` LM-head bias.
        temperature: a float > 0, or a tensor broadcastable to ``targets`` (per token, or
            ``[B, 1]`` per sequence).
        impl: "auto" (Triton on CUDA, else "torch"), "torch", "triton" or "reference".
        memory_budget: bytes of scratch the tiled paths may use (None: their default).

    Returns:
        ``(logp, entropy)``: fp32 tensors shaped like ``targets``, differentiable with
        respect to hidden, weight and bias.
    """
    check_head(hidden, weight, bias)
    if not isinstance(targets, torch.Tensor) or tuple(targets.shape) != tuple(hidden.shape[:-1]):
        fail("targets", f"expected shape {tuple(hidden.shape[:-1])} (hidden without its last dim), "
                        f"got {tuple(getattr(targets, 'shape', ()))}")
    if targets.numel() == 0:
        fail("hidden", "empty input: no tokens")
    targets = check_targets(targets, weight.shape[0])
    temp = temperature_rows(temperature, targets.shape, hidden.device)
    if isinstance(temp, torch.Tensor):
        temp = temp.reshape(-1).contiguous()
    logp, ent = linear_stats(hidden.reshape(-1, hidden.shape[-1]), weight, bias, targets.reshape(-1),
                             temp, impl=impl, memory_budget=memory_budget)
    return logp.reshape(targets.shape), ent.reshape(targets.shape)
