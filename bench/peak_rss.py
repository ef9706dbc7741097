"""Peak resident memory of one forward+backward on CPU, measured in a fresh process.

``python bench/peak_rss.py SHAPE IMPL`` prints the peak RSS growth in MiB over the RSS
after the inputs were built: the fair CPU counterpart of CUDA's max_memory_allocated.
"""

import os
import sys

os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, os.path.dirname(__file__))

import torch  # noqa: E402

from cases import CPU_SHAPES, GPU_SHAPES, MEMORY_SHAPES, loss_fn, make_inputs  # noqa: E402


def _status_mib(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def rss_mib() -> float:
    return _status_mib("VmRSS")


def reset_peak() -> None:
    """Resets VmHWM to the current RSS (Linux >= 4.0). ru_maxrss cannot be used: Linux
    carries it over execve from the parent, a benchmark process with a large peak."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def main(shape_name: str, impl: str, dtype: str = "float32") -> None:
    shape = {s.name: s for s in CPU_SHAPES + GPU_SHAPES + MEMORY_SHAPES}[shape_name]
    f = loss_fn(impl)
    # Warm up on a tiny problem first: lazy imports, compilation and the allocator's and
    # thread pools' first allocations must not count as the op's memory.
    tiny = make_inputs(type(shape)("tiny", 16, 64, 1, 4), getattr(torch, dtype), "cpu")
    f(tiny).backward()
    x = make_inputs(shape, getattr(torch, dtype), "cpu")
    # Grad buffers are outputs every implementation must produce: allocate them first.
    x["h"].grad = torch.zeros_like(x["h"])
    x["W"].grad = torch.zeros_like(x["W"])
    reset_peak()
    before = rss_mib()
    f(x).backward()
    print(f"{max(_status_mib('VmHWM') - before, 0.0):.1f}")


if __name__ == "__main__":
    main(*sys.argv[1:])
