"""Benchmark cases shared by the pytest-benchmark suite and the GPU suite.

A case is one LM-head shape (hidden size D, vocabulary V, N response tokens as B x T)
and one implementation: our "triton" and "torch" paths, "eager" (the naive full-logits
path every trainer starts with: logits, log_softmax, gather, clipped surrogate) and
"liger" (Liger-Kernel's LigerFusedLinearGRPOLoss with the same options: scalar eps,
k3 KL, token-mean aggregation).
"""

from __future__ import annotations

import dataclasses

import torch

from agpo_kernels import agpo_loss, linear_logprobs


@dataclasses.dataclass(frozen=True)
class Shape:
    name: str
    D: int
    V: int
    B: int
    T: int

    @property
    def N(self) -> int:
        return self.B * self.T


GPU_SHAPES = [
    Shape("qwen2.5-14b", 5120, 152064, 8, 1024),
    Shape("llama3-8b", 4096, 128256, 8, 1024),
    Shape("qwen2.5-7b", 3584, 152064, 8, 1024),
    Shape("qwen2.5-0.5b", 896, 151936, 8, 1024),
]
CPU_SHAPES = [
    Shape("cpu-small", 256, 32000, 4, 64),
    Shape("cpu-vocab152k", 256, 152064, 4, 128),
]
# Memory-only shape (bench/peak_rss.py): the fused-loss issue's measurement point.
MEMORY_SHAPES = [Shape("cpu-d1024-n2048", 1024, 152064, 1, 2048)]
BETA, EPS = 0.04, 0.2


def make_inputs(shape: Shape, dtype: torch.dtype, device: str, seed: int = 0) -> dict:
    g = torch.Generator(device="cpu").manual_seed(seed)
    B, T, D, V = shape.B, shape.T, shape.D, shape.V
    h = (torch.randn(B, T, D, generator=g) * 1.0).to(device, dtype).requires_grad_()
    W = (torch.randn(V, D, generator=g) * D**-0.5).to(device, dtype).requires_grad_()
    y = torch.randint(0, V, (B, T), generator=g).to(device)
    mask = torch.ones(B, T, dtype=torch.bool, device=device)
    adv = torch.randn(B, generator=g).to(device)
    old = (-torch.rand(B, T, generator=g) * 5 - 8).to(device)
    ref = old + 0.05 * torch.randn(B, T, generator=g).to(device)
    return dict(h=h, W=W, y=y, mask=mask, adv=adv, old=old, ref=ref)


def loss_fn(impl: str):
    """Returns ``f(inputs) -> scalar loss`` for one implementation."""
    if impl == "liger":
        from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

        mod = LigerFusedLinearGRPOLoss(beta=BETA, epsilon_low=EPS, epsilon_high=EPS, loss_type="dapo",
                                       use_ref_model=True,
                                       # torch.compile on CPU breaks on a shape change (torch 2.13)
                                       compiled=torch.cuda.is_available())

        def f(x):
            out = mod(x["h"], x["W"], x["y"], x["mask"].long(), x["adv"], ref_per_token_logps=x["ref"],
                      old_per_token_logps=x["old"])
            return out[0] if isinstance(out, tuple) else out
        return f
    our = {"eager": "reference"}.get(impl, impl)

    def f(x):
        loss, _ = agpo_loss(x["h"], x["W"], x["y"], x["adv"], x["old"], mask=x["mask"], eps_low=EPS,
                            ref_logp=x["ref"], beta=BETA, kl_estimator="k3", impl=our)
        return loss
    return f


def logprobs_fn(impl: str):
    our = {"eager": "reference"}.get(impl, impl)

    def f(x):
        with torch.no_grad():
            return linear_logprobs(x["h"], x["W"], x["y"], impl=our)
    return f


def flops(shape: Shape, mode: str) -> float:
    """Matmul FLOPs of the LM head: 2NDV forward, 4NDV backward (SPEC section 3)."""
    per = 2.0 * shape.N * shape.D * shape.V
    return {"fwd": per, "bwd": 2 * per, "fwd+bwd": 3 * per, "logprobs": per}[mode]
