"""impl="triton": the Triton engine of both designs (same interface as ``torch_engine.engine``).

* recompute design: ``partials`` is the fused GEMM + online-softmax kernel
  (``triton_engine.fwd``, O(N) output, no logits buffer), ``grads`` the fused GEMM + dlogits
  kernel per row chunk followed by the chunk GEMMs (``triton_engine.bwd``).
* forward-gradient design: ``logits`` is one cuBLAS GEMM with fp32 output
  (``torch.mm(..., out_dtype=torch.float32)``; a Triton GEMM where that overload is
  missing, and under the CPU interpreter), ``loss_chunk`` the row kernel of
  ``triton_engine.rows`` (statistics, AGPO epilogue, ``dL/dlogits`` in place, one launch).

Kernels launch on the device of their tensors (``torch.cuda.device`` guard), not on the
current CUDA device. CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import contextlib

import torch

from agpo_kernels.inputs import fail
from agpo_kernels.precision import mm_out_f32
from agpo_kernels.triton_engine.bwd import bwd_grads, logits_triton
from agpo_kernels.triton_engine.config import interpreting
from agpo_kernels.triton_engine.fwd import fwd_partials
from agpo_kernels.triton_engine.rows import loss_rows_triton


def device_guard(device: torch.device):
    """Launch on ``device``: Triton uses the current CUDA device and its stream."""
    if device.type == "cuda":
        return torch.cuda.device(device)
    if not interpreting():
        fail("impl", f"'triton' needs CUDA tensors (or TRITON_INTERPRET=1 set before importing triton, "
                     f"for the CPU interpreter), got tensors on {device}; use impl='torch'")
    return contextlib.nullcontext()


def bytes_per_row(vocab: int, dim: int, dtype: torch.dtype) -> int:
    """Forward-gradient scratch per chunk row: fp32 logits (dz overwrites them) + hidden + dh."""
    return 4 * vocab + 2 * dim * torch.empty((), dtype=dtype).element_size()


def logits(h_c: torch.Tensor, weight: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    if h_c.dtype == torch.float32 and h_c.is_cuda:
        return torch.mm(h_c, weight.t(), out=out)
    if not interpreting() and mm_out_f32(h_c, weight.t(), out):
        return out
    with device_guard(h_c.device):
        return logits_triton(h_c.contiguous(), weight, out)


def partials(hidden, weight, bias, targets, inv_t, memory_budget) -> torch.Tensor:
    with device_guard(hidden.device):
        return fwd_partials(hidden.contiguous(), weight.contiguous(),
                            None if bias is None else bias.contiguous(), targets.contiguous(), inv_t)


def grads(hidden, weight, bias, targets, inv_t, lse, mu, g_lp, g_h, *, need_h, need_w, need_b,
          memory_budget, process_group=None):
    with device_guard(hidden.device):
        return bwd_grads(hidden.contiguous(), weight.contiguous(), None if bias is None else bias.contiguous(),
                         targets.contiguous(), inv_t, lse, mu, g_lp.contiguous(), g_h.contiguous(),
                         need_h=need_h, need_w=need_w, need_b=need_b, memory_budget=memory_budget,
                         process_group=process_group)


def loss_chunk(x, e, rows, r0, r1, opts, bias32, v_off, process_group, out, need_grad, dtype):
    with device_guard(x.device):
        dz = loss_rows_triton(x, rows, r0, r1, opts, bias32, v_off, process_group, out, need_grad, dtype)
    return dz if need_grad else None
