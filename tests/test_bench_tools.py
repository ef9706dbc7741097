"""The benchmark tooling: the comparison table's arithmetic and the GPU suite script."""

import os
import subprocess
import sys

import pytest

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
    from gpu_compare import PER_ROW_T, RIVAL, VARIANTS, table

    N, D, V = 8192, 5120, 152064
    six = 6.0 * N * D * V
    res = dict(shape="s", N=N, D=D, V=V, matmul_tflops=800.0, floor_6ndv_ms=six / 800e12 * 1e3,
               eager_for_memory=dict(beyond_grads_mib=20000.0))
    for label, *_ in VARIANTS:
        res[label] = dict(ms=100.0, peak_gib=3.0, beyond_grads_mib=500.0, reps=30)
    res["forward"] = dict(ms=59.0, peak_gib=1.7, beyond_grads_mib=550.0, reps=30)
    res[RIVAL] = dict(ms=64.9, peak_gib=2.0, beyond_grads_mib=900.0, reps=30)
    res["eager"] = dict(error="OOM")
    out = table(res)
    line = next(l for l in out.splitlines() if l.startswith("| forward |"))
    cells = [c.strip() for c in line.strip("|").split("|")]
    # 6NDV = 38.27 TFLOP in 59 ms = 649 TFLOP/s; floor 47.8 ms -> 1.23x; rival 64.9/59 = 1.10x; 550/20000 = 2.75%
    assert cells[1:] == ["59.0 (30)", "649", "1.23", "1.10x", "1.70", "550", "2.75%"]
    assert "same surrogate: 1.10x MET" in out
    assert "6NDV at the matmul rate: 1.23x MET" in out
    assert "3% of eager's: 2.75% MET" in out
    assert "| eager | OOM |" in out
    res[PER_ROW_T[1]] = dict(ms=80.0, peak_gib=2.5, beyond_grads_mib=1400.0, reps=30)
    assert "in the kernel 100.0 ms, 500 MiB beyond grads; Liger with h / T 80.0 ms, 1400 MiB: 0.80x" in table(res)
    res["forward"]["ms"] = 70.0
    assert "same surrogate: 0.93x MISSED" in table(res)


def test_rival_objective_is_the_same_loss():
    """The Liger log-prob rival gets the surrogate computed on its per-token log-probs; fed
    exact log-probs, that objective equals agpo_loss's own (value and gradients)."""
    import torch
    from cases import Shape, loss_fn, make_inputs, surrogate_on_logprobs

    from agpo_kernels import linear_logprobs

    x = make_inputs(Shape("t", 32, 101, 3, 7), torch.float32, "cpu", seed=3)
    x["mask"][1, 4:] = False
    ours = loss_fn("eager")(x)
    g_ours = torch.autograd.grad(ours, (x["h"], x["W"]))
    logp, _ = linear_logprobs(x["h"], x["W"], x["y"], impl="reference", ignore_index=None)
    theirs = surrogate_on_logprobs(logp, x)
    g_theirs = torch.autograd.grad(theirs, (x["h"], x["W"]))
    assert torch.allclose(ours, theirs, rtol=1e-5)
    assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-7) for a, b in zip(g_ours, g_theirs))


@pytest.mark.parametrize("impl", ["eager", "torch", "triton", "liger-logprob"])
def test_per_row_temperature_variants_use_the_temperatures(impl):
    """The per-row temperature pair of bench/gpu_compare.py: agpo with ``x["temp"]`` in the
    kernel and Liger's log-prob op fed ``h / T`` at temperature 1 both give the float64
    oracle's loss and gradients at those temperatures, and not the temperature-1 loss."""
    import torch
    from cases import BETA, EPS, Shape, loss_fn, make_inputs
    from gpu_compare import PER_ROW_T, VARIANTS
    from oracle import oracle_loss
    from tolerance import assert_close_scaled

    if impl == "liger-logprob":
        pytest.importorskip("liger_kernel")
    kinds = {label: (case, kw) for label, case, kw, _ in VARIANTS}
    assert kinds[PER_ROW_T[0]] == ("triton", {"per_row_t": True}) and kinds["forward"] == ("triton", {})
    assert kinds[PER_ROW_T[1]] == ("liger-logprob", {"per_row_t": True})
    D, V = 32, 101
    x = make_inputs(Shape("t", D, V, 3, 7), torch.float32, "cpu", seed=5)
    x["mask"][2, 5:] = False
    assert x["temp"].dtype == torch.float32 and x["temp"].shape == (3,)
    assert float(x["temp"].min()) >= 0.6 and float(x["temp"].max()) <= 1.3 and len(set(x["temp"].tolist())) == 3
    want, _ = oracle_loss(x["h"], x["W"], x["y"], x["adv"], x["old"], x["mask"], eps_low=EPS, eps_high=EPS,
                          temperature=x["temp"], ref=x["ref"], beta=BETA)
    at_one, _ = oracle_loss(x["h"], x["W"], x["y"], x["adv"], x["old"], x["mask"], eps_low=EPS, eps_high=EPS,
                            temperature=1.0, ref=x["ref"], beta=BETA)
    g_want = torch.autograd.grad(want, (x["h"], x["W"]))
    got = loss_fn(impl, per_row_t=True)(x)
    g_got = torch.autograd.grad(got, (x["h"], x["W"]))
    expected = dict(loss=want, dh=g_want[0], dW=g_want[1])
    assert_close_scaled(dict(loss=got, dh=g_got[0], dW=g_got[1]), expected, dtype=torch.float32, n_reduce=D * V,
                        what=f"{impl} per-row T: ")
    want, at_one, got = float(want.detach()), float(at_one.detach()), float(got.detach())
    assert abs(want - at_one) > 1e3 * abs(got - want), (want, at_one, got)


def test_update_step_runs_on_a_small_model_and_solves_for_tokens(tmp_path):
    """bench/update_step.py (the suite's update step) on a CPU-sized Qwen2; and its
    tokens-at-fixed-memory arithmetic on made-up peaks."""
    from update_step import tokens_at

    # peaks 10 and 14 GiB at 4096 and 8192 tokens: 1 GiB per 1024 tokens; 30 GiB -> 24576
    assert tokens_at({4096: 10.0, 8192: 14.0}, [4096, 8192], 30.0) == 24576
    assert tokens_at({4096: 10.0, 8192: None}, [4096, 8192], 30.0) is None
    out = tmp_path / "u.json"
    r = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "update_step.py"), "--small", "--device", "cpu",
                        "--tokens", "32,64", "--seq", "16", "--reps", "1", "--json", str(out)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    import json

    res = json.loads(out.read_text())
    assert set(res["rows"]) == {"fused 32", "eager 32", "fused 64", "eager 64"}
    assert all(v["ms"] > 0 for v in res["rows"].values())
    assert "| fused | 64 |" in r.stdout
