"""``linear_logprobs``: token log-probs and entropies straight from hidden states.

For scoring rollouts (old and reference log-probs) and any trainer that needs
``log p(y)`` and the policy entropy without ever holding ``[tokens x vocab]`` logits. Its
backward is the recompute design (the caller's loss on top is arbitrary).
"""

from __future__ import annotations

import torch

from agpo_kernels.chunks import default_memory_budget
from agpo_kernels.dispatch import engine, resolve_impl
from agpo_kernels.inputs import (
    check_bias_values,
    check_compute_dtype,
    check_head,
    fail,
    logprob_rows,
    scatter_rows,
)
from agpo_kernels.partials import shard
from agpo_kernels.precision import no_autocast, resolve_compute_dtype
from agpo_kernels.recompute import linear_stats_recompute
from agpo_kernels.reference import linear_stats_reference


def linear_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                    bias: torch.Tensor | None = None, temperature=1.0, impl: str = "auto",
                    memory_budget: int | None = None, ignore_index: int | None = -100,
                    mask: torch.Tensor | None = None, compute_dtype: torch.dtype | None = None,
                    validate: bool = True, process_group=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-prob of ``targets`` and entropy under ``softmax((hidden @ weight.T + bias) / T)``.

    Args:
        hidden: ``[..., D]`` final hidden states (fp32, bf16 or fp16).
        weight: ``[V, D]`` LM-head weight (or this rank's shard, see ``process_group``).
        targets: ``[...]`` integer token ids in ``[0, V)``, shaped like ``hidden[..., 0]``;
            positions equal to ``ignore_index`` (default -100; None: no such id) are not
            projected at all: their ``logp`` and entropy are 0, with no gradient.
        mask: optional ``[...]``; 0 drops a position the same way.
        bias: optional ``[V]`` LM-head bias; ``-inf`` masks a vocabulary entry (padded or
            banned rows of the head): it is absent from the softmax, its gradient 0.
        temperature: a float > 0, or a tensor broadcastable to ``targets`` (per token, or
            ``[B, 1]`` per sequence).
        impl: "auto" (Triton on a CUDA device where it works, else "torch"), "torch",
            "triton" or "reference".
        memory_budget: bytes of scratch the tiled paths may use (default as in ``agpo_loss``).
        compute_dtype: dtype of the GEMMs (default: autocast's when on, else hidden's); a
            bf16 hidden with fp32 weights runs in bf16, gradients in each input's dtype.
        validate: check ids and temperatures and drop ignored positions before the
            projection (host syncs). False: no host sync; every position is projected and
            ignored ones are zeroed afterwards (their hidden states must be finite).
        process_group: vocabulary-parallel head (see ``agpo_loss``).

    Returns:
        ``(logp, entropy)``: fp32 tensors shaped like ``targets``, differentiable with
        respect to hidden, weight and bias.
    """
    check_head(hidden, weight, bias)
    check_compute_dtype(compute_dtype)
    v_off, vocab = shard(process_group, weight.shape[0])
    rows = logprob_rows(hidden, targets, mask=mask, ignore_index=ignore_index, temperature=temperature,
                        vocab=vocab, validate=validate)
    if validate:
        check_bias_values(bias, rows.targets, rows.index, rows.out_shape, v_off, process_group)
    impl = resolve_impl(impl, hidden.device)
    if impl == "reference" and process_group is not None:
        fail("process_group", "impl='reference' does not shard the vocabulary; use 'torch' or 'triton'")
    if memory_budget is None:
        budget = default_memory_budget(hidden.device, rows.hidden.shape[0], weight.shape[0], weight.shape[1])
    else:
        budget = int(memory_budget)
    if budget <= 0:
        fail("memory_budget", f"must be > 0 bytes, got {memory_budget}")
    cd = resolve_compute_dtype(hidden, compute_dtype)
    with no_autocast(hidden.device):
        h, w = rows.hidden.to(cd), weight.to(cd)
        b = None if bias is None else bias.to(cd)
        if impl == "reference":
            logp, ent = linear_stats_reference(h, w, b, rows.targets, rows.temperature)
        else:
            logp, ent = linear_stats_recompute(h, w, b, rows.targets, rows.temperature, engine=engine(impl),
                                               memory_budget=budget, process_group=process_group)
    return (scatter_rows(logp, rows.index, rows.keep, rows.out_shape),
            scatter_rows(ent, rows.index, rows.keep, rows.out_shape))
