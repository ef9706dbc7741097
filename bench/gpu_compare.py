"""GPU comparison of the fused AGPO head (issue 16), with the targets beside the figures.

    python bench/gpu_compare.py [--shapes qwen2.5-14b,qwen2.5-14b-n65536] [--reps 3] [--json OUT]

For each shape (bf16): the device's own bf16 matmul rate on ``[N, D] x [D, V]``, then one
forward + backward of the recompute design, the forward-gradient design (default budget,
a 1 GiB budget, and with a Triton GEMM for the logits instead of cuBLAS), eager PyTorch,
Liger's ``LigerFusedLinearGRPOLoss`` and Liger's fused linear cross-entropy: median time,
TFLOP/s counting 6NDV, and peak memory beyond the inputs and the returned gradients.
Targets (forward-gradient design, default budget): at least 1.5x faster than Liger's GRPO
loss, at most 1.25x the time of 6NDV at the measured matmul rate, extra memory at most 1%
of eager's (eager's extra memory extrapolated linearly in N where it runs out of memory).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(__file__))

import torch  # noqa: E402
from cases import GPU_SHAPES, flops, loss_fn, make_inputs  # noqa: E402

GiB = 2**30
VARIANTS = [  # (label, impl in cases.py, agpo_loss keywords, use the Triton logits GEMM)
    ("recompute", "triton-recompute", {}, False),
    ("forward", "triton", {}, False),
    ("forward, 1 GiB budget", "triton", {"memory_budget": GiB}, False),
    ("forward, Triton logits GEMM", "triton", {}, True),
    ("eager", "eager", {}, False),
    ("liger GRPO", "liger", {}, False),
    ("liger fused linear CE", "liger-ce", {}, False),
]


def timed(fn, reps: int) -> float:
    """Median milliseconds of ``fn`` over ``reps`` runs after one warm-up."""
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def matmul_rate(shape) -> float:
    h = torch.randn(shape.N, shape.D, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(shape.V, shape.D, device="cuda", dtype=torch.bfloat16)
    ms = timed(lambda: h @ w.t(), 10)
    return flops(shape, "fwd") / (ms / 1e3)


def run_variant(x, impl, kw, triton_gemm, reps):
    from agpo_kernels.triton_engine import engine as triton_impl
    from agpo_kernels.triton_engine.bwd import logits_triton

    saved = triton_impl.logits
    if triton_gemm:
        triton_impl.logits = lambda h, w, out: logits_triton(h.contiguous(), w, out)
    try:
        f = loss_fn(impl, **kw)

        def step():
            x["h"].grad = x["W"].grad = None
            f(x).backward()

        ms = timed(step, reps)
        x["h"].grad = x["W"].grad = None
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        f(x).backward()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - before
        grads = (x["h"].numel() + x["W"].numel()) * 2
        return dict(ms=ms, peak_gib=peak / GiB, beyond_grads_mib=(peak - grads) / 2**20)
    except torch.cuda.OutOfMemoryError as e:
        return dict(error=f"OOM ({str(e).splitlines()[0][:80]})")
    except Exception as e:  # a missing Liger, an unsupported option: report, go on
        return dict(error=f"{type(e).__name__}: {str(e).splitlines()[0][:120]}")
    finally:
        triton_impl.logits = saved
        x["h"].grad = x["W"].grad = None
        gc.collect()
        torch.cuda.empty_cache()


def compare(shape, reps: int, eager_ref: dict | None) -> dict:
    rate = matmul_rate(shape)
    floor_ms = 3 * flops(shape, "fwd") / rate * 1e3  # 6NDV at the measured matmul rate
    rows = {}
    x = make_inputs(shape, torch.bfloat16, "cuda")  # once per shape, shared by the variants
    for label, impl, kw, tg in VARIANTS:
        rows[label] = run_variant(x, impl, kw, tg, reps)
        print(f"  {shape.name} {label}: {rows[label]}", flush=True)
    del x
    gc.collect()
    torch.cuda.empty_cache()
    eager = rows["eager"]
    if "error" in eager and eager_ref and "error" not in eager_ref["eager"]:  # extrapolate in N
        scale = shape.N / eager_ref["N"]
        eager = dict(beyond_grads_mib=eager_ref["eager"]["beyond_grads_mib"] * scale, extrapolated=True)
    return dict(shape=shape.name, N=shape.N, D=shape.D, V=shape.V, matmul_tflops=rate / 1e12,
                floor_6ndv_ms=floor_ms, eager_for_memory=eager, **rows)


def table(res: dict) -> str:
    six = 3 * 2.0 * res["N"] * res["D"] * res["V"]
    lig = res["liger GRPO"].get("ms")
    eager_mem = res["eager_for_memory"].get("beyond_grads_mib")
    out = [f"### {res['shape']}: N={res['N']} D={res['D']} V={res['V']}, bf16; matmul {res['matmul_tflops']:.0f} "
           f"TFLOP/s, 6NDV at that rate = {res['floor_6ndv_ms']:.1f} ms",
           "", "| variant | median ms | TFLOP/s (6NDV) | x 6NDV time | speed-up vs Liger GRPO | peak GiB "
           "(incl. grads) | beyond grads MiB | % of eager's |", "|---|---|---|---|---|---|---|---|"]
    for label, *_ in VARIANTS:
        r = res[label]
        if "error" in r:
            out.append(f"| {label} | {r['error']} | | | | | | |")
            continue
        pct = f"{100 * r['beyond_grads_mib'] / eager_mem:.2f}%" if eager_mem else "-"
        speed = f"{lig / r['ms']:.2f}x" if lig else "-"
        out.append(f"| {label} | {r['ms']:.1f} | {six / r['ms'] / 1e9:.0f} | {r['ms'] / res['floor_6ndv_ms']:.2f} "
                   f"| {speed} | {r['peak_gib']:.2f} | {r['beyond_grads_mib']:.0f} | {pct} |")
    fwd = res["forward"]
    if "error" not in fwd:
        ratio = fwd["ms"] / res["floor_6ndv_ms"]
        lines = [f"time <= 1.25x that of 6NDV at the matmul rate: {ratio:.2f}x {'MET' if ratio <= 1.25 else 'MISSED'}"]
        if lig:
            lines.insert(0, f"at least 1.5x faster than Liger's GRPO loss: {lig / fwd['ms']:.2f}x "
                            f"{'MET' if lig / fwd['ms'] >= 1.5 else 'MISSED'}")
        if eager_mem:
            pct = 100 * fwd["beyond_grads_mib"] / eager_mem
            note = " (eager's memory extrapolated from the smaller N)" if res["eager_for_memory"].get("extrapolated") else ""
            lines.append(f"extra memory at most 1% of eager's: {pct:.2f}% {'MET' if pct <= 1 else 'MISSED'}{note}")
        out += ["", "targets (forward-gradient design, default budget):"] + [f"- {x}" for x in lines]
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="qwen2.5-14b,qwen2.5-14b-n65536")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--json")
    a = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("gpu_compare.py needs a CUDA device")
    shapes = {s.name: s for s in GPU_SHAPES}
    print(f"{torch.cuda.get_device_name()}; torch {torch.__version__}", flush=True)
    results, prev = [], None
    for name in a.shapes.split(","):
        res = compare(shapes[name], a.reps, prev)
        prev = res if prev is None else prev
        results.append(res)
        print(table(res), "\n", flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
