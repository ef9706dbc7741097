"""Triton backward: logit gradients recomputed tile by tile, then two GEMMs per slab.

Given the per-row statistics saved by the forward pass (``lse``, ``mu = sum p z``) and
the two per-row gradient scalars ``g_lp = dL/dlogp`` and ``g_H = dL/dH`` (SPEC section
2), ``dL/dz_j = g_lp (1[j=y] - p_j) - g_H p_j (z_j - mu)``; ``dL/dlogits = dL/dz / T``.

The vocabulary is processed in slabs of ``VS`` columns (VS from the memory budget):

1. ``_dlogits_kernel`` recomputes each ``[BLOCK_N, BLOCK_V]`` logit tile with ``tl.dot``
   (fp32 accumulation), forms ``dL/dlogits`` in registers and writes it in the input
   dtype into a ``[N, VS]`` slab buffer: the only ``N x`` something buffer, bounded by
   the budget, never ``N x V``.
2. ``dW[slab] = dlogits^T h`` (one GEMM with the full N reduction, written once:
   deterministic, no fp32 ``[V, D]`` scratch); skipped when the weight is frozen.
3. ``dh += dlogits W[slab]`` into an fp32 ``[N, D]`` accumulator; ``db`` by column sums.

A head too wide for registers (D = 5120) cannot keep ``dh`` or ``dW`` tiles on chip the
way attention keeps its head dimension, so the two reductions run as tensor-core GEMMs
on the slab instead; docs/kernels.md has the arithmetic.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_tile import logit_tile
from .triton_config import NEG_BIG, upcast_dot, bwd_config, dot_precision


@triton.jit
def _dlogits_kernel(
    h_ptr,        # [N, D] hidden rows
    w_ptr,        # [V, D] LM-head weight
    b_ptr,        # [V] bias (if HAS_BIAS)
    y_ptr,        # [N] int64 targets
    invt_ptr,     # [N] fp32 1/temperature (if ROW_TEMP)
    lse_ptr,      # [N] fp32 log-sum-exp of z
    mu_ptr,       # [N] fp32 sum_j p_j z_j
    glp_ptr,      # [N] fp32 dL/dlogp
    gh_ptr,       # [N] fp32 dL/dH
    dz_ptr,       # [N, VS] out: dL/dlogits for columns [v_lo, v_hi), input dtype
    inv_t,        # fp32 scalar 1/temperature (if not ROW_TEMP)
    N, D, stride_h, stride_w, stride_dz, v_lo, v_hi,
    HAS_BIAS: tl.constexpr, ROW_TEMP: tl.constexpr, EVEN_K: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr, NUM_STAGES: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_N: tl.constexpr,
):
    # Grouped ordering: GROUP_N row blocks sweep the slab's vocabulary tiles together so
    # their h rows and the shared W tiles stay in L2.
    pid = tl.program_id(0)
    n_rb = tl.cdiv(N, BLOCK_N)
    n_vb = tl.cdiv(v_hi - v_lo, BLOCK_V)
    per_group = GROUP_N * n_vb
    first = (pid // per_group) * GROUP_N
    gsize = tl.minimum(n_rb - first, GROUP_N)
    rb = first + (pid % per_group) % gsize
    vb = (pid % per_group) // gsize

    rows = rb * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    cols = v_lo + vb * BLOCK_V + tl.arange(0, BLOCK_V)
    col_ok = cols < v_hi
    offs_k = tl.arange(0, BLOCK_K)
    tile_rows = tl.arange(0, BLOCK_N)
    tile_cols = tl.arange(0, BLOCK_V)
    h_ptrs = h_ptr + (rb * BLOCK_N).to(tl.int64) * stride_h + tile_rows[:, None] * stride_h + offs_k[None, :]
    w_ptrs = (w_ptr + (v_lo + vb * BLOCK_V).to(tl.int64) * stride_w + tile_cols[None, :] * stride_w
              + offs_k[:, None])
    acc = logit_tile(h_ptrs, w_ptrs, row_ok, col_ok, D, EVEN_K, PRECISION, UPCAST, NUM_STAGES,
                     BLOCK_N, BLOCK_V, BLOCK_K)
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    if ROW_TEMP:
        it = tl.load(invt_ptr + rows, mask=row_ok, other=1.0)
    else:
        it = tl.zeros([BLOCK_N], dtype=tl.float32) + inv_t
    z = tl.where(col_ok[None, :], acc * it[:, None], NEG_BIG)
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
    mu = tl.load(mu_ptr + rows, mask=row_ok, other=0.0)
    g_lp = tl.load(glp_ptr + rows, mask=row_ok, other=0.0)
    g_h = tl.load(gh_ptr + rows, mask=row_ok, other=0.0)
    y = tl.load(y_ptr + rows, mask=row_ok, other=-1).to(tl.int32)
    p = tl.exp(z - lse[:, None])
    dz = -p * (g_lp[:, None] + g_h[:, None] * (z - mu[:, None]))
    dz += tl.where(cols[None, :] == y[:, None], g_lp[:, None], 0.0)
    dz = dz * it[:, None]
    out = (dz_ptr + (rb * BLOCK_N).to(tl.int64) * stride_dz + tile_rows[:, None] * stride_dz
           + (vb * BLOCK_V + tile_cols)[None, :])
    tl.store(out, dz.to(dz_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


def _mm_f32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` with an fp32 result from 16-bit operands (fp32 accumulation throughout)."""
    if a.dtype == torch.float32:
        return a @ b
    if a.is_cuda:
        try:
            return torch.mm(a, b, out_dtype=torch.float32)
        except Exception:  # torch without the out_dtype overload: upcast instead
            pass
    return a.float() @ b.float()


def slab_width(n_rows: int, vocab: int, elem_size: int, block_v: int, memory_budget: int) -> int:
    """Vocabulary columns per slab so that the ``[N, VS]`` buffer fits the budget."""
    cols = (memory_budget // max(n_rows * elem_size, 1)) // block_v * block_v
    return int(min(max(cols, block_v), triton.cdiv(vocab, block_v) * block_v))


def bwd_grads(hidden, weight, bias, targets, inv_t, lse, mu, g_lp, g_h, *, need_h: bool,
              need_w: bool, need_b: bool, memory_budget: int, config: dict | None = None):
    """Returns ``(dh, dW, db)`` (None where not needed), in the dtypes of the inputs."""
    N, D = hidden.shape
    V = weight.shape[0]
    cfg = dict(config or bwd_config(hidden.dtype, hidden.device))
    bn, bv = cfg.pop("BLOCK_N"), cfg.pop("BLOCK_V")
    vs = slab_width(N, V, hidden.element_size(), bv, memory_budget)
    dz = torch.empty(N, vs, dtype=hidden.dtype, device=hidden.device)
    dh = torch.zeros(N, D, dtype=torch.float32, device=hidden.device) if need_h else None
    dw = torch.empty_like(weight) if need_w else None
    db = torch.empty(V, dtype=torch.float32, device=hidden.device) if need_b else None
    row_temp = isinstance(inv_t, torch.Tensor)
    for v_lo in range(0, V, vs):
        v_hi = min(V, v_lo + vs)
        grid = (triton.cdiv(N, bn) * triton.cdiv(v_hi - v_lo, bv),)
        _dlogits_kernel[grid](
            hidden, weight, bias if bias is not None else hidden, targets,
            inv_t if row_temp else lse, lse, mu, g_lp, g_h, dz, 1.0 if row_temp else float(inv_t),
            N, D, hidden.stride(0), weight.stride(0), dz.stride(0), v_lo, v_hi,
            HAS_BIAS=bias is not None, ROW_TEMP=row_temp, EVEN_K=D % cfg["BLOCK_K"] == 0,
            PRECISION=dot_precision(hidden.dtype), UPCAST=upcast_dot(hidden.dtype),
            BLOCK_N=bn, BLOCK_V=bv, NUM_STAGES=cfg.get("num_stages", 2), **cfg,
        )
        d = dz[:, : v_hi - v_lo]
        if need_w:
            torch.mm(d.t(), hidden, out=dw[v_lo:v_hi])
        if need_h:
            dh += _mm_f32(d, weight[v_lo:v_hi])
        if need_b:
            db[v_lo:v_hi] = d.sum(0, dtype=torch.float32)
    return (dh.to(hidden.dtype) if need_h else None, dw,
            db.to(bias.dtype) if need_b else None)
