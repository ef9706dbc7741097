"""Counter-based noise for rollouts: hashes of (seed, stream, global row, decode step,
vocabulary index), so a row's randomness depends on nothing else.

``row_keys(seed, stream, rows, offset)`` gives each global row a 32-bit key (the trainer
uses one stream per step and phase). The HF engine turns a key into one uniform per decode
step (``step_uniforms``) for an inverse-CDF draw; the vLLM engine uses keys as
per-request seeds. Hashing
works on int64 tensors (or Python ints) holding values in [0, 2^32): a product is formed
from the 16-bit halves of its 32-bit constant, so no int64 product overflows, and right
shifts only ever see non-negative values. The tensor versions work in place.
"""

from __future__ import annotations

import torch

_M32 = 0xFFFFFFFF
_M64 = (1 << 64) - 1


def _mul32_(x: torch.Tensor, c: int) -> torch.Tensor:
    """``x = (x * c) mod 2^32`` in place, for ``x`` in [0, 2^32) and a 32-bit ``c``."""
    hi = x * (c >> 16)
    hi &= 0xFFFF
    hi <<= 16
    x *= c & 0xFFFF
    x += hi
    x &= _M32
    return x


def _fmix32_(h: torch.Tensor) -> torch.Tensor:
    """murmur3's 32-bit finaliser in place: a bijection of [0, 2^32) with full avalanche."""
    h ^= h >> 16
    _mul32_(h, 0x85EBCA6B)
    h ^= h >> 13
    _mul32_(h, 0xC2B2AE35)
    h ^= h >> 16
    return h


def _fmix32(h: int) -> int:
    """``_fmix32_`` for one Python int in [0, 2^32)."""
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & _M32
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & _M32
    return h ^ (h >> 16)


def _hash64(x: int) -> int:
    """A Python int hashed to 32 bits (through its 64-bit two's complement)."""
    x &= _M64
    return _fmix32((x & _M32) ^ _fmix32((x >> 32) ^ 0x3C6EF372))


def row_keys(seed: int, stream: int, rows: int, offset: int = 0) -> torch.Tensor:
    """``LongTensor[rows]`` in [0, 2^32): the noise key of global rows ``offset`` ..
    ``offset + rows - 1``, a hash of (``seed``, ``stream``, global row). Distinct rows of one
    (seed, stream) get distinct keys (every step is a bijection of the row index)."""
    if rows < 0 or offset < 0:
        raise ValueError(f"row_keys: rows={rows}, offset={offset}: expected non-negative")
    a = _fmix32(_hash64(seed) ^ _fmix32(_hash64(stream) ^ 0x5BD1E995))
    b = _fmix32(a ^ 0x27D4EB2F)
    k = torch.arange(offset, offset + rows, dtype=torch.int64)
    k += a
    k &= _M32
    _fmix32_(k)
    k ^= b
    return _fmix32_(k)


def counter_hash(keys: torch.Tensor, step: int, vocab: int, device=None) -> torch.Tensor:
    """``LongTensor[rows, vocab]`` in [0, 2^32): the hash of (``keys[r]``, ``step``, ``v``).

    Key and step are mixed first into one value per row (``fmix(key ^ fmix(step * C1 + C2))``,
    distinct steps of one key give distinct values); it is xor-ed with a hash of ``v`` and the
    result goes through murmur3's finaliser (two multiply / xor-shift rounds)."""
    if step < 0:
        raise ValueError(f"counter_hash: step {step} < 0")
    keys = keys.to(device=device, dtype=torch.int64) & _M32
    s = _fmix32(((step * 0x9E3779B1) + 0x7F4A7C15) & _M32)
    r = _fmix32_(keys ^ s)
    v = torch.arange(vocab, dtype=torch.int64, device=keys.device)
    _mul32_(v, 0x27D4EB2F)
    v += 0x165667B1
    v &= _M32
    _fmix32_(v)
    return _fmix32_(r.unsqueeze(1) ^ v.unsqueeze(0))


def step_uniforms(keys: torch.Tensor, step: int, device=None) -> torch.Tensor:
    """Float64 ``[rows]`` uniforms in (0, 1), one per row key at decode step ``step``, with 52
    random bits: ``(h0 * 2^20 + (h1 >> 12) + 0.5) / 2^52`` from the two 32-bit hashes
    ``counter_hash(keys, step, 2)``: exact in float64, never 0 or 1 (at most 1 - 2^-53, the
    largest float64 below 1). An inverse-CDF draw with it resolves probabilities far below
    any a float32 softmax can represent."""
    h = counter_hash(keys, step, 2, device)
    bits = (h[:, 0] << 20) | (h[:, 1] >> 12)                      # < 2^52
    return bits.to(torch.float64).add_(0.5).mul_(2.0 ** -52)
