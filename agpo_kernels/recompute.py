"""The recompute design: a differentiable map ``(h, W, b, y, T) -> (logp, H)``.

The forward keeps O(N) statistics (``lse``, ``H``) and no logits; the backward, given any
upstream ``g_lp = dL/dlogp`` and ``g_H = dL/dH``, recomputes each chunk's logits and
forms the gradients (8NDV of matmul work with the forward, against 6NDV for the
forward-gradient design). It serves ``linear_logprobs`` (whose caller's backward is
arbitrary) and ``agpo_loss(backward="recompute")``.

Vocabulary parallel (``process_group``): the forward all-gathers per-row partials, the
backward all-reduces ``dh``; ``dW``/``db`` stay local to each rank's shard.
"""

from __future__ import annotations

import torch

from agpo_kernels.inputs import refuse_double_backward
from agpo_kernels.partials import gather_partials, merge_partials, shard


class _RecomputeStats(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, temperature, engine, memory_budget, process_group):
        v_off, _ = shard(process_group, weight.shape[0])
        y_local = targets - v_off if v_off else targets
        inv_t = 1.0 / temperature
        part = engine.partials(hidden, weight, bias, y_local, inv_t, memory_budget)
        lse, ent, zy = merge_partials(gather_partials(part, process_group))
        ctx.save_for_backward(hidden, weight, bias, y_local, lse, ent,
                              inv_t if isinstance(inv_t, torch.Tensor) else None)
        ctx.inv_t, ctx.engine, ctx.budget, ctx.group = inv_t, engine, memory_budget, process_group
        return zy - lse, ent

    @staticmethod
    def backward(ctx, g_logp, g_ent):
        refuse_double_backward("linear_logprobs / agpo_loss(backward='recompute')")
        hidden, weight, bias, y_local, lse, ent, inv_t_rows = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        if not (need_h or need_w or need_b):
            return (None,) * 8
        zeros = torch.zeros_like(lse)
        g_lp = zeros if g_logp is None else g_logp.float()
        g_h = zeros if g_ent is None else g_ent.float()
        dh, dw, db = ctx.engine.grads(
            hidden, weight, bias, y_local, inv_t_rows if inv_t_rows is not None else ctx.inv_t, lse, lse - ent,
            g_lp, g_h, need_h=need_h, need_w=need_w, need_b=bool(need_b and bias is not None),
            memory_budget=ctx.budget, process_group=ctx.group)
        return dh, dw, db, None, None, None, None, None


def linear_stats_recompute(hidden, weight, bias, targets, temperature, *, engine, memory_budget: int,
                           process_group=None):
    """Per-row fp32 ``(logp, entropy)``; ``hidden [N, D]`` and ``weight`` in one dtype,
    ``targets [N]`` full-vocabulary ids, ``temperature`` a float or fp32 ``[N]``."""
    if hidden.shape[0] == 0:  # nothing to project; keep the graph connected for zero grads
        anchor = hidden.float().sum() * 0 + weight.float().sum() * 0
        if bias is not None:
            anchor = anchor + bias.float().sum() * 0
        empty = anchor + torch.zeros(0, device=hidden.device)
        return empty, empty
    return _RecomputeStats.apply(hidden, weight, bias, targets, temperature, engine, int(memory_budget),
                                 process_group)
