"""The training loop on the tiny preset: real HF model, real generate, real files.

Covers the issue's list: per-row temperature really applied, the controllers' eps and
tau reach the loss and the sampler, an update descends the loss on a fixed batch,
micro-batching gives the same gradient as one batch, no tokens x vocab tensor exists in a
step, resume equivalence (also after a real SIGTERM to a ``python -m agpo.train``
process), bad flags and missing model paths.
"""

import copy
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from tolerance import assert_close_scaled, rounding_tol
from torch.utils._python_dispatch import TorchDispatchMode

import agpo.learn.policy
import agpo.rollout.hf
from agpo.config import ConfigError, TrainConfig, config_from_args
from agpo.learn.launch import resolve_defaults, run
from agpo.learn.packing import micro_batches
from agpo.learn.schedule import lr_lambda
from agpo.learn.trainer import TIME_KEYS, Trainer
from agpo.rollout import RowTemperature, sample_groups
from agpo.runtime import checkpoint as ckpt
from agpo.runtime.guard import EXIT_PREEMPTED
from agpo.runtime.metrics_log import read_metrics
from agpo.train import main

ROOT = Path(__file__).resolve().parents[1]


def small_cfg(tmp_path=None, **run_kw) -> TrainConfig:
    cfg = TrainConfig()
    cfg.rollout.prompts_per_step, cfg.rollout.group_size = 4, 4
    cfg.warmup.sft_steps = 40
    cfg.run.steps, cfg.run.eval_size, cfg.run.progress = 4, 16, False
    if tmp_path is not None:
        cfg.run.out_dir = str(tmp_path / "run")
    for k, v in run_kw.items():
        setattr(cfg.run, k, v)
    return resolve_defaults(cfg)


def test_row_temperature_divides_each_row():
    scores = torch.randn(3, 7, dtype=torch.float64)
    tau = torch.tensor([0.5, 1.0, 2.0])
    out = RowTemperature(tau)(None, scores.clone())
    torch.testing.assert_close(out, scores / tau.double().view(3, 1), rtol=0, atol=0)
    with pytest.raises(ValueError, match="tau"):
        RowTemperature(torch.tensor([1.0, 0.0]))


def test_per_row_temperature_reaches_generate(warm):
    """Group 0 at tau=1e-4 reproduces greedy decoding; group 1 at tau=20 is near-uniform."""
    model, tok, _ = warm
    prompts = ["12+34=", "12+34="]
    torch.manual_seed(1)
    roll = sample_groups(model, tok, prompts, torch.tensor([1e-4, 20.0]), group_size=16, max_new_tokens=5)
    greedy = model.generate(**tok(prompts[:1], return_tensors="pt"), do_sample=False, max_new_tokens=5)
    greedy_text = tok.decode(greedy[0, 6:], skip_special_tokens=True)
    cold, hot = roll.texts[:16], roll.texts[16:]
    assert cold == [greedy_text] * 16
    assert len(set(hot)) >= 12, hot
    torch.testing.assert_close(roll.batch.temperature, torch.tensor([1e-4] * 16 + [20.0] * 16))
    # the mask ends at the first EOS (inclusive), padding after it
    ids, mask = roll.batch.completion_ids, roll.batch.completion_mask
    for r in range(32):
        n = int(mask[r].sum())
        assert mask[r, :n].all() and not mask[r, n:].any()
        assert (ids[r, :n - 1] != tok.eos_token_id).all()


def _designed_rewards(pattern):
    """A reward that ignores the text: call ``i`` returns ``pattern[i % len(pattern)]``. The
    trainer scores a phase's rows in order, so every phase gets exactly ``pattern``."""
    calls = [0]

    def reward(prompt, completion, reference):
        calls[0] += 1
        return pattern[(calls[0] - 1) % len(pattern)]
    return reward


def _expected_tau(sigmas, baseline, ctl):
    """docs/algorithm.md#temperature-controller in float64, written out here: ``u = w_r sigma`` (w_e = w_k = 0), the
    baseline kept at or above ``baseline_min``."""
    taus = []
    for s in sigmas:
        u = ctl.w_r * s
        if baseline <= ctl.uncertainty_floor:
            c, baseline = 0.0, max(u, ctl.baseline_min)
        else:
            c = (u - baseline) / (baseline + ctl.uncertainty_floor)
            baseline = max(ctl.ema_alpha * u + (1 - ctl.ema_alpha) * baseline, ctl.baseline_min)
        taus.append(min(max(ctl.tau_base * (1 + ctl.lambda_temp * c), ctl.tau_min), ctl.tau_max))
    return taus, baseline


@pytest.mark.parametrize("reuse", [None, False], ids=["default", "no-probe-reuse"])
def test_default_agpo_step_trains_on_its_probe(warm, monkeypatch, reuse):
    """By default an AGPO step's update learns from each prompt's train group and its probe
    (G + G rows, with the prompt's eps on both); ``--no-probe-reuse`` from the train group alone."""
    model, tok, train = warm
    cfg = small_cfg()
    cfg.rollout.probe_reuse = reuse
    tr = Trainer(cfg, copy.deepcopy(model), tok, train)
    rows, real_loss = [], agpo.learn.policy.agpo_loss

    def spy_loss(*a, **kw):
        rows.append(kw["eps_low"].numel())
        return real_loss(*a, **kw)

    monkeypatch.setattr(agpo.learn.policy, "agpo_loss", spy_loss)
    m = tr.step()
    P, G, epochs = cfg.rollout.prompts_per_step, cfg.rollout.group_size, cfg.optim.update_epochs
    assert m["tokens/generated_probe"] > 0
    assert sum(rows) == epochs * P * (2 * G if reuse is None else G)


def test_controllers_reach_loss_and_sampler(warm, monkeypatch):
    """The controllers' per-group tau reaches ``generate`` and the loss, their per-group eps
    the loss. The situation is built, not sampled: rewards designed per group (reward
    dispersions 0, 0.5, 0.58, 0.5 within the groups) and vote entropy out of the
    uncertainty (``w_e = 0``) force known, distinct temperatures on every machine."""
    model, tok, train = warm
    cfg = small_cfg()
    cfg.controller.w_e, cfg.rollout.probe_reuse = 0.0, False  # the loss sees the train rows alone
    cfg.rollout.reward = _designed_rewards([0, 0, 0, 0, 1, 0, 0, 0, 1, 1, 0, 0, 0, 1, 1, 1])
    sigmas = [0.0, 0.5, (1 / 3) ** 0.5, 0.5]
    tr = Trainer(cfg, copy.deepcopy(model), tok, train)
    tr.controller.baseline = 0.4  # a warm baseline: every group is centred against it
    seen = {"tau": [], "eps": [], "loss_eps": [], "loss_temp": []}
    real_sample, real_loss, real_clip = agpo.rollout.hf.sample_groups, agpo.learn.policy.agpo_loss, tr.controller.clip_step

    def spy_sample(*a, **kw):
        seen["tau"].append(a[3].clone())
        return real_sample(*a, **kw)

    def spy_loss(*a, **kw):
        seen["loss_eps"].append(kw["eps_low"].cpu())
        seen["loss_temp"].append(kw["temperature"].cpu())
        return real_loss(*a, **kw)

    def spy_clip(h, **kw):
        eps = real_clip(h, **kw)
        seen["eps"].append(eps.clone())
        return eps

    monkeypatch.setattr(agpo.rollout.hf, "sample_groups", spy_sample)
    monkeypatch.setattr(agpo.learn.policy, "agpo_loss", spy_loss)
    monkeypatch.setattr(tr.controller, "clip_step", spy_clip)
    want1, b = _expected_tau(sigmas, 0.4, cfg.controller)
    want2, _ = _expected_tau(sigmas, b, cfg.controller)
    for _ in range(2):
        tr.step()
    tau = torch.tensor(tr.controller.probe.tau)
    torch.testing.assert_close(torch.tensor(tr.controller.probe.tau, dtype=torch.float64),
                               torch.tensor(want2, dtype=torch.float64), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(seen["tau"][1], torch.tensor(want1, dtype=torch.float32))  # step 1's train groups
    assert len(set(want2)) == len(want2), want2  # the built situation gives distinct temperatures
    probe_tau, train_tau = seen["tau"][-2], seen["tau"][-1]
    assert torch.all(probe_tau == cfg.controller.tau_base)
    torch.testing.assert_close(train_tau, tau)
    G, epochs = cfg.rollout.group_size, cfg.optim.update_epochs
    per_row_eps = seen["eps"][-1].repeat_interleave(G)
    calls = len(seen["loss_eps"]) // 2  # the last step's calls: the second half
    loss_eps = torch.cat(seen["loss_eps"][calls:])
    loss_temp = torch.cat(seen["loss_temp"][calls:])
    assert loss_eps.numel() == epochs * per_row_eps.numel()
    torch.testing.assert_close(loss_eps.sort().values, per_row_eps.repeat(epochs).sort().values)
    torch.testing.assert_close(loss_temp.sort().values, tau.repeat_interleave(G).repeat(epochs).sort().values)


def _fixed_batch(warm, rows_seed=0):
    model, tok, train = warm
    torch.manual_seed(rows_seed)
    roll = sample_groups(model, tok, [p.prompt for p in train[:4]], torch.ones(4), group_size=4, max_new_tokens=5)
    adv = torch.randn(roll.batch.rows, generator=torch.Generator().manual_seed(rows_seed))
    return roll.batch, adv


def _capture_grads(tr) -> list[dict]:
    """The gradients each optimiser step of ``tr`` is about to apply, by parameter name."""
    names = {id(p): n for n, p in tr.model.named_parameters()}
    seen = []

    def hook(opt, args, kwargs):
        seen.append({names[id(p)]: p.grad.detach().clone() for g in opt.param_groups for p in g["params"]
                     if p.grad is not None})
    tr.optimizer.register_step_pre_hook(hook)
    return seen


def test_update_descends_the_clipped_surrogate(warm):
    """One update step lowers the loss by what its gradient predicts, and no number of
    steps takes the clipped surrogate below its bound. Both hold for every correct
    implementation on every machine: at ratio 1 the surrogate is smooth, so a small
    AdamW step (the first: ``-lr * g / (|g| + eps)``) lowers it by
    ``lr * sum g^2 / (|g| + eps)`` to first order; and clipping bounds the fall by
    ``eps_clip * mean|A|`` (every ratio at its clip edge)."""
    model, tok, train = warm
    cfg = small_cfg()
    cfg.optim.update_epochs, cfg.optim.grad_clip = 1, 0.0
    tr = Trainer(cfg, copy.deepcopy(model), tok, train)
    grads = _capture_grads(tr)
    batch, adv = _fixed_batch(warm)
    old, _ = tr.score(tr.policy, batch)
    eps = torch.full((batch.rows,), 0.2)
    mask = batch.completion_mask
    lr = 1e-6
    for group in tr.optimizer.param_groups:
        group["lr"] = lr
    tr.scheduler.base_lrs = [lr] * len(tr.scheduler.base_lrs)
    losses = [tr.update(batch, adv, eps, old, None)["loss/policy"] for _ in range(2)]
    assert losses[0] == pytest.approx(-float((adv.view(-1, 1) * mask).sum() / mask.sum()), abs=1e-5)  # ratio 1
    adam_eps = tr.optimizer.defaults["eps"]
    predicted = lr * sum(float((g * g / (g.abs() + adam_eps)).sum()) for g in grads[0].values())
    assert predicted > 100 * 1e-7 * abs(losses[0]), predicted  # well above the loss's own fp32 rounding
    assert losses[0] - losses[1] == pytest.approx(predicted, rel=0.05), (losses, predicted)

    for group in tr.optimizer.param_groups:
        group["lr"] = 1e-3
    tr.scheduler.base_lrs = [1e-3] * len(tr.scheduler.base_lrs)
    losses += [tr.update(batch, adv, eps, old, None)["loss/policy"] for _ in range(10)]
    bound = 0.2 * float((adv.abs().view(-1, 1) * mask).sum() / mask.sum())
    assert min(losses) >= losses[0] - bound - 1e-5, (losses, bound)


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_micro_batches_give_the_same_update(warm, agg):
    """Gradient accumulation over micro-batches gives the gradient (and loss) of one batch.
    Compared is what micro-batching promises, the accumulated gradient an optimiser step
    applies, within the rounding bound of fp32 sums over the batch's tokens and hidden
    size (tests/tolerance.py); not the parameters after AdamW, whose first step
    ``lr * g / (|g| + eps)`` turns a 1e-9 difference on a tiny gradient entry into a
    sizeable fraction of ``lr``."""
    model, tok, train = warm
    batch, adv = _fixed_batch(warm, rows_seed=3)
    runs = []
    for budget in (10_000, 20):
        cfg = small_cfg()
        cfg.optim.update_epochs, cfg.optim.micro_batch_tokens, cfg.loss.loss_agg = 1, budget, agg
        tr = Trainer(cfg, copy.deepcopy(model), tok, train)
        grads = _capture_grads(tr)
        old, _ = tr.score(tr.policy, batch)
        noise = torch.randn(old.shape, generator=torch.Generator().manual_seed(7))
        old = old + 0.3 * noise  # ratios away from 1: some tokens are clipped, so the clip matters
        groups = micro_batches(batch, budget)
        assert sorted(torch.cat(groups).tolist()) == list(range(batch.rows))
        assert (len(groups) == 1) == (budget == 10_000)
        m = tr.update(batch, adv, torch.full((batch.rows,), 0.2), old, None)
        assert m["loss/clip_frac"] > 0
        runs.append((m["loss/policy"], grads[0]))
    (loss_one, g_one), (loss_micro, g_micro) = runs
    n_reduce = batch.padded_tokens() * model.config.hidden_size
    assert loss_micro == pytest.approx(loss_one, rel=rounding_tol(torch.float32, n_reduce), abs=1e-7)
    assert_close_scaled(g_micro, g_one, dtype=torch.float32, n_reduce=n_reduce, what=f"{agg}: ")


class ShapeLog(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(t, torch.Tensor):
                self.shapes.append(tuple(t.shape))
        return out


def test_no_tokens_by_vocab_tensor_in_score_and_update(warm):
    """The model's logits are never computed and no [tokens x vocab] tensor exists: the
    fused head works in tiles of a few rows (a small memory budget makes them small)."""
    model, tok, train = warm
    cfg = small_cfg()
    cfg.loss.memory_budget = 20_000  # rows x whole vocabulary, two fp32 buffers: ~11 rows
    tr = Trainer(cfg, copy.deepcopy(model), tok, train)
    batch, adv = _fixed_batch(warm)
    calls = []
    tr.model.lm_head.register_forward_hook(lambda *a: calls.append(1))
    V, N = tr.model.config.vocab_size, int(batch.completion_mask.sum())
    with ShapeLog() as log:
        old, _ = tr.score(tr.policy, batch)
        tr.update(batch, adv, torch.full((batch.rows,), 0.2), old, None)
    assert not calls, "the LM head module must not run"
    D = tr.model.config.hidden_size
    vocab_rows = [s for s in log.shapes if s and s[-1] == V and s != (D, V)]  # (D, V): the head weight, transposed
    assert vocab_rows, "the fused head's tiles should show up"
    biggest = max(torch.Size(s[:-1]).numel() for s in vocab_rows)
    assert biggest < N // 4, (biggest, N)


def test_lr_schedule_values():
    f = lr_lambda(10, 0.2, "linear", 0.0)
    assert [round(f(i), 6) for i in (0, 1, 2, 6, 10)] == [0.5, 1.0, 1.0, 0.5, 0.0]
    g = lr_lambda(4, 0.0, "cosine", 0.1)
    assert g(0) == pytest.approx(1.0) and g(2) == pytest.approx(0.55) and g(4) == pytest.approx(0.1)


def _rows(run_dir):
    return [{k: v for k, v in r.items() if not k.startswith(TIME_KEYS)} for r in read_metrics(run_dir)]


def _signalled_run(cfg: TrainConfig, out_dir: Path, sig: int, *, at_call: int) -> subprocess.CompletedProcess:
    """``python -m agpo.train`` with ``cfg``; ``sig`` is sent to it from here while it is
    inside its ``at_call``-th reward call (tests/fixtures/fault_rewards.py:pausing)."""
    handshake = out_dir.parent / "handshake"
    handshake.mkdir(parents=True)
    (handshake / "cfg.yaml").write_text(yaml.safe_dump(cfg.to_dict()))
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS=str(torch.get_num_threads()),
               AGPO_TEST_PAUSE_AT=str(at_call), AGPO_TEST_DIR=str(handshake))
    logs = [handshake / "stdout", handshake / "stderr"]  # files, not pipes: nothing can block on a full pipe
    with open(logs[0], "w") as out, open(logs[1], "w") as err:
        p = subprocess.Popen([sys.executable, "-m", "agpo.train", "--config", str(handshake / "cfg.yaml"),
                              "--out-dir", str(out_dir)], cwd=ROOT, env=env, stdout=out, stderr=err)
    try:
        deadline = time.monotonic() + 240
        while not (handshake / "ready").exists():
            assert p.poll() is None and time.monotonic() < deadline, logs[1].read_text()[-3000:]
            time.sleep(0.05)
        assert int((handshake / "ready").read_text()) == p.pid
        os.kill(p.pid, sig)
        (handshake / "go").touch()
        p.wait(timeout=240)
    finally:
        p.kill()
    return subprocess.CompletedProcess(p.args, p.returncode, logs[0].read_text(), logs[1].read_text())


def test_resume_gives_the_same_run(tmp_path):
    """An uninterrupted run equals the same run split three ways: a real SIGTERM in the
    middle of step 2 of a ``python -m agpo.train`` process (it finishes step 2, checkpoints
    and exits 75), a resume stopped by --stop-after 3, and a resume to the end."""
    full = small_cfg(tmp_path / "a")
    full.loss.beta = 0.03  # the reference model must come back too
    full.rollout.reward = f"{ROOT / 'tests/fixtures/fault_rewards.py'}:pausing"  # correctness, + a pause on request
    run(full)
    split_dir = tmp_path / "b" / "run"
    calls_per_step = 2 * full.rollout.prompts_per_step * full.rollout.group_size  # probe + train rollouts
    proc = _signalled_run(full, split_dir, signal.SIGTERM, at_call=calls_per_step + 5)
    assert proc.returncode == EXIT_PREEMPTED, proc.stderr[-3000:]
    assert "got SIGTERM" in proc.stderr and "stopped after step 2" in proc.stdout
    assert [r["step"] for r in read_metrics(split_dir)] == [1, 2]
    assert [s for s, _ in ckpt.list_checkpoints(split_dir)] == [2]
    resumed = copy.deepcopy(full)
    resumed.run.out_dir, resumed.run.resume, resumed.run.stop_after = str(split_dir), "auto", 3
    assert run(resumed) == {"stopped_after": 3}
    resumed.run.stop_after = None
    summary = run(resumed)
    a, b = _rows(full.run.out_dir), _rows(resumed.run.out_dir)
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    assert a == b
    assert summary["accuracy_before"] == json.loads((tmp_path / "a/run/summary.json").read_text())["accuracy_before"]
    from transformers import AutoModelForCausalLM
    ma = AutoModelForCausalLM.from_pretrained(str(Path(full.run.out_dir) / "final"))
    mb = AutoModelForCausalLM.from_pretrained(str(Path(resumed.run.out_dir) / "final"))
    for (n, p), q in zip(ma.state_dict().items(), mb.state_dict().values()):
        torch.testing.assert_close(p, q, rtol=0, atol=0, msg=n)
    # a resume with a different setting that changes the run is refused
    bad = copy.deepcopy(resumed)
    bad.rollout.group_size = 8
    with pytest.raises(ckpt.CheckpointError, match="rollout.group_size"):
        run(bad)


def test_checkpoints_are_atomic_and_pruned(tmp_path, warm):
    model, tok, _ = warm
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / ".tmp-step-000009").mkdir()  # a crash mid-write
    (tmp_path / "checkpoints" / "step-000008").mkdir()  # not complete: no state file
    model, saved = copy.deepcopy(model), {}
    for step in (1, 2, 3):
        with torch.no_grad():
            model.lm_head.weight.add_(1.0)
        saved[step] = model.lm_head.weight.detach().clone()
        ckpt.save_checkpoint(tmp_path, step, model, None, {"step": step}, keep=2)
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [2, 3]
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))
    fresh = copy.deepcopy(model)
    with torch.no_grad():
        fresh.lm_head.weight.zero_()
    ckpt.load_weights(tmp_path / "checkpoints" / "step-000002", fresh, None)
    torch.testing.assert_close(fresh.lm_head.weight, saved[2], rtol=0, atol=0)
    assert ckpt.load_state(tmp_path / "checkpoints" / "step-000003") == {"step": 3}
    assert ckpt.resolve_resume("auto", tmp_path).name == "step-000003"
    assert ckpt.resolve_resume("auto", tmp_path / "elsewhere") is None
    with pytest.raises(ckpt.CheckpointError, match="--resume"):
        ckpt.resolve_resume(str(tmp_path / "checkpoints" / "step-000008"), tmp_path)


@pytest.mark.parametrize("argv, message", [
    (["--lr", "-1"], "--lr"),
    (["--group-size", "1"], "--group-size"),
    (["--lora-rank", "-4"], "--lora-rank"),
    (["--lora-dropout", "1.5"], "--lora-dropout"),
    (["--dist-timeout", "0"], "--dist-timeout"),
    (["--algo", "ppo"], "--algo"),
    (["--loss-agg", "mean"], "--loss-agg"),
    (["--model", "/no/such/model/dir"], "--model /no/such/model/dir"),
    (["--dataset", "file"], "--data-path"),
    (["--resume", "/no/such/checkpoint"], "--resume"),
    (["--reward", "no_such_reward"], "--reward"),
    (["--rollout", "sglang"], "--rollout"),
    (["--tis", "chunk"], "--tis"),
    (["--tis-cap", "0"], "--tis-cap"),
    (["--vllm-sleep-level", "3"], "--vllm-sleep-level"),
    (["--vllm-gpu-memory-utilization", "1.5"], "--vllm-gpu-memory-utilization"),
])
def test_bad_flags_give_clear_errors(tmp_path, capsys, argv, message):
    code = main(argv + ["--out-dir", str(tmp_path / "r"), "--no-progress", "--sft-steps", "0", "--eval-size", "0"])
    assert code == 2
    assert message in capsys.readouterr().err


def test_config_file_and_flags(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("optim: {lr: 0.01, update_epochs: 3}\nrun: {algo: grpo}\n")
    cfg = config_from_args(["--config", str(path), "--lr", "0.02"])
    assert cfg.optim.lr == 0.02 and cfg.optim.update_epochs == 3
    assert not cfg.controller.adaptive_clip and not cfg.controller.adaptive_temp
    ablation = config_from_args(["--algo", "grpo", "--adaptive-clip"])
    assert ablation.controller.adaptive_clip and not ablation.controller.adaptive_temp
    path.write_text("optim: {learning_rate: 0.01}\n")
    with pytest.raises(ConfigError, match="learning_rate"):
        config_from_args(["--config", str(path)])
    with pytest.raises(ConfigError, match="no such file"):
        config_from_args(["--config", str(tmp_path / "missing.yaml")])
