"""impl="torch": the tiled pure-PyTorch engine of both designs (runs anywhere, CPU included).

Same math as the Triton kernels (docs/algorithm.md#the-policy-loss), organised for bounded memory: rows in
chunks over the whole vocabulary, a chunk's fp32 logits ``[c, V]`` from one GEMM
(``precision.logits``), then the row passes of ``torch_engine.rows`` in place and, for gradients,
the chunk GEMMs of ``chunks.HeadGrads``. Two fp32 ``[c, V]`` buffers at most, sized by
``memory_budget``.

* ``partials`` / ``grads``: forward statistics and recomputed backward of the recompute
  design (``recompute.py``).
* ``loss_chunk``: one chunk of the forward-gradient design (``fused_loss.py``): statistics,
  the closed-form AGPO epilogue (``epilogue.py``) and ``dL/dlogits``.
"""

from __future__ import annotations

import torch

from agpo_kernels.chunks import HeadGrads, HiddenRows, rows_per_chunk
from agpo_kernels.epilogue import agpo_epilogue
from agpo_kernels.partials import gather_partials, merge_partials
from agpo_kernels.precision import mm_f32
from agpo_kernels.torch_engine.rows import grad_, prepare_, stats_

BUFFERS = 2  # fp32 [c, V] buffers alive at once


def bytes_per_row(vocab: int, dim: int, dtype: torch.dtype) -> int:
    """Scratch per chunk row: the fp32 buffers, plus the row's hidden and dh in ``dtype``."""
    return BUFFERS * 4 * vocab + 2 * dim * torch.empty((), dtype=dtype).element_size()


def logits(h_c: torch.Tensor, weight: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    return mm_f32(h_c, weight.t(), out)


def _as_dtype(x: torch.Tensor, e: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x`` (fp32) in ``dtype``, written into ``e``'s storage when a cast is needed."""
    if dtype == torch.float32:
        return x
    out = e.view(dtype)[:, : x.shape[1]]
    out.copy_(x)
    return out


def partials(hidden, weight, bias, targets, inv_t, memory_budget) -> torch.Tensor:
    """``[4, 1, N]`` statistics (m, s, a, zy) of this vocabulary shard; ``targets`` local ids."""
    N, D = hidden.shape
    V = weight.shape[0]
    c = rows_per_chunk(N, bytes_per_row(V, D, hidden.dtype), memory_budget)
    bufs = [torch.empty(c, V, dtype=torch.float32, device=hidden.device) for _ in range(BUFFERS)]
    b32 = None if bias is None else bias.float()
    out = torch.empty(4, 1, N, dtype=torch.float32, device=hidden.device)
    for r0 in range(0, N, c):
        r1 = min(N, r0 + c)
        x, e = bufs[0][: r1 - r0], bufs[1][: r1 - r0]
        logits(hidden[r0:r1], weight, x)
        prepare_(x, b32, inv_t[r0:r1] if isinstance(inv_t, torch.Tensor) else inv_t)
        out[:, :, r0:r1] = stats_(x, e, targets[r0:r1])
    return out


def grads(hidden, weight, bias, targets, inv_t, lse, mu, g_lp, g_h, *, need_h, need_w, need_b,
          memory_budget, process_group=None):
    """``(dh, dW, db)`` of the recompute design, logits recomputed chunk by chunk."""
    N, D = hidden.shape
    V = weight.shape[0]
    c = rows_per_chunk(N, bytes_per_row(V, D, hidden.dtype), memory_budget)
    bufs = [torch.empty(c, V, dtype=torch.float32, device=hidden.device) for _ in range(BUFFERS)]
    b32 = None if bias is None else bias.float()
    head = HeadGrads(HiddenRows(hidden, None), weight, bias, weight, need_h=need_h, need_w=need_w, need_b=need_b)
    for r0 in range(0, N, c):
        r1 = min(N, r0 + c)
        x, e = bufs[0][: r1 - r0], bufs[1][: r1 - r0]
        it = inv_t[r0:r1] if isinstance(inv_t, torch.Tensor) else inv_t
        logits(hidden[r0:r1], weight, x)
        prepare_(x, b32, it)
        grad_(x, e, None, lse[r0:r1], mu[r0:r1], g_lp[r0:r1], g_h[r0:r1], targets[r0:r1], it)
        head.add_chunk(_as_dtype(x, e, hidden.dtype), hidden[r0:r1], r0, r1)
    return head.finish(process_group)


def loss_chunk(x, e, rows, r0, r1, opts, bias32, v_off, process_group, out, need_grad, dtype):
    """Forward-gradient design, rows ``[r0, r1)`` with logits in ``x``: writes the
    per-position outputs into ``out [6, M]``; returns ``dz`` in ``dtype`` (or None)."""
    pos = rows.row_positions(r0, r1)
    seq = rows.seq[pos]
    it = rows.inv_t[seq] if isinstance(rows.inv_t, torch.Tensor) else rows.inv_t
    y_local = rows.targets[pos] - v_off
    prepare_(x, bias32, it)
    part = stats_(x, e, y_local)
    m_local = part[0, 0].clone()
    lse, ent, zy = merge_partials(gather_partials(part, process_group))
    logp = zy - lse
    take = (lambda t: None if t is None else t[pos])
    keep = take(rows.keep)
    loss, g_lp, g_h, clipped, ratio, kl = agpo_epilogue(
        logp, ent, old=take(rows.old), ref=take(rows.ref), isw=take(rows.isw), adv=rows.adv[seq],
        eps_low=rows.eps_low[seq], eps_high=rows.eps_high[seq], weight=rows.wseq[seq],
        weight_ent=rows.wseq_ent[seq], keep=keep, opts=opts)
    if keep is not None:
        kept = keep != 0
        logp, ent = torch.where(kept, logp, 0.0), torch.where(kept, ent, 0.0)
    out[:, pos] = torch.stack([loss, logp, ent, clipped, ratio, kl])
    if not need_grad:
        return None
    grad_(x, e, m_local, lse, lse - ent, g_lp, g_h, y_local, it)
    if keep is not None:
        x.masked_fill_((keep == 0).unsqueeze(1), 0.0)
    return _as_dtype(x, e, dtype)
