"""Triton forward kernel: per-row log-sum-exp statistics of ``(h W^T + b) / T``.

One program owns ``BLOCK_N`` rows and one contiguous slice of the vocabulary (a "split").
It walks its slice in ``BLOCK_V`` tiles; each tile is ``h[rows] @ W[tile]^T`` by
``tl.dot`` over ``D`` in ``BLOCK_K`` steps with fp32 accumulation, then folded into
running per-row statistics (docs/algorithm.md#gradients, stable form):

    m  = running max of z            s = sum exp(z - m)
    a  = sum exp(z - m) (z - m)      zy = z at the target column

The split partials ``[4, SPLIT, N]`` are merged by ``partials.merge_partials``
(O(N * SPLIT), after an all-gather over the ranks of a vocabulary-parallel head), which
yields ``lse``, ``H = log s - a / s`` and ``logp = zy - lse``. Only O(N) values are ever
written: no logits, no probabilities.

Programs are numbered split-fastest, so the programs resident at one time share few row
blocks (their ``h`` rows stay in L2) and each ``W`` tile is read from HBM once per wave.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from agpo_kernels.triton_engine.config import (
    NEG_BIG,
    dot_precision,
    fwd_config,
    upcast_dot,
)
from agpo_kernels.triton_engine.tile import logit_tile, online_softmax_step


@triton.jit
def _fwd_stats_kernel(
    h_ptr,        # [N, D] hidden rows (row stride stride_h, unit column stride)
    w_ptr,        # [V, D] LM-head weight (row stride stride_w)
    b_ptr,        # [V] bias (read only if HAS_BIAS)
    y_ptr,        # [N] int64 target ids
    invt_ptr,     # [N] fp32 1/temperature per row (read only if ROW_TEMP)
    part_ptr,     # [4, SPLIT, N] fp32 out: m, s, a, z_target
    inv_t,        # fp32 scalar 1/temperature (used if not ROW_TEMP)
    N, V, D, stride_h, stride_w,
    n_split,      # number of vocabulary splits
    v_per_split,  # vocabulary columns per split (a multiple of BLOCK_V)
    HAS_BIAS: tl.constexpr, ROW_TEMP: tl.constexpr, EVEN_K: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr, NUM_STAGES: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    row_blk = pid // n_split
    split = pid % n_split
    rows = row_blk * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    h_base = h_ptr + (row_blk * BLOCK_N).to(tl.int64) * stride_h
    tile_rows = tl.arange(0, BLOCK_N)
    tile_cols = tl.arange(0, BLOCK_V)
    y = tl.load(y_ptr + rows, mask=row_ok, other=-1).to(tl.int32)
    if ROW_TEMP:
        it = tl.load(invt_ptr + rows, mask=row_ok, other=1.0)
    else:
        it = tl.zeros([BLOCK_N], dtype=tl.float32) + inv_t

    m = tl.zeros([BLOCK_N], dtype=tl.float32) + NEG_BIG
    s = tl.zeros([BLOCK_N], dtype=tl.float32)
    a = tl.zeros([BLOCK_N], dtype=tl.float32)
    zy = tl.zeros([BLOCK_N], dtype=tl.float32)
    offs_k = tl.arange(0, BLOCK_K)
    v_start = split * v_per_split
    v_end = tl.minimum(V, v_start + v_per_split)
    w_base = w_ptr + v_start.to(tl.int64) * stride_w  # advanced by one tile per step
    for v0 in range(v_start, v_end, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_ok = cols < v_end
        h_ptrs = h_base + tile_rows[:, None] * stride_h + offs_k[None, :]
        w_ptrs = w_base + tile_cols[None, :] * stride_w + offs_k[:, None]
        acc = logit_tile(h_ptrs, w_ptrs, row_ok, col_ok, D, EVEN_K, PRECISION, UPCAST, NUM_STAGES,
                         BLOCK_N, BLOCK_V, BLOCK_K)
        w_base += BLOCK_V * stride_w
        if HAS_BIAS:
            acc += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        z = tl.where(col_ok[None, :], acc * it[:, None], NEG_BIG)
        if HAS_BIAS:  # a -inf bias masks its column: absent (NEG_BIG); NaN stays NaN
            z = tl.where(z < NEG_BIG, NEG_BIG, z)
        m, s, a, zy = online_softmax_step(m, s, a, zy, z, cols, col_ok, y)

    out = part_ptr + split * N + rows
    plane = n_split * N
    tl.store(out, m, mask=row_ok)
    tl.store(out + plane, s, mask=row_ok)
    tl.store(out + 2 * plane, a, mask=row_ok)
    tl.store(out + 3 * plane, zy, mask=row_ok)


def fwd_partials(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                 targets: torch.Tensor, inv_t, config: dict | None = None) -> torch.Tensor:
    """Launches the forward kernel; returns the split partials ``[4, SPLIT, N]`` fp32.

    ``inv_t`` is a float or an fp32 ``[N]`` tensor of inverse temperatures; ``targets``
    are ids of this vocabulary shard (others never match).
    """
    N, D = hidden.shape
    V = weight.shape[0]
    cfg = dict(config or fwd_config(hidden.dtype, hidden.device))
    bn, bv = cfg.pop("BLOCK_N"), cfg.pop("BLOCK_V")
    row_blocks = triton.cdiv(N, bn)
    # Enough programs to fill the machine a few times over, each with >= 8 tiles to stream.
    target = cfg.pop("TARGET_PROGRAMS", 4 * _sm_count(hidden.device))
    n_split = max(1, min(triton.cdiv(V, 8 * bv), triton.cdiv(target, row_blocks)))
    v_per_split = triton.cdiv(triton.cdiv(V, n_split), bv) * bv
    n_split = triton.cdiv(V, v_per_split)
    part = torch.empty(4, n_split, N, dtype=torch.float32, device=hidden.device)
    row_temp = isinstance(inv_t, torch.Tensor)
    _fwd_stats_kernel[(row_blocks * n_split,)](
        hidden, weight, bias if bias is not None else hidden, targets,
        inv_t if row_temp else hidden, part, 1.0 if row_temp else float(inv_t),
        N, V, D, hidden.stride(0), weight.stride(0), n_split, v_per_split,
        HAS_BIAS=bias is not None, ROW_TEMP=row_temp, EVEN_K=D % cfg["BLOCK_K"] == 0,
        PRECISION=dot_precision(hidden.dtype), UPCAST=upcast_dot(hidden.dtype),
        BLOCK_N=bn, BLOCK_V=bv, NUM_STAGES=cfg.get("num_stages", 2), **cfg,
    )
    return part


def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4
