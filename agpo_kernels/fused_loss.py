"""The forward-gradient design of ``agpo_loss``: 6NDV, gradients formed during the forward.

``agpo_loss`` returns a scalar and its objective is separable per token (the aggregation
weights depend only on the mask and lengths, known up front), so its gradient can be
formed in the forward call (as Liger's chunked losses do). Per chunk of ``C`` rows:

1. ``x = h_c W^T`` into an fp32 ``[C, V]`` buffer           2 C D V   (one GEMM)
2. one row pass: statistics, the AGPO epilogue (loss, ``g_lp``, ``g_H``, metric terms per
   position) and ``dL/dlogits`` written over ``x`` in the compute dtype
3. ``dh[chunk] = dz W``                                     2 C D V   (one GEMM, complete)
4. ``dW += dz^T h_c`` (addmm, beta = 1), ``db += sum dz``    2 C D V

The backward only scales the stored gradients by ``grad_output`` (in place). Extra memory:
the chunk buffer (``memory_budget``) plus ``[6, M]`` fp32 per-position outputs; the
gradients are the ones returned. Gradients are formed only for inputs that need them
(a frozen head skips step 4; a hidden state without grad skips step 3; no grad mode
skips both and the ``dz`` write).
"""

from __future__ import annotations

import torch

from agpo_kernels.chunks import HeadGrads, HiddenRows, rows_per_chunk
from agpo_kernels.inputs import refuse_double_backward
from agpo_kernels.partials import shard


def forward_gradient(hidden, weight, bias, rows, opts, *, engine, compute_dtype, memory_budget, process_group,
                     need_h: bool, need_w: bool, need_b: bool):
    """Runs steps 1-4 over all rows; returns ``(out [6, M], (dh, dW, db))``.

    ``out`` rows: weighted loss, logp, entropy, clipped, ratio, kl per position (0 where a
    position does not count).
    """
    V, D = weight.shape
    v_off, _ = shard(process_group, V)
    w_cd = weight if weight.dtype == compute_dtype else weight.to(compute_dtype)
    if w_cd.stride(-1) != 1:  # the Triton GEMMs read W rows with unit stride: one copy per call
        w_cd = w_cd.contiguous()
    bias32 = None if bias is None else bias.float().contiguous()  # read with unit stride by the row kernel
    src = HiddenRows(hidden, rows.index)
    head = HeadGrads(src, weight, bias, w_cd, need_h=need_h, need_w=need_w, need_b=need_b)
    need_grad = head.any
    N = rows.n_rows
    c = rows_per_chunk(N, engine.bytes_per_row(V, D, compute_dtype), memory_budget)
    bufs = [torch.empty(c, V, dtype=torch.float32, device=hidden.device)
            for _ in range(getattr(engine, "BUFFERS", 1))]
    out = torch.zeros(6, rows.targets.numel(), dtype=torch.float32, device=hidden.device)
    for r0 in range(0, N, c):
        r1 = min(N, r0 + c)
        x, e = bufs[0][: r1 - r0], bufs[-1][: r1 - r0]
        h_c = src.get(r0, r1, compute_dtype)
        engine.logits(h_c, w_cd, x)
        dz = engine.loss_chunk(x, e, rows, r0, r1, opts, bias32, v_off, process_group, out, need_grad,
                               compute_dtype)
        if need_grad:
            head.add_chunk(dz, h_c, r0, r1)
    return out, head.finish(process_group)


class _ForwardGradientLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, run):
        out, grads = run(hidden, weight, bias)
        ctx.grads = grads
        ctx.set_materialize_grads(False)  # the metric outputs get no gradient tensors
        sums = out.sum(1)
        ctx.mark_non_differentiable(sums, out)
        return sums[0].clone(), sums, out

    @staticmethod
    def backward(ctx, g_loss, g_sums, g_out):
        refuse_double_backward("agpo_loss")
        if ctx.grads is None:
            raise RuntimeError("agpo_loss: backward ran twice through one call (retain_graph=True); the "
                               "gradients are formed in the forward and handed out once. Call agpo_loss "
                               "again, or use backward='recompute'")
        grads, ctx.grads = ctx.grads, None
        for g in grads:
            if g is not None:
                if g_loss is None:
                    g.zero_()
                else:
                    g.mul_(g_loss)
        return grads[0], grads[1], grads[2], None


def fused_agpo_loss(hidden, weight, bias, rows, opts, *, engine, compute_dtype, memory_budget, process_group):
    """``(loss, sums [6], out [6, M])``: the differentiable loss, then the detached
    per-position outputs (see ``forward_gradient``) and their sums."""
    grad_on = torch.is_grad_enabled()
    need = [grad_on and t is not None and t.requires_grad for t in (hidden, weight, bias)]

    def run(h, w, b):
        return forward_gradient(h, w, b, rows, opts, engine=engine, compute_dtype=compute_dtype,
                                memory_budget=memory_budget, process_group=process_group,
                                need_h=need[0], need_w=need[1], need_b=need[2])

    return _ForwardGradientLoss.apply(hidden, weight, bias, run)
