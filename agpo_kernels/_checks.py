"""Argument checks shared by the public functions; every error names the argument.

Two kinds: checks on shapes, dtypes and devices read only tensor metadata and always run;
checks on values (id ranges, finiteness, signs) read tensor contents, which on a GPU means
a device-to-host synchronisation each, and run only with ``validate=True`` (the default).
"""

from __future__ import annotations

import math

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def fail(arg: str, msg: str) -> None:
    raise ValueError(f"{arg}: {msg}")


def check_device(name: str, t, device: torch.device) -> None:
    """Tensors must live where ``hidden`` lives: nothing is moved between devices silently."""
    if isinstance(t, torch.Tensor) and t.device != device:
        fail(name, f"on {t.device} but hidden is on {device}; move it to {device} first")


def check_head(hidden, weight, bias) -> None:
    """The projection operands: float dtypes (they may differ: mixed precision), one device,
    matching hidden sizes."""
    if not isinstance(hidden, torch.Tensor) or hidden.dtype not in FLOAT_DTYPES:
        fail("hidden", f"expected a float32/bfloat16/float16 tensor, got {getattr(hidden, 'dtype', type(hidden))}")
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        fail("weight", f"expected a 2-D [V, D] tensor, got shape {tuple(getattr(weight, 'shape', ()))}")
    if weight.dtype not in FLOAT_DTYPES:
        fail("weight", f"expected a float32/bfloat16/float16 tensor, got {weight.dtype}")
    if hidden.shape[-1] != weight.shape[1]:
        fail("weight", f"hidden size {weight.shape[1]} differs from hidden's last dim {hidden.shape[-1]}")
    check_device("weight", weight, hidden.device)
    if weight.shape[0] == 0:
        fail("weight", "vocabulary size is 0")
    if bias is not None:
        if not isinstance(bias, torch.Tensor) or bias.shape != (weight.shape[0],):
            fail("bias", f"expected shape [{weight.shape[0]}], got {tuple(getattr(bias, 'shape', ()))}")
        if bias.dtype not in FLOAT_DTYPES:
            fail("bias", f"expected a float tensor, got {bias.dtype}")
        check_device("bias", bias, hidden.device)


def check_compute_dtype(compute_dtype) -> None:
    if compute_dtype is not None and compute_dtype not in FLOAT_DTYPES:
        fail("compute_dtype", f"expected torch.float32, torch.bfloat16, torch.float16 or None, got {compute_dtype}")


def check_int_tensor(name: str, t) -> None:
    if not isinstance(t, torch.Tensor) or t.dtype.is_floating_point or t.dtype == torch.bool or t.is_complex():
        fail(name, f"expected an integer (int64) tensor, got {getattr(t, 'dtype', type(t))}")


def check_id_range(name: str, ids: torch.Tensor, vocab: int) -> None:
    """Value check (syncs): every id in ``[0, vocab)``."""
    if ids.numel():
        lo, hi = torch.aminmax(ids)
        lo, hi = int(lo), int(hi)
        if lo < 0 or hi >= vocab:
            fail(name, f"token ids must lie in [0, {vocab}); got min {lo}, max {hi}")


def check_finite(name: str, t: torch.Tensor, *, nonneg: bool = False, positive: bool = False) -> None:
    """Value check (syncs): finite, and optionally >= 0 or > 0."""
    if t.numel() == 0:
        return
    if not bool(torch.isfinite(t).all()):
        fail(name, "contains NaN or inf; drop or repair those entries before the loss")
    if positive and bool((t <= 0).any()):
        fail(name, "must be > 0")
    if nonneg and bool((t < 0).any()):
        fail(name, "must be >= 0")


def scalar(name: str, value, *, nonneg: bool = False) -> float:
    """``value`` as a finite float (``>= 0`` with ``nonneg``), or a ValueError naming ``name``."""
    try:
        value = float(value)
    except (TypeError, ValueError):
        fail(name, f"expected a number, got {type(value).__name__} {value!r}")
    if not math.isfinite(value) or (nonneg and value < 0):
        fail(name, f"must be finite{' and >= 0' if nonneg else ''}, got {value}")
    return value


def scalar_positive(name: str, value) -> float:
    value = scalar(name, value)
    if not value > 0:
        fail(name, f"must be finite and > 0, got {value}")
    return value


def refuse_double_backward(op: str) -> None:
    """Called first in our backward passes: their gradients are not themselves differentiable."""
    if torch.is_grad_enabled():
        raise RuntimeError(f"{op}: double backward (create_graph=True, higher-order gradients) is not "
                           "supported by the fused LM head; use impl='reference' for that")
