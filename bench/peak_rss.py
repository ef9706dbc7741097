"""Peak resident memory of one forward+backward on CPU, measured in a fresh process.

    python bench/peak_rss.py SHAPE IMPL [--backward forward|recompute] [--budget BYTES] [--json]
    python bench/peak_rss.py --shape N,D,V IMPL ...

prints the peak RSS growth in MiB over the RSS after the inputs were built (the fair CPU
counterpart of CUDA's max_memory_allocated); with ``--json`` also the size of the returned
gradients and the growth beyond them (what ``memory_budget`` bounds). Run it with
``MALLOC_MMAP_THRESHOLD_=65536`` so that freed buffers go back to the OS and the RSS tracks
live memory (the test suite does).
"""

import argparse
import json
import os
import sys

os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, os.path.dirname(__file__))

import torch  # noqa: E402
from cases import CPU_SHAPES, GPU_SHAPES, MEMORY_SHAPES, Shape, loss_fn, make_inputs  # noqa: E402


def status_mib(field: str) -> float:
    """A ``/proc/self/status`` size field (VmRSS, VmHWM) in MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def rss_mib() -> float:
    return status_mib("VmRSS")


def reset_peak() -> None:
    """Resets VmHWM to the current RSS (Linux >= 4.0). ru_maxrss cannot be used: Linux
    carries it over execve from the parent, a benchmark process with a large peak."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def measure(shape: Shape, impl: str, dtype=torch.float32, **loss_kw) -> dict:
    f = loss_fn(impl, **loss_kw)
    # Warm up on a tiny problem first: lazy imports, compilation and the allocator's and
    # thread pools' first allocations must not count as the op's memory.
    tiny = make_inputs(Shape("tiny", 16, 64, 1, 4), dtype, "cpu")
    f(tiny).backward()
    x = make_inputs(shape, dtype, "cpu")
    grads_mib = (x["h"].numel() + x["W"].numel()) * x["h"].element_size() / 2**20
    reset_peak()
    before = rss_mib()
    f(x).backward()  # .grad was None: the returned gradients become .grad without a copy
    peak = max(status_mib("VmHWM") - before, 0.0)
    return dict(shape=shape.name, N=shape.N, D=shape.D, V=shape.V, impl=impl, peak_extra_mib=round(peak, 1),
                grads_mib=round(grads_mib, 1), beyond_grads_mib=round(peak - grads_mib, 1), **loss_kw)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("shape", nargs="?", help="a named shape of bench/cases.py")
    ap.add_argument("impl", help="eager, torch, triton or liger")
    ap.add_argument("--shape", dest="dims", help="N,D,V instead of a named shape")
    ap.add_argument("--backward", choices=("forward", "recompute"))
    ap.add_argument("--budget", type=int, help="memory_budget in bytes")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    if a.dims:
        N, D, V = (int(v) for v in a.dims.split(","))
        shape = Shape(f"n{N}-d{D}-v{V}", D, V, 1, N)
    else:
        shape = {s.name: s for s in CPU_SHAPES + GPU_SHAPES + MEMORY_SHAPES}[a.shape]
    kw = {k: v for k, v in (("backward", a.backward), ("memory_budget", a.budget)) if v is not None}
    res = measure(shape, a.impl, getattr(torch, a.dtype), **kw)
    print(json.dumps(res) if a.json else f"{res['peak_extra_mib']:.1f}")


if __name__ == "__main__":
    main()
