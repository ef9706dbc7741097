"""GPU comparison of the fused AGPO head against its floor and its real rivals.

    python bench/gpu_compare.py [--shapes qwen2.5-14b,qwen2.5-14b-n65536] [--reps 30] [--json OUT]

For each shape (bf16): the device's own bf16 matmul rate on ``[N, D] x [D, V]``, then one
forward + backward of: the forward-gradient design (its default budget, which on a GPU holds
at least 1024 rows, and a 256 MiB budget), the recompute design, eager PyTorch, Liger's fused
linear + log-prob + entropy op with the same surrogate on its outputs (the real rival),
a per-row temperature pair (per-sequence temperatures in [0.6, 1.3]: the forward-gradient
design takes them in the kernel; Liger's op, whose temperature is a scalar, gets them as
verl's fused heads do, ``h / T`` per row in fp32 cast back to bf16, then temperature 1),
Liger's fused linear cross-entropy (a floor for any chunked cuBLAS design) and Liger's GRPO
loss (its 0.8.5 backward runs fp32 GEMMs: a slow reference, not a target). Each row: the
median (p50) of up to ``--reps`` timed calls after a warm-up (fewer where a call is slow, so
that a variant takes about 10 s), TFLOP/s counting 6NDV, and peak memory beyond the inputs
and the returned gradients, the way Liger's kernel PRs report. The JSON is rewritten after
every variant, so a run cut short keeps what it measured.
Targets (forward-gradient design, default budget): at most 1.25x the time of 6NDV at the
measured matmul rate, no slower than Liger's fused log-prob op, extra memory at most 3% of
eager's (eager's extrapolated linearly in N where it runs out of memory).
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
VARIANTS = [  # (label, impl in cases.py, loss_fn keywords, use the Triton logits GEMM)
    ("forward", "triton", {}, False),
    ("forward, 256 MiB budget", "triton", {"memory_budget": 256 * 2**20}, False),
    ("forward, Triton logits GEMM", "triton", {}, True),
    ("recompute", "triton-recompute", {}, False),
    ("eager", "eager", {}, False),
    ("liger fused log-prob + entropy", "liger-logprob", {}, False),
    ("forward, per-row T", "triton", {"per_row_t": True}, False),  # temperatures in the kernel
    ("liger log-prob, per-row T as h / T", "liger-logprob", {"per_row_t": True}, False),
    ("liger fused linear CE", "liger-ce", {}, False),
    ("liger GRPO (fp32 backward)", "liger", {}, False),
]
RIVAL = "liger fused log-prob + entropy"
PER_ROW_T = ("forward, per-row T", "liger log-prob, per-row T as h / T")  # (ours, Liger's route)
SECONDS_PER_VARIANT = 10.0


def timed(fn, reps: int) -> tuple[float, int]:
    """``(median ms, runs)`` of ``fn`` over at most ``reps`` runs after one warm-up; fewer
    runs (at least 3) where one takes long, to stay near SECONDS_PER_VARIANT."""
    t0 = torch.cuda.Event(enable_timing=True)
    t1 = torch.cuda.Event(enable_timing=True)
    t0.record()
    fn()
    t1.record()
    torch.cuda.synchronize()
    first_s = t0.elapsed_time(t1) / 1e3
    reps = max(3, min(reps, int(SECONDS_PER_VARIANT / max(first_s, 1e-4))))
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times), reps


def matmul_rate(shape) -> float:
    h = torch.randn(shape.N, shape.D, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(shape.V, shape.D, device="cuda", dtype=torch.bfloat16)
    ms, _ = timed(lambda: h @ w.t(), 10)
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

        ms, runs = timed(step, reps)
        x["h"].grad = x["W"].grad = None
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        f(x).backward()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - before
        grads = (x["h"].numel() + x["W"].numel()) * 2
        return dict(ms=ms, peak_gib=peak / GiB, beyond_grads_mib=(peak - grads) / 2**20,
                    reps=runs)
    except torch.cuda.OutOfMemoryError as e:
        return dict(error=f"OOM ({str(e).splitlines()[0][:80]})")
    except Exception as e:  # a missing Liger, an unsupported option: report, go on
        return dict(error=f"{type(e).__name__}: {str(e).splitlines()[0][:120]}")
    finally:
        triton_impl.logits = saved
        x["h"].grad = x["W"].grad = None
        gc.collect()
        torch.cuda.empty_cache()


def compare(shape, reps: int, eager_ref: dict | None, save=lambda res: None) -> dict:
    """Measures every variant on one shape; ``save(partial result)`` after each."""
    rate = matmul_rate(shape)
    res = dict(shape=shape.name, N=shape.N, D=shape.D, V=shape.V, matmul_tflops=rate / 1e12,
               floor_6ndv_ms=3 * flops(shape, "fwd") / rate * 1e3)  # 6NDV at the measured matmul rate
    x = make_inputs(shape, torch.bfloat16, "cuda")  # once per shape, shared by the variants
    for label, impl, kw, tg in VARIANTS:
        res[label] = run_variant(x, impl, kw, tg, reps)
        print(f"  {shape.name} {label}: {res[label]}", flush=True)
        save(res)
    del x
    gc.collect()
    torch.cuda.empty_cache()
    eager = res["eager"]
    if "error" in eager and eager_ref and "error" not in eager_ref["eager"]:  # extrapolate in N
        scale = shape.N / eager_ref["N"]
        eager = dict(beyond_grads_mib=eager_ref["eager"]["beyond_grads_mib"] * scale, extrapolated=True)
    res["eager_for_memory"] = eager
    save(res)
    return res


def table(res: dict) -> str:
    six = 3 * 2.0 * res["N"] * res["D"] * res["V"]
    rival = res.get(RIVAL, {}).get("ms")
    eager_mem = res.get("eager_for_memory", res.get("eager", {})).get("beyond_grads_mib")
    out = [f"### {res['shape']}: N={res['N']} D={res['D']} V={res['V']}, bf16; matmul {res['matmul_tflops']:.0f} "
           f"TFLOP/s, 6NDV at that rate = {res['floor_6ndv_ms']:.1f} ms",
           "", "| variant | p50 ms (calls) | TFLOP/s (6NDV) | x 6NDV time | speed vs Liger log-prob | peak GiB "
           "(incl. grads) | beyond grads MiB | % of eager's |", "|---|---|---|---|---|---|---|---|"]
    for label, *_ in VARIANTS:
        r = res.get(label)
        if r is None:
            continue
        if "error" in r:
            out.append(f"| {label} | {r['error']} | | | | | | |")
            continue
        pct = f"{100 * r['beyond_grads_mib'] / eager_mem:.2f}%" if eager_mem else "-"
        speed = f"{rival / r['ms']:.2f}x" if rival else "-"
        out.append(f"| {label} | {r['ms']:.1f} ({r.get('reps', '?')}) | {six / r['ms'] / 1e9:.0f} "
                   f"| {r['ms'] / res['floor_6ndv_ms']:.2f} | {speed} | {r['peak_gib']:.2f} "
                   f"| {r['beyond_grads_mib']:.0f} | {pct} |")
    fwd = res.get("forward", {})
    if "ms" in fwd:
        ratio = fwd["ms"] / res["floor_6ndv_ms"]
        lines = [f"time <= 1.25x that of 6NDV at the matmul rate: {ratio:.2f}x {'MET' if ratio <= 1.25 else 'MISSED'}"]
        if rival:
            lines.append(f"no slower than Liger's fused log-prob + entropy op with the same surrogate: "
                         f"{rival / fwd['ms']:.2f}x {'MET' if fwd['ms'] <= rival else 'MISSED'}")
        if eager_mem:
            pct = 100 * fwd["beyond_grads_mib"] / eager_mem
            note = (" (eager's memory extrapolated from the smaller N)"
                    if res.get("eager_for_memory", {}).get("extrapolated") else "")
            lines.append(f"extra memory at most 3% of eager's: {pct:.2f}% {'MET' if pct <= 3 else 'MISSED'}{note}")
        out += ["", "targets (forward-gradient design, default budget):"] + [f"- {x}" for x in lines]
    ours, theirs = (res.get(k, {}) for k in PER_ROW_T)
    if "ms" in ours and "ms" in theirs:
        out += ["", f"per-row temperature (not a target): in the kernel {ours['ms']:.1f} ms, "
                f"{ours['beyond_grads_mib']:.0f} MiB beyond grads; Liger with h / T {theirs['ms']:.1f} ms, "
                f"{theirs['beyond_grads_mib']:.0f} MiB: {theirs['ms'] / ours['ms']:.2f}x its time"]
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description="fused head vs its floor and Liger, on one GPU")
    ap.add_argument("--shapes", default="qwen2.5-14b,qwen2.5-14b-n65536")
    ap.add_argument("--reps", type=int, default=30, help="timed calls per variant at most (p50 reported)")
    ap.add_argument("--json", help="results file, rewritten after every variant")
    a = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("gpu_compare.py needs a CUDA device")
    shapes = {s.name: s for s in GPU_SHAPES}
    print(f"{torch.cuda.get_device_name()}; torch {torch.__version__}", flush=True)
    results, prev = [], None

    def save(partial):
        if a.json:  # in place (no temporary file: the suite returns at most 8 files)
            with open(a.json, "w") as f:
                json.dump(results + [partial], f, indent=1)

    for name in a.shapes.split(","):
        res = compare(shapes[name], a.reps, prev, save)
        prev = res if prev is None else prev
        results.append(res)
        print(table(res), "\n", flush=True)


if __name__ == "__main__":
    main()
