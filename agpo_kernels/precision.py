"""Compute dtype and the three GEMMs of the fused head, with fp32 accumulation throughout.

* ``compute_dtype``: an explicit argument, else the autocast dtype when autocast is on for
  the device (what ``F.linear`` would use), else the activation (hidden) dtype. A bf16
  hidden with fp32 master weights thus runs bf16 tensor-core GEMMs, never fp32 ones.
* ``logits_f32``: ``h W^T`` into an fp32 buffer (logits are never rounded to 16 bits).
* ``addmm_acc``: ``acc += a @ b`` where ``acc`` may be fp32 while ``a``/``b`` are 16-bit
  (the fp32 weight gradient of mixed precision); ``mm_into`` the same with ``beta = 0``
  (the first chunk writes the gradient, later ones accumulate).

On CUDA the 16-bit -> fp32 cases use ``torch.mm(..., out_dtype=torch.float32)`` (one
cuBLAS GEMM, fp32 output); where that overload is missing (CPU, old torch) they upcast
bounded slabs instead.
"""

from __future__ import annotations

import contextlib
import warnings

import torch

_SLAB_BYTES = 32 * 2**20  # fp32 temporaries of the upcasting fallbacks
_OUT_DTYPE = {}  # op -> False once the out_dtype overload failed on this torch


def resolve_compute_dtype(hidden: torch.Tensor, compute_dtype: torch.dtype | None) -> torch.dtype:
    if compute_dtype is not None:
        return compute_dtype
    dev = hidden.device.type
    if dev in ("cuda", "cpu") and torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return hidden.dtype


def no_autocast(device: torch.device):
    """Our GEMMs run in the dtypes chosen here, not autocast's."""
    if device.type in ("cuda", "cpu"):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


# What torch says when the out_dtype overload is missing (older torch: an unknown keyword;
# a build or device without it: no kernel / not supported for these dtypes).
_MISSING = ("out_dtype", "dtype_out", "unexpected keyword", "could not run", "not implemented",
            "not supported")


def is_missing_overload(err: BaseException) -> bool:
    """True when ``err`` says the ``out_dtype`` GEMM overload does not exist here; anything
    else (an out-of-memory, an asynchronous CUDA fault of an earlier kernel, a cuBLAS
    failure) is a real error that must surface, not a reason to switch paths."""
    if isinstance(err, torch.OutOfMemoryError):
        return False
    msg = str(err).lower()
    if "cuda error" in msg or "cublas_status" in msg or "illegal" in msg:
        return False
    return isinstance(err, TypeError) or any(k in msg for k in _MISSING)


def _no_overload(op: str, err: BaseException) -> None:
    """Re-raises a real error; else records that ``op`` lacks the overload and warns once."""
    if not is_missing_overload(err):
        raise err
    _OUT_DTYPE[op] = False
    warnings.warn(f"agpo_kernels: torch.{op}(..., out_dtype=torch.float32) is unavailable here "
                  f"({type(err).__name__}: {str(err).splitlines()[0][:160]}); 16-bit GEMMs with fp32 "
                  "output fall back to upcast fp32 slabs (slower) for the rest of this process",
                  RuntimeWarning, stacklevel=3)


def mm_out_f32(a, b, out) -> bool:
    """``out = a @ b`` by one cuBLAS GEMM with fp32 output; False where unavailable."""
    if a.is_cuda and _OUT_DTYPE.get("mm", True):
        try:
            torch.mm(a, b, out_dtype=torch.float32, out=out)
            return True
        except (RuntimeError, TypeError) as err:
            _no_overload("mm", err)
    return False


def mm_f32(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``out`` (fp32 ``[m, n]``) ``= a @ b``, fp32 accumulation; ``a``, ``b`` of one dtype."""
    if a.dtype == torch.float32:
        return torch.mm(a, b, out=out)
    if mm_out_f32(a, b, out):
        return out
    a32 = a.float()
    step = max(1, _SLAB_BYTES // (4 * max(b.shape[0], 1)))
    for j in range(0, b.shape[1], step):
        out[:, j:j + step] = a32 @ b[:, j:j + step].float()
    return out


def addmm_acc(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """``acc += a @ b`` in place (cuBLAS ``beta = 1``); fp32 ``acc`` with 16-bit ``a``, ``b``
    keeps fp32 accumulation across calls."""
    if acc.dtype == a.dtype:
        acc.addmm_(a, b)
        return
    if acc.dtype == torch.float32 and a.is_cuda and _OUT_DTYPE.get("addmm", True):
        try:
            torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
            return
        except (RuntimeError, TypeError) as err:
            _no_overload("addmm", err)
    step = max(1, _SLAB_BYTES // (4 * max(b.shape[1], 1)))
    for i in range(0, a.shape[0], step):
        part = mm_f32(a[i:i + step], b, torch.empty(min(step, a.shape[0] - i), b.shape[1],
                                                    dtype=torch.float32, device=a.device))
        acc[i:i + step] += part.to(acc.dtype)


def mm_into(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """``out = a @ b`` (``beta = 0``: ``out``'s old contents are never read), with ``out`` in
    the dtype of ``a``/``b`` or fp32 beside 16-bit operands, as in ``addmm_acc``."""
    if out.dtype == a.dtype:
        torch.mm(a, b, out=out)
    elif out.dtype != torch.float32:
        out.copy_(torch.mm(a, b))
    elif not mm_out_f32(a, b, out):  # upcast in bounded row slabs, written in place
        step = max(1, _SLAB_BYTES // (4 * max(b.shape[1], 1)))
        for i in range(0, a.shape[0], step):
            mm_f32(a[i:i + step], b, out[i:i + step])

