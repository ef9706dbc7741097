"""agpo_loss's extra memory is memory_budget plus O(N), for every N (measured on CPU).

One fresh process (bench/peak_rss.py's ``measure``: VmHWM growth over one forward +
backward, glibc told to return freed buffers to the OS) runs the tiled torch engine at
two sequence lengths with a small budget. What the call adds beyond its inputs and the
gradients it returns must fit the budget plus a few dozen bytes per token, and must not
grow with N beyond that per-token term (an [N, D] fp32 temporary, as the earlier
backward's dh accumulator, would add 6 MiB between the two). Eager PyTorch at the larger N would need about
16384 x 2048 x 4 B = 128 MiB per fp32 [N, V] tensor, several of them.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BUDGET = 2 * 2**20
PER_TOKEN = 64  # bytes: [6, M] fp32 per-position outputs, sequence ids, weights, masks
SLACK_MIB = 3.0  # allocator granularity, the interpreter-free Python/torch temporaries

SCRIPT = f"""
import json, sys
sys.path.insert(0, {str(ROOT / 'bench')!r})
from peak_rss import measure
from cases import Shape
for backward in ("forward", "recompute"):
    for n in (4096, 16384):
        r = measure(Shape(f"n{{n}}", 128, 2048, 1, n), "torch", backward=backward, memory_budget={BUDGET})
        print(json.dumps(r), flush=True)
"""


@pytest.fixture(scope="module")
def runs():
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]


@pytest.mark.parametrize("backward", ["forward", "recompute"])
def test_extra_memory_is_the_budget_plus_per_token_terms(runs, backward):
    mine = {r["N"]: r for r in runs if r["backward"] == backward}
    assert set(mine) == {4096, 16384}
    for n, r in mine.items():
        bound = (BUDGET + PER_TOKEN * n) / 2**20 + SLACK_MIB
        print(backward, n, r)
        assert r["beyond_grads_mib"] <= bound, (r, bound)
    growth = mine[16384]["beyond_grads_mib"] - mine[4096]["beyond_grads_mib"]
    assert growth <= PER_TOKEN * (16384 - 4096) / 2**20 + 1.0, mine  # flat in N
