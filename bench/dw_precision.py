"""Weight-gradient precision of the forward-gradient design with 16-bit weights.

Without an fp32 ``[V, D]`` scratch (which would break the memory bound), a bf16 ``dW`` is
accumulated in bf16 across the ``K`` row chunks (cuBLAS/oneDNN addmm: fp32 inside one
GEMM, one rounding of the running sum per chunk). This measures its error against the
float64 oracle (on the same bf16 inputs) relative to same-dtype eager PyTorch (one GEMM
over all N, one rounding), for K from 1 to 128, plus fp32 master weights (mixed precision:
fp32 accumulation) and the other gradients. CPU, impl="torch".

    python bench/dw_precision.py [N D V]
"""

import os
import sys

ROOT = os.path.join(os.path.dirname(__file__), "..")
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]

import torch  # noqa: E402
from oracle import oracle_loss  # noqa: E402  (the tests' float64 oracle)

from agpo_kernels import agpo_loss  # noqa: E402


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def main(N=4096, D=256, V=4096):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(1, N, D, generator=g).bfloat16()
    W = (torch.randn(V, D, generator=g) / D**0.5).bfloat16()
    y = torch.randint(0, V, (1, N), generator=g)
    adv = torch.tensor([1.0])
    old = torch.full((1, N), -8.0)
    kw = dict(eps_low=10.0, entropy_coef=0.01)  # unclipped: every token has a gradient

    def grads(impl, hid, w, **extra):
        hid, w = hid.clone().requires_grad_(), w.clone().requires_grad_()
        loss, _ = agpo_loss(hid, w, y, adv, old, impl=impl, **kw, **extra)
        return torch.autograd.grad(loss, (hid, w))

    oh, ow = h.double().requires_grad_(), W.double().requires_grad_()
    o_loss, _ = oracle_loss(oh, ow, y, adv, old, torch.ones(1, N), eps_low=10.0, eps_high=10.0, temperature=1.0,
                            ent_coef=0.01)
    o = torch.autograd.grad(o_loss, (oh, ow))
    eager = grads("reference", h, W)
    e_h, e_w = rel(eager[0], o[0]), rel(eager[1], o[1])
    print(f"N={N} D={D} V={V}, bf16 inputs; eager rel. error: dh {e_h:.2e}, dW {e_w:.2e}\n")
    print("| chunks K | dh error / eager's | dW error / eager's (bf16 weight) | dW error / eager's (fp32 weight) |")
    print("|---|---|---|---|")
    per_row = 8 * V + 4 * D
    for K in (1, 2, 4, 8, 16, 32, 64, 128):
        budget = per_row * -(-N // K)
        ours = grads("torch", h, W, memory_budget=budget)
        mixed = grads("torch", h, W.float(), memory_budget=budget)  # fp32 master weights
        print(f"| {K} | {rel(ours[0], o[0]) / e_h:.2f} | {rel(ours[1], o[1]) / e_w:.2f} | "
              f"{rel(mixed[1], o[1]) / e_w:.2f} |", flush=True)


if __name__ == "__main__":
    main(*(int(a) for a in sys.argv[1:]))
