"""Every shipped Triton configuration compiles for sm_80, sm_90, sm_100 and sm_120 without a GPU.

Checks the cubin's shared memory against each architecture's limit, that no build spills
(except the documented D % 16 != 0 variant), that the GEMM-shaped kernels pipeline their
loads with asynchronous copies and use the architecture's tensor-core instructions
(wgmma on sm_90, tcgen05 on sm_100, mma on sm_80/sm_120), and that the common variants
(no bias, scalar temperature, D % BLOCK_K != 0) build as well as the default ones.
"""

import json
import os
import subprocess
import sys

import pytest

from agpo_kernels.compile_report import SMEM_LIMIT
from agpo_kernels.triton_engine.config import ARCHS


@pytest.fixture(scope="module")
def report():
    # A fresh process without TRITON_INTERPRET: the interpreter cannot compile kernels.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    out = subprocess.run([sys.executable, "-m", "agpo_kernels.compile_report", "--json"],
                         env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def gemm(r):
    return r["kind"] in ("fwd", "bwd")


def test_every_shipped_config_and_variant_compiles_and_fits(report):
    built = {(r["arch"], r["kind"], r["variant"] != "default") for r in report}
    for arch in ARCHS:
        for kind in ("fwd", "bwd"):
            assert (arch, kind, False) in built and (arch, kind, True) in built, (arch, kind)
        assert (arch, "rows", False) in built, arch
    assert any(r["kind"] == "rows" and r["variant"] != "default" for r in report)
    for r in report:
        print(r)
        assert 0 < r["shared"] <= SMEM_LIMIT[r["arch"]], r
        assert r["regs"] <= 255, r


def test_no_spills_and_pipelined_loads(report):
    for r in report:
        if "D%16!=0" in r["variant"]:  # unaligned rows: correct, but no 16-byte cp.async
            assert r["async_copies"] == 0, r
            continue
        assert r["spill_bytes"] == 0 and r["local_ops"] == 0, r
        if gemm(r):
            assert r["async_copies"] > 0, r  # software pipelining really happened


def test_tensor_core_instructions_per_architecture(report):
    for r in filter(gemm, report):
        expect = {80: "mma", 90: "wgmma", 100: "tcgen05", 120: "mma"}[r["arch"]]
        assert r[expect] > 0, r
        assert sum(r[k] for k in ("mma", "wgmma", "tcgen05") if k != expect) == 0, r


def test_row_kernel_moves_logits_in_128_bit_accesses(report):
    """Built as it runs at the 14B head (V = 152064 is a multiple of 16), the row pass loads
    its fp32 logits and stores dz 16 bytes at a time: it is bandwidth-bound, and scalar
    accesses (what a build without V's divisibility shows) would be the slower kernel."""
    rows = [r for r in report if r["kind"] == "rows"]
    assert rows
    for r in rows:
        assert r["wide_global"] > 0, r
