"""Fused AGPO loss and log-probs, ours (both designs) against eager PyTorch and Liger-Kernel.

``pytest bench/ --benchmark-only``: one small shape (``cpu-small`` on a CPU,
``qwen2.5-0.5b`` on a GPU); ``--bench-long`` adds the others: on a GPU the 8B-14B model
heads, on a CPU V = 152064 and one 16k-token sequence. Each result carries
shape, dtype, device, FLOPs and (for fwd+bwd) peak extra memory in ``extra_info``; the
comparison table is printed at the end (bench/report.py). The forward-gradient design
("torch", "triton") and Liger form their gradients inside the forward call: their "fwd"
row already holds the backward's GEMMs and their "bwd" row is a hand-back; compare fwd+bwd.
"""

import os
import subprocess
import sys

import pytest
import torch
from cases import CPU_SHAPES, GPU_SHAPES, flops, logprobs_fn, loss_fn, make_inputs

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
DTYPE = torch.bfloat16 if CUDA else torch.float32
DEFAULT_SHAPES = ("cpu-small", "qwen2.5-0.5b")
"""Shapes of the default run; every other shape runs with ``--bench-long``."""
SHAPES = [s if s.name in DEFAULT_SHAPES else pytest.param(s, marks=pytest.mark.bench_long, id=s.name)
          for s in (GPU_SHAPES if CUDA else CPU_SHAPES)]
IMPLS = (["eager", "torch", "torch-recompute", "triton", "triton-recompute", "liger", "liger-ce"] if CUDA
         else ["eager", "torch", "torch-recompute", "liger"])
MODES = ["fwd", "bwd", "fwd+bwd", "logprobs"]
ROUNDS, WARMUP = (5, 2) if CUDA else (3, 1)


def sync():
    if CUDA:
        torch.cuda.synchronize()


def skip_reason(shape, impl, mode):
    if impl.startswith("liger") and mode == "logprobs":
        return "Liger has no log-prob-only op"
    if impl.endswith("-recompute") and mode == "logprobs":
        return "log-probs are the same op in both designs"
    if impl == "liger-ce" and mode != "fwd+bwd":
        return "a reference point for fwd+bwd only"
    if shape.N >= 16384 and mode != "fwd+bwd":
        return "long sequences: fwd+bwd only (time)"
    if shape.N >= 65536 and impl == "eager":
        return "eager: [N, V] fp32 logits do not fit"
    if CUDA and impl.startswith("torch") and shape.D > 1024:
        return "the tiled torch fallback is not the GPU path"
    if impl.startswith("liger"):
        try:
            import liger_kernel  # noqa: F401
        except ImportError:
            return "liger-kernel not installed"
    return None


def peak_extra_mib(shape, impl, x, f):
    """Peak memory growth of one fwd+bwd, the returned gradients (dh, dW) included."""
    if CUDA:
        x["h"].grad = x["W"].grad = None
        sync()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        f(x).backward()
        sync()
        return (torch.cuda.max_memory_allocated() - before) / 2**20
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")  # freed buffers go back: RSS = live memory
    out = subprocess.run([sys.executable, os.path.join(os.path.dirname(__file__), "peak_rss.py"),
                          shape.name, impl], capture_output=True, text=True, timeout=1800, env=env)
    return float(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 else None


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: s.name)
def test_loss(benchmark, shape, impl, mode):
    reason = skip_reason(shape, impl, mode)
    if reason:
        pytest.skip(reason)
    torch.manual_seed(0)
    x = make_inputs(shape, DTYPE, DEVICE)
    info = dict(shape=shape.name, mode=mode, impl=impl, device=DEVICE, dtype=str(DTYPE),
                N=shape.N, D=shape.D, V=shape.V, flops=flops(shape, mode))
    if CUDA:
        info["gpu"] = torch.cuda.get_device_name()
    f = loss_fn(impl) if mode != "logprobs" else logprobs_fn(impl)

    def clear():
        x["h"].grad = x["W"].grad = None

    if mode == "fwd":
        def run():
            f(x)
            sync()
        benchmark.pedantic(run, setup=clear, rounds=ROUNDS, warmup_rounds=WARMUP)
    elif mode == "logprobs":
        benchmark.pedantic(lambda: (f(x), sync()), rounds=ROUNDS, warmup_rounds=WARMUP)
    elif mode == "bwd":
        def setup():
            clear()
            loss = f(x)
            sync()
            return (loss,), {}
        benchmark.pedantic(lambda loss: (loss.backward(), sync()), setup=setup, rounds=ROUNDS,
                           warmup_rounds=WARMUP)
    else:
        def step():
            f(x).backward()
            sync()
        benchmark.pedantic(step, setup=clear, rounds=ROUNDS, warmup_rounds=WARMUP)
        clear()
        info["peak_extra_mib"] = peak_extra_mib(shape, impl, x, f)
    benchmark.extra_info.update(info)


@pytest.mark.skipif(not CUDA, reason="the matmul reference rate is a GPU figure")
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: s.name)
def test_matmul_rate(benchmark, shape):
    """The machine's own bf16 rate on the LM head's GEMM, to quote results against."""
    a = torch.randn(shape.N, shape.D, device=DEVICE, dtype=DTYPE)
    w = torch.randn(shape.V, shape.D, device=DEVICE, dtype=DTYPE)
    benchmark.pedantic(lambda: (a @ w.t(), sync()), rounds=10, warmup_rounds=3)
    benchmark.extra_info.update(dict(shape=shape.name, impl="matmul", mode="matmul",
                                     flops=flops(shape, "fwd"), device=DEVICE, dtype=str(DTYPE)))
