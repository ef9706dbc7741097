"""Peak resident memory of one forward+backward on CPU, measured in a fresh process.

``python bench/peak_rss.py SHAPE IMPL`` prints the peak RSS growth in MiB over the RSS
after the inputs were built: the fair CPU counterpart of CUDA's max_memory_allocated.
"""

import os
import resource
import sys

os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, os.path.dirname(__file__))

import torch  # noqa: E402

from cases import CPU_SHAPES, GPU_SHAPES, loss_fn, make_inputs  # noqa: E402


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def main(shape_name: str, impl: str, dtype: str = "float32") -> None:
    shape = {s.name: s for s in CPU_SHAPES + GPU_SHAPES}[shape_name]
    x = make_inputs(shape, getattr(torch, dtype), "cpu")
    f = loss_fn(impl)
    # Grad buffers are outputs every implementation must produce: allocate them first.
    x["h"].grad = torch.zeros_like(x["h"])
    x["W"].grad = torch.zeros_like(x["W"])
    before = rss_mib()
    f(x).backward()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"{max(peak - before, 0.0):.1f}")


if __name__ == "__main__":
    main(*sys.argv[1:])
