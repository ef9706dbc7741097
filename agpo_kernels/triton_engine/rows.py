"""Triton row pass of the forward-gradient design: statistics, AGPO epilogue and the logit
gradient of one chunk's rows, in one launch over its fp32 logits.

A program owns ``BLOCK_R`` rows (1 on a GPU, more under the CPU interpreter) and walks
their ``V`` logits twice, ``BLOCK_V`` columns at a time:

1. statistics (running max ``m``, ``s = sum e^(z-m)``, ``a = sum e^(z-m)(z-m)``, target
   logit), with bias and ``1/T`` applied on the fly; then ``lse``, ``H``, ``logp``;
2. the epilogue (``triton_engine.epilogue.agpo_epilogue``: loss, ``g_lp``, ``g_H``, metric
   terms, written per position into ``out [6, M]``);
3. ``dz = (g_lp (1[j=y] - p) - g_H p (z - mu)) / T`` written over the logits in place, in
   the compute dtype: a 16-bit ``dz`` row occupies the first half of its own fp32 row
   (bf16 column ``j`` lands in fp32 column ``j/2 <= j``, already read by this program:
   columns go in increasing order, and a barrier between a tile's loads and its stores
   orders the warps of the program), so the buffer is reused and rows never overlap
   each other's.

With a vocabulary-parallel head the pass splits at the merge: ``_row_partials_kernel``
writes this shard's partials, the launcher all-gathers and merges them, and
``_loss_rows_kernel`` (``MERGED``) runs steps 2 and 3 from the merged statistics.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from agpo_kernels.partials import gather_partials, merge_partials
from agpo_kernels.triton_engine.config import NEG_BIG, round_bf16_stores, rows_config
from agpo_kernels.triton_engine.epilogue import agpo_epilogue
from agpo_kernels.triton_engine.tile import online_softmax_step, round_bf16


@triton.jit
def _row_stats(x_rows, b_ptr, V, y, it, row_ok, HAS_BIAS: tl.constexpr, BLOCK_R: tl.constexpr,
               BLOCK_V: tl.constexpr):
    """Streaming (m, s, a, zy) ``[BLOCK_R]`` of the rows' scaled logits ``z = (x + b) * it``;
    ``x_rows [BLOCK_R]`` are row base pointers."""
    offs = tl.arange(0, BLOCK_V)
    m = tl.zeros([BLOCK_R], dtype=tl.float32) + NEG_BIG
    s = tl.zeros([BLOCK_R], dtype=tl.float32)
    a = tl.zeros([BLOCK_R], dtype=tl.float32)
    zy = tl.zeros([BLOCK_R], dtype=tl.float32)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + offs
        col_ok = cols < V
        x = tl.load(x_rows[:, None] + cols[None, :], mask=row_ok[:, None] & col_ok[None, :], other=0.0)
        if HAS_BIAS:
            x += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        z = tl.where(col_ok[None, :], x * it[:, None], NEG_BIG)
        if HAS_BIAS:  # a -inf bias masks its column: absent (NEG_BIG); NaN stays NaN
            z = tl.where(z < NEG_BIG, NEG_BIG, z)
        m, s, a, zy = online_softmax_step(m, s, a, zy, z, cols, col_ok, y)
    return m, s, a, zy


@triton.jit
def _rows_of(row0, n_rows, idx_ptr, HAS_INDEX: tl.constexpr, BLOCK_R: tl.constexpr):
    """This program's chunk rows, their mask, and their positions in the caller's layout."""
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = r < n_rows
    if HAS_INDEX:
        src = tl.load(idx_ptr + row0 + r, mask=row_ok, other=0)
    else:
        src = (row0 + r).to(tl.int64)
    return r, row_ok, src


@triton.jit
def _row_partials_kernel(
    x_ptr,        # [C, V] fp32 logits of this rank's vocabulary shard (row stride stride_x)
    b_ptr,        # [V] bias shard (if HAS_BIAS)
    idx_ptr,      # [N] int64 position of each projected row (if HAS_INDEX)
    y_ptr,        # [M] int64 target ids (full vocabulary)
    seq_ptr,      # [M] int64 sequence of each position
    invt_ptr,     # [S] fp32 1/temperature (if SEQ_TEMP)
    part_ptr,     # [4, C] fp32 out: m, s, a, zy of this shard
    row0, n_rows, V, v_off, stride_x, inv_t,
    HAS_BIAS: tl.constexpr, SEQ_TEMP: tl.constexpr, HAS_INDEX: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    r, row_ok, src = _rows_of(row0, n_rows, idx_ptr, HAS_INDEX, BLOCK_R)
    if SEQ_TEMP:
        it = tl.load(invt_ptr + tl.load(seq_ptr + src, mask=row_ok, other=0), mask=row_ok, other=1.0)
    else:
        it = tl.zeros([BLOCK_R], dtype=tl.float32) + inv_t
    y = tl.load(y_ptr + src, mask=row_ok, other=-1) - v_off
    m, s, a, zy = _row_stats(x_ptr + r.to(tl.int64) * stride_x, b_ptr, V, y, it, row_ok, HAS_BIAS, BLOCK_R,
                             BLOCK_V)
    tl.store(part_ptr + r, m, mask=row_ok)
    tl.store(part_ptr + n_rows + r, s, mask=row_ok)
    tl.store(part_ptr + 2 * n_rows + r, a, mask=row_ok)
    tl.store(part_ptr + 3 * n_rows + r, zy, mask=row_ok)


@triton.jit
def _loss_rows_kernel(
    x_ptr,        # [C, V] fp32 logits h W^T of the chunk's rows (row stride stride_x)
    dz_ptr,       # [C, V] out: dL/dlogits, compute dtype (row stride stride_dz; may alias x_ptr)
    b_ptr,        # [V] bias (if HAS_BIAS)
    idx_ptr,      # [N] int64 position of each projected row (if HAS_INDEX)
    y_ptr,        # [M] int64 target ids (full vocabulary)
    seq_ptr,      # [M] int64 sequence of each position
    keep_ptr,     # [M] fp32 1 = counts, 0 = projected but masked (if HAS_KEEP)
    old_ptr,      # [M] fp32 behaviour log-probs (if HAS_OLD)
    ref_ptr,      # [M] fp32 reference log-probs (if HAS_REF)
    isw_ptr,      # [M] fp32 importance weights (if HAS_ISW)
    adv_ptr, elo_ptr, ehi_ptr, w_ptr, wh_ptr,  # [S] fp32 advantage, eps_low, eps_high, weights (loss, entropy)
    invt_ptr,     # [S] fp32 1/temperature (if SEQ_TEMP)
    part_ptr,     # [3, C] fp32 merged (lse, H, zy) (read if MERGED)
    out_ptr,      # [6, M] fp32 out: loss, logp, H, clipped, ratio, kl per position
    row0,         # first projected row of the chunk
    n_rows, V, v_off, M, stride_x, stride_dz,
    inv_t, beta, ent_coef, dual_c, kl_c,
    HAS_BIAS: tl.constexpr, SEQ_TEMP: tl.constexpr, HAS_INDEX: tl.constexpr, HAS_KEEP: tl.constexpr,
    HAS_OLD: tl.constexpr, HAS_REF: tl.constexpr, HAS_ISW: tl.constexpr, KL: tl.constexpr,
    KL_IN_LOSS: tl.constexpr, KL_RATIO: tl.constexpr, DUAL: tl.constexpr, KL_CLAMP: tl.constexpr,
    MERGED: tl.constexpr, NEED_GRAD: tl.constexpr, RNE: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    r, row_ok, src = _rows_of(row0, n_rows, idx_ptr, HAS_INDEX, BLOCK_R)
    y = tl.load(y_ptr + src, mask=row_ok, other=-1) - v_off
    sq = tl.load(seq_ptr + src, mask=row_ok, other=0)
    if SEQ_TEMP:
        it = tl.load(invt_ptr + sq, mask=row_ok, other=1.0)
    else:
        it = tl.zeros([BLOCK_R], dtype=tl.float32) + inv_t
    x_rows = x_ptr + r.to(tl.int64) * stride_x
    if MERGED:  # vocabulary-parallel: statistics of the whole vocabulary, merged over ranks
        lse = tl.load(part_ptr + r, mask=row_ok, other=0.0)
        ent = tl.load(part_ptr + n_rows + r, mask=row_ok, other=0.0)
        zy = tl.load(part_ptr + 2 * n_rows + r, mask=row_ok, other=0.0)
    else:
        m, s, a, zy = _row_stats(x_rows, b_ptr, V, y, it, row_ok, HAS_BIAS, BLOCK_R, BLOCK_V)
        log_s = tl.log(s)
        lse = m + log_s
        ent = log_s - a / s
    logp = zy - lse

    old = logp
    ref = logp
    isw = logp
    if HAS_OLD:
        old = tl.load(old_ptr + src, mask=row_ok, other=0.0)
    if HAS_REF:
        ref = tl.load(ref_ptr + src, mask=row_ok, other=0.0)
    if HAS_ISW:
        isw = tl.load(isw_ptr + src, mask=row_ok, other=0.0)
    loss, g_lp, g_h, clipped, ratio, kl = agpo_epilogue(
        logp, ent, old, ref, isw, tl.load(adv_ptr + sq, mask=row_ok, other=0.0),
        tl.load(elo_ptr + sq, mask=row_ok, other=0.0), tl.load(ehi_ptr + sq, mask=row_ok, other=0.0),
        tl.load(w_ptr + sq, mask=row_ok, other=0.0), tl.load(wh_ptr + sq, mask=row_ok, other=0.0),
        beta, ent_coef, dual_c, kl_c,
        HAS_OLD, HAS_REF, HAS_ISW, KL, KL_IN_LOSS, KL_RATIO, DUAL, KL_CLAMP)
    logp_o = logp
    ent_o = ent
    if HAS_KEEP:  # projected but masked: zeros, whatever the row holds
        kept = tl.load(keep_ptr + src, mask=row_ok, other=0.0) != 0
        loss = tl.where(kept, loss, 0.0)
        logp_o = tl.where(kept, logp, 0.0)
        ent_o = tl.where(kept, ent, 0.0)
        clipped = tl.where(kept, clipped, 0.0)
        ratio = tl.where(kept, ratio, 0.0)
        kl = tl.where(kept, kl, 0.0)
        g_lp = tl.where(kept, g_lp, 0.0)
        g_h = tl.where(kept, g_h, 0.0)
    tl.store(out_ptr + src, loss, mask=row_ok)
    tl.store(out_ptr + M + src, logp_o, mask=row_ok)
    tl.store(out_ptr + 2 * M + src, ent_o, mask=row_ok)
    tl.store(out_ptr + 3 * M + src, clipped, mask=row_ok)
    tl.store(out_ptr + 4 * M + src, ratio, mask=row_ok)
    tl.store(out_ptr + 5 * M + src, kl, mask=row_ok)

    if NEED_GRAD:
        mu = lse - ent
        offs = tl.arange(0, BLOCK_V)
        dz_rows = dz_ptr + r.to(tl.int64) * stride_dz
        for v0 in range(0, V, BLOCK_V):
            cols = v0 + offs
            col_ok = cols < V
            ok = row_ok[:, None] & col_ok[None, :]
            x = tl.load(x_rows[:, None] + cols[None, :], mask=ok, other=0.0)
            if HAS_BIAS:
                x += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
            z = tl.where(col_ok[None, :], x * it[:, None], NEG_BIG)  # p = 0 past V
            if HAS_BIAS:  # a -inf bias masks its column: absent (NEG_BIG); NaN stays NaN
                z = tl.where(z < NEG_BIG, NEG_BIG, z)
            p = tl.exp(z - lse[:, None])
            dz = -p * (g_lp[:, None] + g_h[:, None] * (z - mu[:, None]))
            dz += tl.where(cols[None, :] == y[:, None], g_lp[:, None], 0.0)
            dz = dz * it[:, None]
            if HAS_KEEP:
                dz = tl.where(kept[:, None], dz, 0.0)
            if RNE:
                dz = round_bf16(dz)
            # A 16-bit dz column j lands in the bytes of fp32 column j/2 of the same row: in
            # this very tile, those bytes are loaded by *other* warps of this program (the
            # store layout is not the load layout), and nothing else orders a warp's store
            # after another warp's load. Every thread reaching the barrier has consumed its
            # loads (dz depends on x), so after it no store can overwrite an unread logit.
            # Earlier tiles are safe by order, later ones are never written. One barrier per
            # tile; the statistics loop has several per tile already.
            tl.debug_barrier()
            tl.store(dz_rows[:, None] + cols[None, :], dz.to(dz_ptr.dtype.element_ty), mask=ok)


def dz_view(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Where the row pass writes ``dz`` of dtype ``dtype`` over the fp32 logits ``x [c, V]``."""
    if dtype == torch.float32:
        return x
    return x.view(dtype)[:, : x.shape[1]]


def loss_rows_triton(x, rows, r0: int, r1: int, opts, bias, v_off: int, process_group, out: torch.Tensor,
                     need_grad: bool, dtype: torch.dtype, config: dict | None = None):
    """Runs the row pass on chunk rows ``[r0, r1)`` (logits in ``x [r1 - r0, V]``); writes the
    per-position outputs into ``out [6, M]`` and returns ``dz`` (a view over ``x``)."""
    n, V = x.shape
    dz = dz_view(x, dtype)
    cfg = dict(config or rows_config(x.device))
    seq_temp = isinstance(rows.inv_t, torch.Tensor)
    dummy = rows.targets
    args = [x, dz, bias if bias is not None else dummy, rows.index if rows.index is not None else dummy,
            rows.targets, rows.seq, rows.keep if rows.keep is not None else dummy,
            rows.old if rows.old is not None else dummy, rows.ref if rows.ref is not None else dummy,
            rows.isw if rows.isw is not None else dummy, rows.adv, rows.eps_low, rows.eps_high, rows.wseq, rows.wseq_ent,
            rows.inv_t if seq_temp else dummy]
    scalars = [r0, n, V, v_off, out.shape[1], x.stride(0), dz.stride(0),
               1.0 if seq_temp else float(rows.inv_t), float(opts.beta), float(opts.entropy_coef),
               float(opts.dual_clip or 0.0), float(opts.kl_clamp or 0.0)]
    flags = dict(HAS_BIAS=bias is not None, SEQ_TEMP=seq_temp, HAS_INDEX=rows.index is not None,
                 HAS_KEEP=rows.keep is not None, HAS_OLD=rows.old is not None, HAS_REF=rows.ref is not None,
                 HAS_ISW=rows.isw is not None, KL=opts.kl_code, KL_IN_LOSS=bool(opts.beta),
                 KL_RATIO=bool(opts.kl_ratio_weight), DUAL=opts.dual_clip is not None,
                 KL_CLAMP=opts.kl_clamp is not None, NEED_GRAD=need_grad,
                 RNE=round_bf16_stores(dtype), **cfg)
    grid = (triton.cdiv(n, cfg["BLOCK_R"]),)
    if process_group is None:
        _loss_rows_kernel[grid](*args, out, out, *scalars, MERGED=False, **flags)  # part_ptr unused
        return dz
    part = torch.empty(4, n, dtype=torch.float32, device=x.device)
    _row_partials_kernel[grid](x, args[2], args[3], rows.targets, rows.seq, args[15], part, r0, n, V, v_off,
                               x.stride(0), scalars[7], HAS_BIAS=bias is not None, SEQ_TEMP=seq_temp,
                               HAS_INDEX=rows.index is not None, **cfg)
    lse, ent, zy = merge_partials(gather_partials(part.unsqueeze(1), process_group))
    _loss_rows_kernel[grid](*args, torch.stack([lse, ent, zy]), out, *scalars, MERGED=True, **flags)
    return dz
