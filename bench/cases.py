"""Benchmark cases shared by the pytest-benchmark suite, the peak-memory probe and the GPU
comparison.

A case is one LM-head shape (hidden size D, vocabulary V, N response tokens as B x T)
and one implementation:

* ``torch`` / ``triton``: ``agpo_loss`` with the forward-gradient design (the default),
  ``torch-recompute`` / ``triton-recompute``: the recompute design;
* ``eager``: the naive full-logits path every trainer starts with (logits, log_softmax,
  gather, clipped surrogate: ``impl="reference"``);
* ``liger``: Liger-Kernel's ``LigerFusedLinearGRPOLoss`` with the same options (scalar eps,
  k3 KL, token-mean; its 0.8.5 backward runs fp32 GEMMs, so it is slow for reasons unrelated
  to fusion); ``liger-ce``: Liger's fused linear cross-entropy, the cheapest fused head loss
  there is (no KL, no ratio), as a floor for a chunked cuBLAS design; ``liger-logprob``:
  Liger's fused linear + per-token log-prob + differentiable entropy
  (``LigerFusedLinearScaledCrossEntropyFunction``, scalar temperature) with the same clipped
  surrogate and k3 KL computed on its O(N) outputs: the real rival of the fused head.

``loss_fn(impl, per_row_t=True)``: the same case with the inputs' per-sequence temperatures
``x["temp"]`` (fp32, in [0.6, 1.3]; every row of a sequence shares its value). agpo takes them
in the kernel; Liger's log-prob op, which takes a scalar temperature only, gets them the way
verl's fused heads do (verl PR #6110): ``h / T`` per row in fp32, cast back to the hidden's
dtype, then temperature 1 (exact in real arithmetic, ``(h / T) W^T = (h W^T) / T`` without
a bias; the cast rounds ``h / T`` to bf16).
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
    Shape("qwen2.5-14b-n65536", 5120, 152064, 8, 8192),
    Shape("llama3-8b", 4096, 128256, 8, 1024),
    Shape("qwen2.5-0.5b", 896, 151936, 8, 1024),
]
CPU_SHAPES = [
    Shape("cpu-small", 256, 32000, 4, 64),
    Shape("cpu-vocab152k", 256, 152064, 4, 128),
    Shape("cpu-long16k", 256, 32000, 1, 16384),
]
# Memory-only shapes (bench/peak_rss.py): the fused-loss issue's measurement points.
MEMORY_SHAPES = [Shape("cpu-d1024-n2048", 1024, 152064, 1, 2048),
                 Shape("cpu-long65536", 256, 32000, 1, 65536),
                 Shape("cpu-long262144", 256, 32000, 1, 262144)]
BETA, EPS = 0.04, 0.2
OURS = {"torch": ("torch", "forward"), "torch-recompute": ("torch", "recompute"),
        "triton": ("triton", "forward"), "triton-recompute": ("triton", "recompute"),
        "eager": ("reference", "forward")}


def make_inputs(shape: Shape, dtype: torch.dtype, device: str, seed: int = 0) -> dict:
    g = torch.Generator(device="cpu").manual_seed(seed)
    B, T, D, V = shape.B, shape.T, shape.D, shape.V
    h = torch.randn(B, T, D, generator=g).to(device, dtype).requires_grad_()
    W = (torch.randn(V, D, generator=g) * D**-0.5).to(device, dtype).requires_grad_()
    y = torch.randint(0, V, (B, T), generator=g).to(device)
    mask = torch.ones(B, T, dtype=torch.bool, device=device)
    adv = torch.randn(B, generator=g).to(device)
    old = (-torch.rand(B, T, generator=g) * 5 - 8).to(device)
    ref = old + 0.05 * torch.randn(B, T, generator=g).to(device)
    temp = (0.6 + 0.7 * torch.rand(B, generator=g)).to(device)  # drawn last: the tensors above stay as they were
    return dict(h=h, W=W, y=y, mask=mask, adv=adv, old=old, ref=ref, temp=temp)


def per_row_temperature(x: dict) -> torch.Tensor:
    """``[B * T]`` fp32: each row's temperature, its sequence's ``x["temp"]``."""
    B, T = x["y"].shape
    return x["temp"].float()[:, None].expand(B, T).reshape(-1)


def scaled_hidden(h: torch.Tensor, temperature: torch.Tensor) -> torch.Tensor:
    """``h [N, D] / temperature[:, None]`` computed in fp32 and cast back to ``h``'s dtype:
    a per-row temperature for a head that takes a scalar one (then run at temperature 1)."""
    return (h.float() / temperature.float()[:, None]).to(h.dtype)


def _liger_grpo():
    from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

    # torch.compile on CPU breaks on a shape change (torch 2.13)
    kw = dict(beta=BETA, epsilon_low=EPS, epsilon_high=EPS, use_ref_model=True, compiled=torch.cuda.is_available())
    try:
        return LigerFusedLinearGRPOLoss(loss_type="dapo", **kw)
    except TypeError:  # older Liger without loss_type
        return LigerFusedLinearGRPOLoss(**kw)


def loss_fn(impl: str, *, per_row_t: bool = False, **loss_kw):
    """Returns ``f(inputs) -> scalar loss`` for one implementation (``loss_kw``: extra
    ``agpo_loss`` keywords such as ``memory_budget``; ``backward`` overrides the name's).
    ``per_row_t``: logits divided by the per-sequence temperatures ``x["temp"]`` (agpo and
    ``liger-logprob`` only; see the module docstring)."""
    if per_row_t and impl in ("liger", "liger-ce"):
        raise ValueError(f"{impl}: no per-row temperature route")
    if impl == "liger":
        mod = _liger_grpo()

        def f(x):
            out = mod(x["h"], x["W"], x["y"], x["mask"].long(), x["adv"], ref_per_token_logps=x["ref"],
                      old_per_token_logps=x["old"])
            return out[0] if isinstance(out, tuple) else out
        return f
    if impl == "liger-ce":
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        ce = LigerFusedLinearCrossEntropyLoss()

        def f(x):
            return ce(x["W"], x["h"].reshape(-1, x["h"].shape[-1]), x["y"].reshape(-1))
        return f
    if impl == "liger-logprob":
        from liger_kernel.ops.fused_linear_scaled_cross_entropy import LigerFusedLinearScaledCrossEntropyFunction

        def f(x):
            h = x["h"].reshape(-1, x["h"].shape[-1])
            if per_row_t:  # the op's temperature is a scalar: scale the rows, run at temperature 1
                h = scaled_hidden(h, per_row_temperature(x))
            nll, ent = LigerFusedLinearScaledCrossEntropyFunction.apply(h, x["W"], x["y"].reshape(-1), 1.0, -100, 1,
                                                                        True)
            return surrogate_on_logprobs(-nll.view_as(x["old"]), x)
        return f
    our, backward = OURS[impl]
    kw = {"backward": backward, **loss_kw}

    def f(x):
        temp = {"temperature": x["temp"]} if per_row_t else {}  # per sequence, in the kernel
        loss, _ = agpo_loss(x["h"], x["W"], x["y"], x["adv"], x["old"], mask=x["mask"], eps_low=EPS,
                            ref_logp=x["ref"], beta=BETA, kl_estimator="k3", impl=our, **kw, **temp)
        return loss
    return f


def surrogate_on_logprobs(logp: torch.Tensor, x: dict) -> torch.Tensor:
    """The objective ``loss_fn`` gives every implementation (clipped ratio at EPS, k3 KL at
    BETA, token-mean), computed from per-token log-probs [B, T]: what a trainer adds on top
    of a fused log-prob op that has no loss of its own."""
    m = x["mask"].float()
    ratio = torch.exp(logp - x["old"])
    adv = x["adv"].view(-1, 1)
    surr = torch.minimum(ratio * adv, ratio.clamp(1 - EPS, 1 + EPS) * adv)
    d = x["ref"] - logp
    kl = torch.exp(d) - d - 1
    return ((-surr + BETA * kl) * m).sum() / m.sum()


def logprobs_fn(impl: str):
    our = OURS[impl][0]

    def f(x):
        with torch.no_grad():
            return linear_logprobs(x["h"], x["W"], x["y"], impl=our)
    return f


def flops(shape: Shape, mode: str) -> float:
    """Matmul FLOPs of the LM head: 2NDV forward, 4NDV backward (docs/algorithm.md#costs); a design
    that recomputes logits does more, but is credited with the same work."""
    per = 2.0 * shape.N * shape.D * shape.V
    return {"fwd": per, "bwd": 2 * per, "fwd+bwd": 3 * per, "logprobs": per}[mode]
