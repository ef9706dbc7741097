"""Every shipped Triton configuration compiles for sm_80 and sm_90 without a GPU.

Checks the cubin's shared memory against each architecture's limit, that the sm_90
builds do not spill and use wgmma with asynchronous copies, and that sm_80 uses mma.
"""

import json
import os
import subprocess
import sys

import pytest

from agpo_kernels.compile_report import SMEM_LIMIT


@pytest.fixture(scope="module")
def report():
    # A fresh process without TRITON_INTERPRET: the interpreter cannot compile kernels.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-m", "agpo_kernels.compile_report", "--json"],
                         env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_every_shipped_config_compiles_and_fits(report):
    assert {(r["arch"], r["kind"]) for r in report} == {(a, k) for a in (80, 90) for k in ("fwd", "bwd")}
    for r in report:
        print(r)
        assert 0 < r["shared"] <= SMEM_LIMIT[r["arch"]], r
        assert r["regs"] <= 255, r
        assert r["async_copies"] > 0, r  # software pipelining really happened


def test_sm90_no_spills_and_wgmma(report):
    for r in (r for r in report if r["arch"] == 90):
        assert r["spill_bytes"] == 0 and r["local_ops"] == 0, r
        assert r["wgmma"] > 0, r


def test_sm80_uses_mma(report):
    for r in (r for r in report if r["arch"] == 80):
        assert r["mma"] > 0 and r["wgmma"] == 0, r
