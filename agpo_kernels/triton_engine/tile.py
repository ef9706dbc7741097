"""The logit tile both Triton kernels start from: ``h[rows] @ W[cols]^T`` over D.

A ``@triton.jit`` helper (inlined by Triton): ``tl.dot`` over D in ``BLOCK_K`` steps,
fp32 accumulation, loads software-pipelined ``NUM_STAGES`` deep. Pointers enter as an
int64 scalar base per tile plus int32 in-tile offsets, which keeps pointer tensors small
while offsets beyond 2^31 (V*D of a 152k x 5120 head and up) stay correct.
"""

import triton
import triton.language as tl


@triton.jit
def logit_tile(
    h_ptrs,       # [BLOCK_N, BLOCK_K] pointers to h[rows, 0:BLOCK_K]
    w_ptrs,       # [BLOCK_K, BLOCK_V] pointers to W[cols, 0:BLOCK_K]^T
    row_ok,       # [BLOCK_N] row mask
    col_ok,       # [BLOCK_V] column mask
    D,
    EVEN_K: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    NUM_STAGES: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
):
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_N, BLOCK_V], dtype=tl.float32)
    for k0 in tl.range(0, D, BLOCK_K, num_stages=NUM_STAGES):
        if EVEN_K:
            hk = tl.load(h_ptrs, mask=row_ok[:, None], other=0.0)
            wk = tl.load(w_ptrs, mask=col_ok[None, :], other=0.0)
        else:
            kk = k0 + offs_k
            hk = tl.load(h_ptrs, mask=row_ok[:, None] & (kk[None, :] < D), other=0.0)
            wk = tl.load(w_ptrs, mask=col_ok[None, :] & (kk[:, None] < D), other=0.0)
        if UPCAST:  # interpreter workaround: its bf16 tl.dot is wrong (triton 3.9)
            hk = hk.to(tl.float32)
            wk = wk.to(tl.float32)
        acc = tl.dot(hk, wk, acc, input_precision=PRECISION)
        h_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    return acc


@triton.jit
def round_bf16(x):
    """fp32 ``x`` rounded to the nearest bf16 value (ties to even), still as fp32. Only for
    the CPU interpreter, whose own fp32 -> bf16 conversion truncates (twice the rounding
    error, and biased); compiled kernels round to nearest in the conversion itself."""
    b = x.to(tl.uint32, bitcast=True)
    b = (b + 0x7FFF + ((b >> 16) & 1)) & 0xFFFF0000
    return b.to(tl.float32, bitcast=True)


@triton.jit
def online_softmax_step(m, s, a, zy, z, cols, col_ok, y):
    """Folds one tile of scaled logits ``z [R, C]`` (``-1e30`` where ``col_ok`` is false)
    into the rows' running max ``m``, ``s = sum e^(z-m)``, ``a = sum e^(z-m)(z-m)`` and
    target logit ``zy``; on a new max, ``a <- e^(m-m')(a + (m - m') s)``, ``s <- e^(m-m') s``."""
    # col_ok: a target of another vocabulary shard can equal a column past this one's end
    zy += tl.sum(tl.where((cols[None, :] == y[:, None]) & col_ok[None, :], z, 0.0), axis=1)
    m_new = tl.maximum(m, tl.max(z, axis=1))
    alpha = tl.exp(m - m_new)
    zc = z - m_new[:, None]
    e = tl.exp(zc)  # exactly 0 on masked columns
    a = alpha * (a + (m - m_new) * s) + tl.sum(e * zc, axis=1)
    s = alpha * s + tl.sum(e, axis=1)
    return m_new, s, a, zy
