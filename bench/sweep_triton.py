"""GPU only: times alternative tile configurations and budgets of the recompute design's
Triton kernels on one LM-head shape, to choose what triton_engine/config.py ships. Prints Markdown.

``python bench/sweep_triton.py [SHAPE]`` (default qwen2.5-14b).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

import torch  # noqa: E402
import triton  # noqa: E402
from cases import GPU_SHAPES, flops  # noqa: E402

from agpo_kernels.partials import merge_partials  # noqa: E402
from agpo_kernels.triton_engine.bwd import bwd_grads  # noqa: E402
from agpo_kernels.triton_engine.config import bwd_config, fwd_config  # noqa: E402
from agpo_kernels.triton_engine.fwd import fwd_partials  # noqa: E402

FWD = [dict(BLOCK_N=128, BLOCK_V=128, BLOCK_K=64, num_warps=8, num_stages=3),
       dict(BLOCK_N=128, BLOCK_V=128, BLOCK_K=64, num_warps=8, num_stages=4),
       dict(BLOCK_N=64, BLOCK_V=256, BLOCK_K=64, num_warps=8, num_stages=3),
       dict(BLOCK_N=128, BLOCK_V=64, BLOCK_K=64, num_warps=8, num_stages=3)]
BWD = [dict(BLOCK_N=128, BLOCK_V=128, BLOCK_K=64, GROUP_N=8, num_warps=8, num_stages=4),
       dict(BLOCK_N=128, BLOCK_V=256, BLOCK_K=64, GROUP_N=8, num_warps=8, num_stages=3),
       dict(BLOCK_N=128, BLOCK_V=128, BLOCK_K=64, GROUP_N=8, num_warps=8, num_stages=3)]
BUDGETS = [128, 256, 1024]


def main(name="qwen2.5-14b"):
    s = {x.name: x for x in GPU_SHAPES}[name]
    dev, dt = "cuda", torch.bfloat16
    h = torch.randn(s.N, s.D, device=dev, dtype=dt)
    W = torch.randn(s.V, s.D, device=dev, dtype=dt) * s.D**-0.5
    y = torch.randint(0, s.V, (s.N,), device=dev)
    it = torch.rand(s.N, device=dev) + 0.5
    mm = triton.testing.do_bench(lambda: h @ W.t(), return_mode="median")
    print(f"shape {name}: N={s.N} D={s.D} V={s.V}; bf16 matmul {mm:.2f} ms = "
          f"{flops(s, 'fwd') / mm / 1e9:.0f} TFLOP/s\n")
    print("| kernel | config | ms | TFLOP/s | % matmul |\n|---|---|---|---|---|")
    print(f"| fwd default | {fwd_config(dt, h.device)} | | | |")
    for cfg in FWD:
        try:
            ms = triton.testing.do_bench(lambda: fwd_partials(h, W, None, y, it, config=cfg), return_mode="median")
            print(f"| fwd | {cfg} | {ms:.2f} | {flops(s, 'fwd') / ms / 1e9:.0f} | {100 * mm / ms:.0f}% |")
        except Exception as e:  # a config that does not fit this GPU
            print(f"| fwd | {cfg} | failed: {type(e).__name__} | | |")
    lse, ent, _ = merge_partials(fwd_partials(h, W, None, y, it))
    g = torch.randn(s.N, device=dev)
    print(f"| bwd default | {bwd_config(dt, h.device)} | | | |")
    for cfg in BWD:
        for budget in ([256] if cfg is not BWD[0] else BUDGETS):
            try:
                fn = lambda: bwd_grads(h, W, None, y, it, lse, lse - ent, g, g * 0.1, need_h=True, need_w=True,
                                       need_b=False, memory_budget=budget * 2**20, config=cfg)
                ms = triton.testing.do_bench(fn, return_mode="median")
                print(f"| bwd (budget {budget} MiB) | {cfg} | {ms:.2f} | {flops(s, 'bwd') * 1.5 / ms / 1e9:.0f} "
                      f"(counting 6NDV incl. recompute) | {100 * 3 * mm / ms:.0f}% |")
            except Exception as e:
                print(f"| bwd | {cfg} | failed: {type(e).__name__}: {e} | | |")


if __name__ == "__main__":
    main(*sys.argv[1:])
