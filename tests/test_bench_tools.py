"""The benchmark tooling: the comparison table's arithmetic and the GPU suite script."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))

from report import markdown_table, rollout_table  # noqa: E402


def test_markdown_table_ratios():
    info = lambda impl, mode="fwd+bwd", flops=6e12, **kw: dict(shape="s", mode=mode, impl=impl, flops=flops, **kw)
    rows = [dict(median=0.300, extra_info=info("eager", peak_extra_mib=4000.0)),
            dict(median=0.150, extra_info=info("liger", peak_extra_mib=900.0)),
            dict(median=0.100, extra_info=info("triton", peak_extra_mib=40.0)),
            dict(median=0.010, extra_info=info("matmul", mode="matmul", flops=2e12))]
    table = markdown_table(rows)
    line = next(l for l in table.splitlines() if "| triton |" in l)
    cells = [c.strip() for c in line.strip("|").split("|")]
    # 6e12 FLOP in 0.1 s = 60 TFLOP/s; matmul 2e12 in 0.01 s = 200 TFLOP/s -> 30%
    assert cells[3:] == ["100.00", "60.0", "30%", "3.00x", "1.50x", "40"]
    assert "200.0 TFLOP/s" in table


def test_rollout_table_compares_engines_on_the_same_rollout():
    info = lambda engine, rate, **kw: dict(bench="rollout", engine=engine, model="m", device="cpu", generated_tokens=512,
                                           generate_tokens_per_s=rate, weight_sync_s=kw.get("sync", 0.0),
                                           engine_start_s=1.0, peak_rss_mib=100.0)
    rows = [dict(median=4.0, extra_info=info("hf", 128.0)), dict(median=8.0, extra_info=info("vllm", 64.0, sync=6.5)),
            dict(median=1.0, extra_info=dict(bench="train_step"))]
    lines = rollout_table(rows).splitlines()
    assert len(lines) == 4
    cells = [c.strip() for c in lines[3].strip("|").split("|")]
    assert cells[2:8] == ["vllm", "8.00", "512", "64.0", "0.50x", "6.50"]


def test_gpu_suite_script_parses():
    out = subprocess.run(["bash", "-n", os.path.join(ROOT, "bench", "gpu_suite.sh")], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


def test_gpu_compare_table_and_targets():
    """The GPU comparison's arithmetic, on made-up figures (the script itself needs CUDA)."""
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    from gpu_compare import VARIANTS, table

    N, D, V = 8192, 5120, 152064
    six = 6.0 * N * D * V
    res = dict(shape="s", N=N, D=D, V=V, matmul_tflops=800.0, floor_6ndv_ms=six / 800e12 * 1e3,
               eager_for_memory=dict(beyond_grads_mib=20000.0))
    for label, *_ in VARIANTS:
        res[label] = dict(ms=100.0, peak_gib=3.0, beyond_grads_mib=500.0)
    res["forward"] = dict(ms=59.0, peak_gib=1.7, beyond_grads_mib=150.0)
    res["liger GRPO"] = dict(ms=120.0, peak_gib=6.0, beyond_grads_mib=4000.0)
    res["eager"] = dict(error="OOM")
    out = table(res)
    line = next(l for l in out.splitlines() if l.startswith("| forward |"))
    cells = [c.strip() for c in line.strip("|").split("|")]
    # 6NDV = 38.27 TFLOP in 59 ms = 649 TFLOP/s; floor 47.8 ms -> 1.23x; Liger 120/59 = 2.03x; 150/20000 = 0.75%
    assert cells[1:] == ["59.0", "649", "1.23", "2.03x", "1.70", "150", "0.75%"]
    assert "1.5x faster than Liger's GRPO loss: 2.03x MET" in out
    assert "6NDV at the matmul rate: 1.23x MET" in out
    assert "1% of eager's: 0.75% MET" in out
    assert "| eager | OOM |" in out
