"""Chooses the implementation of the fused projection behind the public API.

Every implementation has the signature
``stats(hidden [N, D], weight [V, D], bias [V] | None, targets [N], temperature) ->
(logp [N] fp32, entropy [N] fp32)``, differentiable with respect to hidden, weight and
bias. "auto" takes Triton on CUDA tensors when Triton imports, else the tiled torch path.
"""

from __future__ import annotations

import functools

import torch

from ._inputs import fail
from .reference import linear_stats_reference
from .torch_tiled import linear_stats_torch

IMPLS = ("auto", "reference", "torch", "triton")


@functools.lru_cache(maxsize=1)
def triton_available() -> bool:
    try:
        from . import triton_impl  # noqa: F401
    except Exception:  # triton missing or broken: fall back, never crash "auto"
        return False
    return True


def resolve_impl(impl: str, device: torch.device) -> str:
    if impl not in IMPLS:
        fail("impl", f"unknown {impl!r}; choose one of {', '.join(IMPLS)}")
    if impl == "auto":
        return "triton" if device.type == "cuda" and triton_available() else "torch"
    return impl


def linear_stats(hidden, weight, bias, targets, temperature, *, impl: str = "auto",
                 memory_budget: int | None = None):
    """Runs the chosen implementation on flat inputs (see the module docstring)."""
    impl = resolve_impl(impl, hidden.device)
    if hidden.shape[0] == 0:  # nothing to project; keep the graph connected for zero grads
        anchor = hidden.float().sum() * 0 + weight.float().sum() * 0
        if bias is not None:
            anchor = anchor + bias.float().sum() * 0
        empty = anchor + torch.zeros(0, device=hidden.device)
        return empty, empty
    if impl == "reference":
        return linear_stats_reference(hidden, weight, bias, targets, temperature)
    if impl == "torch":
        kw = {} if memory_budget is None else {"memory_budget": memory_budget}
        return linear_stats_torch(hidden, weight, bias, targets, temperature, **kw)
    if not triton_available():
        fail("impl", "'triton' requested but triton could not be imported; install triton or use impl='torch'")
    from .triton_impl import linear_stats_triton

    kw = {} if memory_budget is None else {"memory_budget": memory_budget}
    return linear_stats_triton(hidden, weight, bias, targets, temperature, **kw)
