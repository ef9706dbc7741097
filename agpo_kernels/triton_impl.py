"""impl="triton": autograd wiring of the Triton kernels (forward stats, backward grads).

The forward kernel writes O(N) statistics; the backward recomputes logit tiles (see
``triton_fwd`` and ``triton_bwd``). CUDA tensors, or CPU tensors under
``TRITON_INTERPRET=1`` (how the test suite runs every kernel without a GPU).
"""

from __future__ import annotations

import torch

from ._inputs import fail
from .triton_bwd import bwd_grads
from .triton_config import interpreting
from .triton_fwd import fwd_stats

DEFAULT_MEMORY_BUDGET = 128 * 2**20  # bytes for the backward's [N, VS] slab buffer


class _TritonLinearStats(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, temperature, memory_budget):
        inv_t = 1.0 / temperature
        logp, ent, lse, mu = fwd_stats(hidden, weight, bias, targets, inv_t)
        ctx.save_for_backward(hidden, weight, bias, targets, lse, mu,
                              inv_t if isinstance(inv_t, torch.Tensor) else None)
        ctx.inv_t = inv_t
        ctx.memory_budget = memory_budget
        return logp, ent

    @staticmethod
    def backward(ctx, g_logp, g_ent):
        hidden, weight, bias, targets, lse, mu, inv_t_rows = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        if not (need_h or need_w or need_b):
            return None, None, None, None, None, None
        zeros = torch.zeros_like(lse)
        g_lp = zeros if g_logp is None else g_logp.float().contiguous()
        g_h = zeros if g_ent is None else g_ent.float().contiguous()
        dh, dw, db = bwd_grads(
            hidden, weight, bias, targets, inv_t_rows if inv_t_rows is not None else ctx.inv_t,
            lse, mu, g_lp, g_h, need_h=need_h, need_w=need_w, need_b=bool(need_b and bias is not None),
            memory_budget=ctx.memory_budget)
        return dh, dw, db, None, None, None


def linear_stats_triton(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                        targets: torch.Tensor, temperature,
                        memory_budget: int = DEFAULT_MEMORY_BUDGET) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton version of ``linear_stats_torch`` (same signature and results)."""
    if not hidden.is_cuda and not interpreting():
        fail("impl", "'triton' needs CUDA tensors (or TRITON_INTERPRET=1 set before importing "
                     "triton, for the CPU interpreter); use impl='torch' on CPU")
    hidden = hidden.contiguous()
    weight = weight.contiguous()
    bias = bias.contiguous() if bias is not None else None
    if isinstance(temperature, torch.Tensor):
        temperature = temperature.to(torch.float32).contiguous()
    return _TritonLinearStats.apply(hidden, weight, bias, targets.contiguous(), temperature,
                                    int(memory_budget))
