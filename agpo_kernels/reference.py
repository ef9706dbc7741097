"""Naive eager implementation (impl="reference"): full ``[N, V]`` logits, plain autograd.

It is what a trainer without fused kernels does, kept as the oracle the fast paths are
compared with and as the "eager" baseline of the benchmarks. Logits are formed in the
input dtype like any eager model head, then upcast to fp32 for the softmax. A ``-inf``
bias column (a masked vocabulary entry) is absent: probability 0, no entropy term, zero
gradient.
"""

from __future__ import annotations

import torch


def linear_stats_reference(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                           targets: torch.Tensor, temperature) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row ``(logp, entropy)`` in fp32 for ``hidden [N, D]``, ``targets [N]``.

    ``temperature`` is a float or an fp32 ``[N]`` tensor.
    """
    logits = hidden @ weight.t()
    if bias is not None:
        logits = logits + bias
    z = logits.float()
    if isinstance(temperature, torch.Tensor):
        z = z / temperature.unsqueeze(-1)
    elif temperature != 1.0:
        z = z / temperature
    logprobs = torch.log_softmax(z, dim=-1)
    logp = logprobs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    # A column masked by a -inf bias has p = 0 and log p = -inf: it adds nothing to the
    # entropy, and the clamp keeps 0 * -inf (NaN, in the value and in its gradient) out. At
    # -1e4 it changes nothing else (exp(-1e4) is 0 in fp32 and fp64) and keeps an upstream
    # gradient times the clamped value finite.
    entropy = -(logprobs.exp() * logprobs.clamp(min=-1.0e4)).sum(-1)
    return logp, entropy
