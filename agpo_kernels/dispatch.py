"""Chooses the implementation behind the public API.

"reference": naive eager (the oracle); "torch": the tiled PyTorch engine (``torch_engine``);
"triton": the Triton engine (``triton_engine``); "auto": Triton on a CUDA device where it
works, else torch. "Where it works" is probed once per device: Triton importable, a GPU
of compute capability 8.0 or newer (bf16/tf32 tensor cores), and the kernels compiling and
running on a tiny problem. A device that fails the probe falls back to torch with one
warning saying why (an unsupported GPU, a Triton too old or broken).
"""

from __future__ import annotations

import functools
import warnings

import torch

from agpo_kernels.chunks import DEFAULT_MEMORY_BUDGET
from agpo_kernels.epilogue import LossOptions
from agpo_kernels.fused_loss import fused_agpo_loss
from agpo_kernels.inputs import fail, loss_rows
from agpo_kernels.recompute import linear_stats_recompute
from agpo_kernels.torch_engine import engine as torch_engine

IMPLS = ("auto", "reference", "torch", "triton")


@functools.lru_cache(maxsize=1)
def triton_import_error() -> str | None:
    try:
        from agpo_kernels.triton_engine import engine  # noqa: F401
    except Exception as exc:  # triton missing or broken: fall back, never crash "auto"
        return f"{type(exc).__name__}: {exc}"
    return None


def triton_available() -> bool:
    return triton_import_error() is None


def _probe(device: torch.device) -> None:
    """Raises if the Triton kernels cannot run on ``device``: both designs on a tiny problem,
    forward and backward, through the same design functions the public API calls (this
    module sits below the public layer and never imports it)."""
    major, minor = torch.cuda.get_device_capability(device)
    if major < 8:
        raise RuntimeError(f"compute capability {major}.{minor} < 8.0 (the kernels need bf16/tf32 tensor cores)")
    tri = engine("triton")
    # Whatever the caller's mode (no_grad, inference_mode, autocast), the probe needs grads.
    with torch.inference_mode(False), torch.enable_grad(), torch.autocast("cuda", enabled=False):
        g = torch.Generator(device="cpu").manual_seed(0)
        h = torch.randn(3, 32, generator=g).to(device, torch.bfloat16).requires_grad_()
        w = torch.randn(67, 32, generator=g).to(device, torch.bfloat16).requires_grad_()
        y = torch.randint(0, 67, (3,), generator=g).to(device)
        lp, ent = linear_stats_recompute(h, w, None, y, torch.ones(3, device=device), engine=tri,
                                         memory_budget=DEFAULT_MEMORY_BUDGET, process_group=None)
        (lp.sum() + ent.sum()).backward()
        hb = h.view(1, 3, 32)
        rows = loss_rows(hb, 67, y.view(1, 3), torch.ones(1, device=device), None, mask=None,
                         cu_seqlens=None, eps_low=0.2, eps_high=None, temperature=1.0, ref_logp=None,
                         is_weight=None, beta=0.0, loss_agg="token-mean", kl_estimator="k3", dual_clip=None,
                         max_len=None, validate=True)
        loss, _, _ = fused_agpo_loss(hb, w, None, rows, LossOptions(), engine=tri, compute_dtype=torch.bfloat16,
                                     memory_budget=DEFAULT_MEMORY_BUDGET, process_group=None)
        loss.backward()
        torch.cuda.synchronize(device)


@functools.lru_cache(maxsize=None)
def triton_problem(device: torch.device) -> str | None:
    """Why the Triton kernels cannot run on ``device`` (None: they can). Probed once per device."""
    if triton_import_error() is not None:
        return f"triton could not be imported ({triton_import_error()})"
    try:
        _probe(device)
    except Exception as exc:  # any failure to compile or run means: use the torch path
        return f"{type(exc).__name__}: {str(exc)[:300]}"
    return None


def resolve_impl(impl: str, device: torch.device) -> str:
    if impl not in IMPLS:
        fail("impl", f"unknown {impl!r}; choose one of {', '.join(IMPLS)}")
    if impl != "auto":
        return impl
    if device.type != "cuda":
        return "torch"
    if device.index is None:
        device = torch.device("cuda", torch.cuda.current_device() if torch.cuda.is_available() else 0)
    why = triton_problem(device)
    if why is None:
        return "triton"
    _warn_once(device, why)
    return "torch"


@functools.lru_cache(maxsize=None)
def _warn_once(device: torch.device, why: str) -> None:
    warnings.warn(f"agpo_kernels: Triton kernels unavailable on {device} ({why}); impl='auto' uses the "
                  "tiled torch path there", RuntimeWarning, stacklevel=4)


def engine(impl: str):
    """The module implementing ``impl`` ("torch" or "triton")."""
    if impl == "torch":
        return torch_engine
    if triton_import_error() is not None:
        fail("impl", f"'triton' requested but triton could not be imported ({triton_import_error()}); "
                     "install triton or use impl='torch'")
    from agpo_kernels.triton_engine import (
        engine as triton_engine,  # triton may be missing: imported on demand
    )
    return triton_engine
