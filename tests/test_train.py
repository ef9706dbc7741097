"""The training loop on the tiny preset: real HF model, real generate, real files.

Covers the issue's list: per-row temperature really applied, the controllers' eps and
tau reach the loss and the sampler, the loss decreases on a fixed batch, micro-batching
gives the same update as one batch, no tokens x vocab tensor exists in a step, resume
equivalence, bad flags and missing model paths.
"""

import copy
import json
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import agpo.policy
import agpo.trainer
from agpo import checkpoint as ckpt
from agpo.config import ConfigError, TrainConfig, config_from_args
from agpo.data import load_problems
from agpo.metrics_log import read_metrics
from agpo.models import load_model_and_tokenizer
from agpo.policy import Policy
from agpo.rollout import RowTemperature, sample_groups
from agpo.sft import supervised_warmup
from agpo.train import main, resolve_defaults, run
from agpo.trainer import TIME_KEYS, Trainer, lr_lambda, micro_batches


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


@pytest.fixture(scope="module")
def warm():
    """A tiny model after a short warm-up (some rewards are non-zero) and its problems."""
    torch.manual_seed(0)
    model, tok = load_model_and_tokenizer("tiny", seed=0)
    train = load_problems(dataset="arith", split="train")
    supervised_warmup(Policy(model), tok, train, steps=120, batch_size=64, lr=2e-3, progress=False)
    return model, tok, train


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


def test_controllers_reach_loss_and_sampler(warm, monkeypatch):
    model, tok, train = warm
    cfg = small_cfg()
    tr = Trainer(cfg, copy.deepcopy(model), tok, train)
    seen = {"tau": [], "eps": [], "loss_eps": [], "loss_temp": []}
    real_sample, real_loss, real_clip = agpo.trainer.sample_groups, agpo.policy.agpo_loss, tr.controller.clip_step

    def spy_sample(*a, **kw):
        seen["tau"].append(a[3].clone())
        return real_sample(*a, **kw)

    def spy_loss(*a, **kw):
        seen["loss_eps"].append(kw["eps_low"].cpu())
        seen["loss_temp"].append(kw["temperature"].cpu())
        return real_loss(*a, **kw)

    def spy_clip(h):
        eps = real_clip(h)
        seen["eps"].append(eps.clone())
        return eps

    monkeypatch.setattr(agpo.trainer, "sample_groups", spy_sample)
    monkeypatch.setattr(agpo.policy, "agpo_loss", spy_loss)
    monkeypatch.setattr(tr.controller, "clip_step", spy_clip)
    for _ in range(2):
        tr.step()
    tau = torch.tensor(tr.controller.probe.tau)
    probe_tau, train_tau = seen["tau"][-2], seen["tau"][-1]
    assert torch.all(probe_tau == cfg.controller.tau_base)
    torch.testing.assert_close(train_tau, tau)
    assert float(tau.max() - tau.min()) > 1e-3, "tau should differ between groups"
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


def test_loss_decreases_on_fixed_batch(warm):
    model, tok, train = warm
    cfg = small_cfg()
    cfg.optim.update_epochs, cfg.optim.lr = 1, 1e-3
    tr = Trainer(cfg, copy.deepcopy(model), tok, train)
    batch, adv = _fixed_batch(warm)
    old, _ = tr.score(tr.policy, batch)
    eps = torch.full((batch.rows,), 0.2)
    losses = [tr.update(batch, adv, eps, old, None)["loss/policy"] for _ in range(12)]
    assert losses[0] == pytest.approx(-float((adv.view(-1, 1) * batch.completion_mask).sum()
                                             / batch.completion_mask.sum()), abs=1e-5)  # ratio 1 at the start
    # the clipped surrogate can fall by at most eps * mean|A| (every ratio at its clip edge)
    bound = 0.2 * float((adv.abs().view(-1, 1) * batch.completion_mask).sum() / batch.completion_mask.sum())
    assert losses[-1] < losses[0] - 0.25 * bound, (losses, bound)
    assert losses[-1] >= losses[0] - bound - 1e-5, (losses, bound)


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_micro_batches_give_the_same_update(warm, agg):
    model, tok, train = warm
    batch, adv = _fixed_batch(warm, rows_seed=3)
    params = []
    for budget in (10_000, 20):
        cfg = small_cfg()
        cfg.optim.update_epochs, cfg.optim.micro_batch_tokens, cfg.loss.loss_agg = 1, budget, agg
        tr = Trainer(cfg, copy.deepcopy(model), tok, train)
        old, _ = tr.score(tr.policy, batch)
        noise = torch.randn(old.shape, generator=torch.Generator().manual_seed(7))
        old = old + 0.05 * noise  # ratios away from 1 so the clip matters
        groups = micro_batches(batch, budget)
        assert sorted(torch.cat(groups).tolist()) == list(range(batch.rows))
        assert (len(groups) == 1) == (budget == 10_000)
        m = tr.update(batch, adv, torch.full((batch.rows,), 0.2), old, None)
        params.append((m["loss/policy"], [p.detach().clone() for p in tr.model.parameters()]))
    assert params[0][0] == pytest.approx(params[1][0], rel=1e-5, abs=1e-6)
    for a, b in zip(params[0][1], params[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


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


def test_resume_gives_the_same_run(tmp_path):
    full = small_cfg(tmp_path / "a")
    full.loss.beta = 0.03  # the reference model must come back too
    run(full)
    split = copy.deepcopy(full)
    split.run.out_dir, split.run.stop_after = str(tmp_path / "b" / "run"), 2
    assert run(split) == {"stopped_after": 2}
    assert [r["step"] for r in read_metrics(split.run.out_dir)] == [1, 2]
    resumed = copy.deepcopy(full)
    resumed.run.out_dir, resumed.run.resume = split.run.out_dir, "auto"
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
