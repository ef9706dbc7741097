"""Triton backward of the recompute design: logit gradients recomputed per row chunk, then
the chunk's two gradient GEMMs.

Given the per-row statistics saved by the forward pass (``lse``, ``mu = sum p z``) and
the two per-row gradient scalars ``g_lp = dL/dlogp`` and ``g_H = dL/dH``
(docs/algorithm.md#gradients), ``dL/dz_j = g_lp (1[j=y] - p_j) - g_H p_j (z_j - mu)``; ``dL/dlogits = dL/dz / T``.

Rows are processed in chunks of ``C`` (C from the memory budget), each over the whole
vocabulary:

1. ``_dlogits_kernel`` recomputes each ``[BLOCK_N, BLOCK_V]`` logit tile with ``tl.dot``
   (fp32 accumulation), forms ``dL/dlogits`` in registers and writes it in the compute
   dtype into a ``[C, V]`` buffer: the only buffer whose size depends on V, bounded by
   the budget.
2. ``chunks.HeadGrads``: ``dh[chunk] = dz W`` (one GEMM, written once), ``dW += dz^T h``
   (cuBLAS addmm into the returned gradient), ``db`` by column sums.

Every byte is moved a number of times linear in N (the earlier vocabulary-slab order kept
an fp32 ``[N, D]`` accumulator re-read per slab: N^2 traffic). With ``RAW`` the kernel is
a plain GEMM writing fp32 logits (the forward-gradient design's fallback when cuBLAS has
no 16-bit -> fp32 output).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from agpo_kernels.chunks import HeadGrads, HiddenRows, rows_per_chunk
from agpo_kernels.triton_engine.config import (
    NEG_BIG,
    bwd_config,
    dot_precision,
    round_bf16_stores,
    upcast_dot,
)
from agpo_kernels.triton_engine.tile import logit_tile, round_bf16


@triton.jit
def _dlogits_kernel(
    h_ptr,        # [N, D] hidden rows (row stride stride_h)
    w_ptr,        # [V, D] LM-head weight (row stride stride_w)
    b_ptr,        # [V] bias (if HAS_BIAS)
    y_ptr,        # [N] int64 targets (this vocabulary shard's ids)
    invt_ptr,     # [N] fp32 1/temperature (if ROW_TEMP)
    lse_ptr,      # [N] fp32 log-sum-exp of z
    mu_ptr,       # [N] fp32 sum_j p_j z_j
    glp_ptr,      # [N] fp32 dL/dlogp
    gh_ptr,       # [N] fp32 dL/dH
    dz_ptr,       # [C, V] out: dL/dlogits of rows [r_lo, r_hi) (compute dtype), or raw fp32 logits if RAW
    inv_t,        # fp32 scalar 1/temperature (if not ROW_TEMP)
    V, D, stride_h, stride_w, stride_dz, r_lo, r_hi,
    HAS_BIAS: tl.constexpr, ROW_TEMP: tl.constexpr, EVEN_K: tl.constexpr, RAW: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr, RNE: tl.constexpr, NUM_STAGES: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_N: tl.constexpr,
):
    # Grouped ordering: GROUP_N row blocks sweep the vocabulary tiles together so their h
    # rows and the shared W tiles stay in L2.
    pid = tl.program_id(0)
    n_rb = tl.cdiv(r_hi - r_lo, BLOCK_N)
    n_vb = tl.cdiv(V, BLOCK_V)
    per_group = GROUP_N * n_vb
    first = (pid // per_group) * GROUP_N
    gsize = tl.minimum(n_rb - first, GROUP_N)
    rb = first + (pid % per_group) % gsize
    vb = (pid % per_group) // gsize

    tile_rows = tl.arange(0, BLOCK_N)
    tile_cols = tl.arange(0, BLOCK_V)
    rows = r_lo + rb * BLOCK_N + tile_rows
    row_ok = rows < r_hi
    cols = vb * BLOCK_V + tile_cols
    col_ok = cols < V
    offs_k = tl.arange(0, BLOCK_K)
    h_ptrs = (h_ptr + (r_lo + rb * BLOCK_N).to(tl.int64) * stride_h + tile_rows[:, None] * stride_h
              + offs_k[None, :])
    w_ptrs = w_ptr + (vb * BLOCK_V).to(tl.int64) * stride_w + tile_cols[None, :] * stride_w + offs_k[:, None]
    acc = logit_tile(h_ptrs, w_ptrs, row_ok, col_ok, D, EVEN_K, PRECISION, UPCAST, NUM_STAGES,
                     BLOCK_N, BLOCK_V, BLOCK_K)
    out = (dz_ptr + (rb * BLOCK_N).to(tl.int64) * stride_dz + tile_rows[:, None] * stride_dz
           + cols[None, :])
    ok = row_ok[:, None] & col_ok[None, :]
    if RAW:
        tl.store(out, acc, mask=ok)
    else:
        if HAS_BIAS:
            acc += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        if ROW_TEMP:
            it = tl.load(invt_ptr + rows, mask=row_ok, other=1.0)
        else:
            it = tl.zeros([BLOCK_N], dtype=tl.float32) + inv_t
        # Columns past V get z = -1e30 and padding rows lse = +1e30: p = exp(z - lse) is
        # exactly 0 there, so nothing unset reaches an exp or the stores (masked as well).
        z = tl.where(col_ok[None, :], acc * it[:, None], NEG_BIG)
        if HAS_BIAS:  # a -inf bias masks its column: absent (NEG_BIG); NaN stays NaN
            z = tl.where(z < NEG_BIG, NEG_BIG, z)
        lse = tl.load(lse_ptr + rows, mask=row_ok, other=-NEG_BIG)
        mu = tl.load(mu_ptr + rows, mask=row_ok, other=0.0)
        g_lp = tl.load(glp_ptr + rows, mask=row_ok, other=0.0)
        g_h = tl.load(gh_ptr + rows, mask=row_ok, other=0.0)
        y = tl.load(y_ptr + rows, mask=row_ok, other=-1).to(tl.int32)
        p = tl.exp(z - lse[:, None])
        dz = -p * (g_lp[:, None] + g_h[:, None] * (z - mu[:, None]))
        dz += tl.where(cols[None, :] == y[:, None], g_lp[:, None], 0.0)
        dz = dz * it[:, None]
        if RNE:
            dz = round_bf16(dz)
        tl.store(out, dz.to(dz_ptr.dtype.element_ty), mask=ok)


def _launch(hidden, weight, bias, targets, inv_t, lse, mu, g_lp, g_h, dz, r_lo, r_hi, *, raw: bool,
            config: dict | None):
    cfg = dict(config or bwd_config(hidden.dtype, hidden.device))
    bn, bv = cfg.pop("BLOCK_N"), cfg.pop("BLOCK_V")
    row_temp = isinstance(inv_t, torch.Tensor)
    grid = (triton.cdiv(r_hi - r_lo, bn) * triton.cdiv(weight.shape[0], bv),)
    dummy = dz
    _dlogits_kernel[grid](
        hidden, weight, bias if bias is not None else dummy, targets if targets is not None else dummy,
        inv_t if row_temp else dummy, lse if lse is not None else dummy, mu if mu is not None else dummy,
        g_lp if g_lp is not None else dummy, g_h if g_h is not None else dummy, dz,
        1.0 if row_temp else float(inv_t), weight.shape[0], hidden.shape[1], hidden.stride(0), weight.stride(0),
        dz.stride(0), r_lo, r_hi,
        HAS_BIAS=bias is not None, ROW_TEMP=row_temp, EVEN_K=hidden.shape[1] % cfg["BLOCK_K"] == 0, RAW=raw,
        PRECISION=dot_precision(hidden.dtype), UPCAST=upcast_dot(hidden.dtype),
        RNE=round_bf16_stores(dz.dtype), BLOCK_N=bn, BLOCK_V=bv, NUM_STAGES=cfg.get("num_stages", 2), **cfg,
    )


def logits_triton(h: torch.Tensor, weight: torch.Tensor, out: torch.Tensor, config: dict | None = None):
    """``out [c, V]`` fp32 ``= h @ weight^T`` (a Triton GEMM with fp32 output). The kernel
    takes row strides only: ``h`` and ``weight`` need unit column stride."""
    if h.stride(-1) != 1 or weight.stride(-1) != 1:
        raise ValueError("logits_triton: hidden and weight need unit column stride (call .contiguous())")
    _launch(h, weight, None, None, 1.0, None, None, None, None, out, 0, h.shape[0], raw=True, config=config)
    return out


def bwd_grads(hidden, weight, bias, targets, inv_t, lse, mu, g_lp, g_h, *, need_h: bool, need_w: bool,
              need_b: bool, memory_budget: int, process_group=None, config: dict | None = None):
    """Returns ``(dh, dW, db)`` (None where not needed), in the dtypes of the inputs.

    ``hidden [N, D]`` and ``weight`` already in the compute dtype; ``targets`` local to
    this vocabulary shard.
    """
    N, D = hidden.shape
    V = weight.shape[0]
    rows = HiddenRows(hidden, None)
    grads = HeadGrads(rows, weight, bias, weight, need_h=need_h, need_w=need_w, need_b=need_b)
    c = rows_per_chunk(N, V * hidden.element_size(), memory_budget)
    buf = torch.empty(c, V, dtype=hidden.dtype, device=hidden.device)
    for r0 in range(0, N, c):
        r1 = min(N, r0 + c)
        dz = buf[: r1 - r0]
        _launch(hidden, weight, bias, targets, inv_t, lse, mu, g_lp, g_h, dz, r0, r1, raw=False, config=config)
        grads.add_chunk(dz, hidden[r0:r1], r0, r1)
    return grads.finish(process_group)
