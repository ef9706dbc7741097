"""The evidence switches of issue 26: what the clip did (per epoch, and against a fixed eps),
step KL for every algorithm, the budget-sized schedule and its stop rule, the warm-up to a
target loss, the paper's example recipe, and the probe that filters prompts and is trained on.
Values are built by hand (constructed ratios, designed rewards), not sampled."""

from __future__ import annotations

import copy
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_train import _designed_rewards, small_cfg
from test_train_scale import argv_for, assert_rows_close, cfg_for, rows, torchrun

from agpo.algo.controllers import AGPOController, ControllerConfig, adaptive_clip, entropy_ratio
from agpo.algo.stats import group_advantages
from agpo.config import ConfigError, config_from_args
from agpo.learn.batches import SequenceBatch, concat_batches
from agpo.learn.clipstats import ClipTally, clip_counts
from agpo.learn.launch import run
from agpo.learn.policy import Policy
from agpo.learn.probe import keep_groups, reuse_advantages, select_groups, with_probe
from agpo.learn.schedule import budget_allows, budget_lr
from agpo.learn.sft import TARGET_WINDOW, supervised_warmup
from agpo.learn.trainer import Trainer
from agpo.rollout import Rollout
from agpo.runtime.metrics_log import read_metrics

ROOT = Path(__file__).resolve().parents[1]


# -- what the clip did ----------------------------------------------------------------------
def test_clip_counts_on_a_constructed_batch():
    """Ratios and advantages chosen so each token's decision is known: eps 0.1 (adaptive)
    clips 4 tokens, eps_base 0.2 clips 2 of them, so 2 decisions differ; a masked token
    that would clip under both counts nowhere."""
    ratio = torch.tensor([1.15, 1.25, 0.85, 0.75, 1.05, 0.5, 1.15, 3.0])
    adv = torch.tensor([1.0, 1.0, -1.0, -1.0, 1.0, 1.0, -1.0, 1.0])
    mask = torch.tensor([1, 1, 1, 1, 1, 1, 1, 0])
    # clipped at 0.1: 1.15(A>0) 1.25(A>0) 0.85(A<0) 0.75(A<0); 0.5 with A>0 and 1.15 with A<0 are not cut
    old = torch.zeros(8, dtype=torch.float64)
    logp = ratio.double().log()
    eps = torch.full((8,), 0.1)
    tokens, clipped, base, differ, ratio_sum = clip_counts(logp, old, adv, eps, eps, mask, base_low=0.2, base_high=0.2)
    assert (tokens, clipped, base, differ) == (7, 4, 2, 2)
    assert ratio_sum == pytest.approx(float(ratio[:7].sum()), rel=1e-6)
    # an asymmetric base: only the upper side widened -> 1.15 and 1.25 no longer clip
    assert clip_counts(logp, old, adv, eps, eps, mask, base_low=0.1, base_high=0.3)[2:4] == (2, 2)


def test_clip_tally_reports_the_epochs_that_can_clip():
    t = ClipTally(3)
    t.add(0, (10, 0, 0, 0, 10.0))   # epoch 1: ratio 1, nothing clipped
    t.add(1, (10, 2, 1, 1, 10.5))
    t.add(2, (10, 4, 2, 2, 11.5))
    flat = t.flat()
    again = ClipTally(3)
    again.load_flat(flat)
    s = again.summary()
    assert s["loss/clip_frac"] == pytest.approx(6 / 20) and s["loss/clip_frac_base"] == pytest.approx(3 / 20)
    assert s["loss/clip_changed"] == pytest.approx(3 / 20) and s["loss/ratio_mean"] == pytest.approx(22 / 20)
    assert s["loss/clip_frac_first"] == 0.0
    one = ClipTally(1)
    one.add(0, (4, 1, 1, 0, 4.0))
    assert one.summary()["loss/clip_frac"] == pytest.approx(0.25)  # one epoch: that epoch


def test_clip_step_on_a_subset_of_the_probe_groups():
    """The eps of probe groups 1 and 3 alone equal those groups' eps in a full step (the
    entropy reference then advances over the trained groups only)."""
    cfg = ControllerConfig()
    rewards = torch.tensor([[0.0, 0, 0, 0], [1, 0, 0, 0], [1, 1, 1, 1], [1, 1, 0, 0]], dtype=torch.float64)
    answers = [["1", "1", "1", "1"], ["1", "2", "2", "3"], ["4", "4", "4", "4"], ["5", "6", "5", "6"]]
    full, sub = AGPOController(cfg), AGPOController(cfg)
    for c in (full, sub):
        c.h_ref, c.h_count = 1.0, 1
        c.probe_step(rewards, answers)
    whole = full.clip_step([1.0, 1.3, 1.0, 1.3])
    part = sub.clip_step([1.3, 1.3], groups=[1, 3])
    assert part[0].item() == pytest.approx(whole[1].item(), rel=1e-6)
    assert sub.h_count == 3
    # group 3 after group 1 alone: H_ref = 0.01 * 1.3 + 0.99 * 1.0, and group 3's own probe statistics
    probe = sub.probe
    want = adaptive_clip(probe.sigma[3], probe.skew[3], probe.entropy[3], entropy_ratio(1.3, 1.003, cfg), 0.0, cfg)
    assert part[1].item() == pytest.approx(want, rel=1e-6)
    assert probe.sigma[3] != probe.sigma[1] or probe.entropy[3] != probe.entropy[1]  # a swap would show
    with pytest.raises(ValueError, match="groups"):
        _probed(cfg, rewards, answers).clip_step([1.0], groups=[7])


def _probed(cfg, rewards, answers):
    c = AGPOController(cfg)
    c.probe_step(rewards, answers)
    return c


# -- the budget -----------------------------------------------------------------------------
def test_budget_schedule_and_stop_rule():
    # warm-up over the first 10% of the budget, then cosine to 0 at the budget
    assert budget_lr(0.0, 0.01, 0.1, "cosine", 0.0) == pytest.approx(0.1)
    assert budget_lr(0.05, 0.01, 0.1, "cosine", 0.0) == pytest.approx(0.6)
    assert budget_lr(0.1, 0.01, 0.1, "cosine", 0.0) == pytest.approx(1.0)
    assert budget_lr(0.55, 0.01, 0.1, "cosine", 0.0) == pytest.approx(0.5)
    assert budget_lr(1.0, 0.01, 0.1, "linear", 0.2) == pytest.approx(0.2)
    assert budget_lr(3.0, 0.01, 0.0, "cosine", 0.1) == pytest.approx(0.1)  # past the budget: the floor
    assert budget_lr(0.7, 0.01, 0.0, "constant", 0.0) == 1.0
    # the nearest step boundary: a step of 100 with 60 left is taken, with 40 left it is not
    assert budget_allows(940, 100, 1000) and not budget_allows(960, 100, 1000)
    assert budget_allows(0, 0, 1000) and not budget_allows(1000, 0, 1000)


def test_budgeted_run_ends_its_schedule_at_the_budget(tmp_path):
    """A cosine run sized by --token-budget: its LR falls to the floor by the budget's end,
    whatever --steps says, and it stops within half a step of the budget."""
    cfg = small_cfg(tmp_path, steps=500, token_budget=500)
    cfg.optim.schedule, cfg.optim.warmup_ratio, cfg.optim.min_lr_ratio = "cosine", 0.2, 0.0
    cfg.warmup.sft_steps, cfg.run.eval_size = 20, 0
    summary = run(cfg)
    rows = [r for r in read_metrics(Path(cfg.run.out_dir) / "metrics.jsonl") if "optim/lr" in r]
    step = rows[-1]["tokens/generated_probe"] + rows[-1]["tokens/generated_train"]
    assert summary["steps"] < 500 and abs(summary["tokens_generated"] - 500) <= step / 2 + 1e-9
    lrs = [r["optim/lr"] for r in rows]
    peak = max(lrs)
    assert peak == pytest.approx(cfg.optim.lr, rel=0.35)  # reached in the warm-up
    assert lrs[-1] < 0.15 * peak  # the last optimiser step near the end of the cosine
    assert lrs.index(peak) < len(lrs) - 1


# -- warm-up to a target ------------------------------------------------------------------------
def test_warmup_stops_at_its_target_loss():
    from agpo.models import load_model_and_tokenizer
    from agpo.tasks.data import load_problems

    model, tok = load_model_and_tokenizer("tiny", seed=0)
    train = load_problems(dataset="arith", split="train")
    policy = Policy(model)
    easy = supervised_warmup(policy, tok, train, steps=60, batch_size=8, lr=1e-3, progress=False, target_loss=1e9)
    assert easy["sft/steps"] == TARGET_WINDOW and easy["sft/reached_target"] == 1.0
    never = supervised_warmup(policy, tok, train, steps=TARGET_WINDOW + 3, batch_size=8, lr=1e-3, progress=False,
                              target_loss=1e-9)
    assert never["sft/steps"] == TARGET_WINDOW + 3 and never["sft/reached_target"] == 0.0
    plain = supervised_warmup(policy, tok, train, steps=5, batch_size=8, lr=1e-3, progress=False)
    assert plain["sft/steps"] == 5 and "sft/reached_target" not in plain


def test_embedded_default_warms_up_to_a_target():
    cfg = config_from_args([])
    from agpo.learn.launch import resolve_defaults

    cfg = resolve_defaults(cfg)
    assert cfg.warmup.sft_target_loss == 0.5 and cfg.warmup.sft_steps == 1500
    other = resolve_defaults(config_from_args(["--sft-target-loss", "0", "--sft-steps", "300"]))
    assert other.warmup.sft_target_loss == 0 and other.warmup.sft_steps == 300


# -- recipes -------------------------------------------------------------------------------------
def test_paper_example_recipe_is_the_authors_example_configs():
    c = config_from_args(["--recipe", "paper-example"])
    assert (c.rollout.group_size, c.rollout.prompts_per_step, c.optim.update_epochs) == (2, 1, 1)
    assert (c.controller.tau_min, c.controller.tau_max, c.model.lora_dropout) == (0.6, 1.3, 0.05)
    assert (c.optim.lr, c.rollout.top_p, c.loss.kl_estimator) == (1e-5, 0.9, "k1")  # the rest is --recipe paper's
    assert config_from_args(["--recipe", "paper-example", "--lora-rank", "16"]).loss.beta == 0.0
    assert config_from_args(["--recipe", "paper-example", "--group-size", "4"]).rollout.group_size == 4


def test_probe_switches_need_the_probe():
    for flag in (["--probe-reuse"], ["--probe-filter"], ["--probe-size", "4"]):
        with pytest.raises(ConfigError, match="GRPO draws no probe"):
            config_from_args(["--algo", "grpo", *flag])
    with pytest.raises(ConfigError, match="--probe-size"):
        config_from_args(["--probe-size", "1"])


# -- the probe that pays for itself ----------------------------------------------------------------
def test_keep_groups_skips_all_equal_probes_but_keeps_one_per_rank():
    r = torch.tensor([[0.0, 0.0], [1.0, 0.0], [1.0, 1.0], [0.0, 0.0]], dtype=torch.float64)
    assert keep_groups(r).tolist() == [False, True, False, False]
    assert keep_groups(r, world_size=2).tolist() == [False, True, True, False]  # rank 1 keeps its first
    assert keep_groups(torch.zeros(3, 4)).tolist() == [True, False, False]


def _rollout(rows: int, width: int, G: int, tau: float, seed: int, lp: bool = True) -> Rollout:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, width + 1, (rows,), generator=g)
    mask = (torch.arange(width)[None] < lengths[:, None]).long()
    batch = SequenceBatch(prompt_ids=torch.randint(3, 9, (rows, 3), generator=g), prompt_mask=torch.ones(rows, 3).long(),
                          completion_ids=torch.randint(3, 9, (rows, width), generator=g) * mask, completion_mask=mask,
                          temperature=torch.full((rows,), tau))
    return Rollout(batch=batch, texts=[f"{seed}-{i}" for i in range(rows)], group_size=G,
                   generated_tokens=int(mask.sum()), seconds=0.0,
                   logprobs=-torch.rand(rows, width, generator=g) * mask if lp else None)


def test_probe_rows_join_the_train_rows():
    probe = _rollout(4 * 2, 5, 2, 1.0, seed=1)
    train = _rollout(2 * 3, 4, 3, 1.2, seed=2)
    sub = select_groups(probe, torch.tensor([1, 3]))
    assert sub.texts == ["1-2", "1-3", "1-6", "1-7"]
    both = with_probe(train, sub)
    b = both.batch
    assert b.rows == 10 and both.texts == train.texts + sub.texts
    assert b.temperature.tolist() == [pytest.approx(1.2)] * 6 + [1.0] * 4
    for i, src in enumerate([*[(train, j) for j in range(6)], *[(probe, j) for j in (2, 3, 6, 7)]]):
        roll, j = src
        n = int(roll.batch.completion_mask[j].sum())
        assert b.completion_ids[i, :n].tolist() == roll.batch.completion_ids[j, :n].tolist()
        assert int(b.completion_mask[i].sum()) == n and b.completion_mask[i, n:].sum() == 0
        assert torch.equal(both.logprobs[i, :n], roll.logprobs[j, :n])
    assert with_probe(train, _rollout(2 * 2, 5, 2, 1.0, seed=3, lp=False)).logprobs is None
    wide = concat_batches([train.batch, probe.batch])
    assert wide.prompt_ids.shape[1] == 3 and wide.completion_ids.shape[1] == 5


def test_reuse_advantages_pool_train_and_probe_rewards():
    train = torch.tensor([[1.0, 0.0, 0.0], [1.0, 1.0, 1.0]], dtype=torch.float64)
    probe = torch.tensor([[1.0, 1.0], [0.0, 1.0]], dtype=torch.float64)
    adv = reuse_advantages(lambda r: group_advantages(r, "std", 1e-8), train, probe)
    # prompt 0: rewards 1,0,0,1,1 -> mean 0.6, unbiased sd sqrt(0.3); prompt 1: 1,1,1,0,1 -> mean 0.8, sd sqrt(0.2)
    a0 = [(v - 0.6) / math.sqrt(0.3) for v in (1, 0, 0)]
    a1 = [(v - 0.8) / math.sqrt(0.2) for v in (1, 1, 1)]
    p0 = [(v - 0.6) / math.sqrt(0.3) for v in (1, 1)]
    p1 = [(v - 0.8) / math.sqrt(0.2) for v in (0, 1)]
    assert adv.tolist() == pytest.approx(a0 + a1 + p0 + p1, rel=1e-9)


def test_trainer_filters_on_the_probe_and_trains_on_it(warm, monkeypatch):
    """Designed rewards: probe groups 0 and 2 all equal -> skipped; groups 1 and 3 get a train
    group of 4 and join their 2 probe rows to it: the update sees 2 x (4 + 2) rows with the
    pooled advantages and each group's eps, and the probe's tokens are counted."""
    model, tok, train = warm
    cfg = small_cfg()
    cfg.rollout.probe_size, cfg.rollout.probe_reuse, cfg.rollout.probe_filter = 2, True, True
    probe_r = [0, 0, 1, 0, 1, 1, 0, 1]
    train_r = [1, 0, 0, 0, 1, 1, 1, 0]
    cfg.rollout.reward = _designed_rewards(probe_r + train_r)
    tr = Trainer(cfg, copy.deepcopy(model), tok, train)
    seen = {}
    real_update, real_sample, real_clip = tr.update, tr.engine.sample, tr.controller.clip_step

    def spy_update(batch, adv, eps, *a, **kw):
        seen.update(rows=batch.rows, adv=adv.clone(), eps=eps.clone(), temps=batch.temperature.clone())
        return real_update(batch, adv, eps, *a, **kw)

    def spy_sample(prompts, tau, **kw):
        seen.setdefault("phases", []).append((len(prompts), kw["group_size"]))
        return real_sample(prompts, tau, **kw)

    def spy_clip(h, groups=None):
        seen["groups"], seen["clip"] = groups, real_clip(h, groups=groups)
        return seen["clip"]

    monkeypatch.setattr(tr.controller, "clip_step", spy_clip)
    monkeypatch.setattr(tr, "update", spy_update)
    monkeypatch.setattr(tr.engine, "sample", spy_sample)
    m = tr.step()
    assert seen["phases"] == [(4, 2), (2, 4)]
    assert seen["rows"] == 2 * (4 + 2)
    want = reuse_advantages(tr.controller.advantages, torch.tensor([[1.0, 0, 0, 0], [1, 1, 1, 0]], dtype=torch.float64),
                            torch.tensor([[1.0, 0], [0, 1]], dtype=torch.float64))
    torch.testing.assert_close(seen["adv"], want)
    eps, (e1, e3) = seen["eps"], seen["clip"].tolist()
    assert seen["groups"] == [1, 3]
    assert eps.tolist() == pytest.approx([e1] * 4 + [e3] * 4 + [e1] * 2 + [e3] * 2)
    assert torch.all(seen["temps"][8:] == cfg.controller.tau_base)
    assert m["probe/skipped_frac"] == 0.5 and m["probe/zero_std_frac"] == 0.5
    assert m["tokens/generated_total"] == m["tokens/generated_probe"] + m["tokens/generated_train"]
    assert math.isfinite(m["kl/step"]) and math.isfinite(m["loss/clip_changed"])


def test_grpo_logs_step_kl_and_the_clip_per_epoch(warm):
    model, tok, train = warm
    cfg = small_cfg()
    cfg.controller.adaptive_clip = cfg.controller.adaptive_temp = False
    cfg.optim.update_epochs = 3
    tr = Trainer(cfg, copy.deepcopy(model), tok, train)
    m = tr.step()
    assert math.isfinite(m["kl/step"]) and m["kl/step"] >= 0 and "kl/step_ema" not in m
    assert m["loss/clip_frac_first"] == 0.0  # old log-probs are this update's starting weights
    assert m["loss/clip_changed"] == 0.0  # eps is eps_base: no decision differs
    assert m["loss/clip_frac"] == m["loss/clip_frac_base"]


SPLIT = f"{ROOT / 'tests/fixtures/designed_rewards.py'}:split"


@pytest.mark.timeout(400)
def test_filter_and_reuse_at_two_ranks_match_one_process(tmp_path):
    """--probe-filter, --probe-reuse and --probe-size under torchrun: the kept groups' eps
    slices, the rank-ordered gathers and the train groups' noise rows give the run of one
    process (the designed reward skips some prompts, never all of a rank's)."""
    over = dict(reward=SPLIT, probe_size=2, sft_steps=0, eval_size=0, save_every=0, beta=0.0)
    flags = ["--probe-filter", "--probe-reuse"]
    p = torchrun(argv_for(tmp_path / "ws2", **over) + flags)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-5000:]
    cfg = cfg_for(tmp_path / "ws1", **over)
    cfg.rollout.probe_filter = cfg.rollout.probe_reuse = True
    run(cfg)
    a, b = rows(tmp_path / "ws2"), rows(tmp_path / "ws1")
    assert any(r["probe/skipped_frac"] > 0 for r in b) and all(r["probe/skipped_frac"] < 1 for r in b)
    assert_rows_close(a, b)


# -- the experiment's script -----------------------------------------------------------------------
def _fake_run(d: Path, before: float, evals: list[tuple[int, float]], final: tuple[int, float]):
    d.mkdir(parents=True)
    rows = [{"step": i + 1, "tokens/generated_total": t, "eval/accuracy": a, "eps/mean": 0.15}
            for i, (t, a) in enumerate(evals)]
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (d / "summary.json").write_text(json.dumps({"accuracy_before": before, "accuracy_after": final[1],
                                                "tokens_generated": final[0], "steps": len(evals)}))


def test_evidence_report_pairs_seeds_on_one_token_axis(tmp_path):
    sys.path.insert(0, str(ROOT / "scripts"))
    import evidence

    out = tmp_path / "ev"
    for s, gain in enumerate([0.02, 0.04, 0.06]):
        _fake_run(out / "grpo16" / f"s{s}", 0.5, [(500, 0.55), (1000, 0.6)], (1000, 0.6))
        _fake_run(out / "agpo" / f"s{s}", 0.5, [(500, 0.55 + gain), (1000, 0.6 + gain)], (1000, 0.6 + gain))
    _fake_run(out / "grpo8" / "s0", 0.5, [(400, 0.7), (800, 0.5)], (800, 0.45))  # collapses: -20 and below start
    evidence.main(["report", "--out", str(out)])
    rep = json.loads((out / "report.json").read_text())
    a = rep["arms"]["agpo"]
    assert rep["compared_at_tokens"]["1.0"] == 800  # the shortest run sets the common axis
    vs = a["vs_control"]["1.0"]
    # at 800 tokens: grpo 0.55 + 0.05*0.6 = 0.58; agpo 0.58 + gain
    assert vs["mean"] == pytest.approx(0.04) and vs["lo"] < 0.04 < vs["hi"] and vs["p"] == pytest.approx(0.25)
    assert rep["arms"]["grpo8"]["collapses"] == 1 and a["collapses"] == 0
    assert evidence.at_tokens([(0, 0.5), (100, 0.7)], 50) == pytest.approx(0.6)


def test_records_carry_the_report_and_skip_finished_runs(tmp_path):
    """A finished run's record (committable) gives the same report as the run itself, and a
    ``run`` that finds the record does not train again (its launcher is never reached)."""
    sys.path.insert(0, str(ROOT / "scripts"))
    import evidence

    out, results = tmp_path / "ev", tmp_path / "records"
    for s, gain in enumerate([0.01, 0.05, 0.03]):
        _fake_run(out / "grpo16" / f"s{s}", 0.5, [(500, 0.55), (1000, 0.6)], (1000, 0.6))
        _fake_run(out / "agpo" / f"s{s}", 0.5, [(500, 0.55 + gain), (1000, 0.6 + gain)], (1000, 0.6 + gain))
    (out / "agpo" / "s0" / "groups.jsonl").write_text('{"step": 1, "group": 0}\n')
    (out / "agpo" / "s2" / "command.json").write_text(json.dumps(["--lr", "1e-4"]))  # made otherwise
    with pytest.raises(SystemExit, match=r"holds a run made with other flags .* its own --out"):
        evidence.launch(out, "agpo", 2, 1000, ["--lr", "5e-5"], print, results)
    for arm in ("grpo16", "agpo"):
        for s in range(3):  # finished here with these flags: the record is written, nothing trains
            args = evidence.run_args(out, arm, s, 1000, ["--lr", "5e-5"], results)
            (out / arm / f"s{s}" / "command.json").write_text(json.dumps(args))
            evidence.launch(out, arm, s, 1000, ["--lr", "5e-5"], print, results)
    rec = json.loads((results / "agpo" / "s1.json").read_text())
    assert rec["flags"][-2:] == ["--lr", "5e-5"] and set(rec["steps"][0]) <= set(evidence.RECORD_KEYS)
    assert "--dump-groups" in json.loads((results / "agpo" / "s0.json").read_text())["flags"]
    assert (results / "agpo" / "s0.groups.jsonl").read_text() == '{"step": 1, "group": 0}\n'
    evidence.main(["report", "--out", str(out)])
    evidence.main(["report", "--out", str(tmp_path / "absent"), "--results", str(results)])
    assert json.loads((results / "report.json").read_text()) == json.loads((out / "report.json").read_text())
    import shutil

    shutil.rmtree(out)  # a machine with only the records: nothing to run
    evidence.launch(out, "agpo", 1, 1000, [], lambda msg: pytest.fail(msg), results)
    assert not out.exists()


def test_pick_takes_each_arms_best_rate(tmp_path):
    sys.path.insert(0, str(ROOT / "scripts"))
    import evidence

    sweep = tmp_path / "sweep"
    for lr, (g, a) in {"1e-4": (0.60, 0.50), "5e-5": (0.55, 0.58)}.items():
        for s in range(2 if lr == "1e-4" else 3):  # seed 2 at one rate only: left out, the seeds are paired
            for arm, acc in (("grpo16", g), ("agpo-reuse", a)):
                d = tmp_path / "runs" / lr / arm / f"s{s}"
                _fake_run(d, 0.5, [(500, acc), (1000, acc)], (1000, acc))
                evidence.write_record(d, evidence.record_path(sweep / f"lr{lr}", arm, s), [])
    evidence.main(["pick", "--sweep", str(sweep)])
    picked = json.loads((sweep / "pick.json").read_text())
    assert picked["pick"] == {"grpo16": 1e-4, "agpo-reuse": 5e-5} and picked["seeds"]["grpo16"] == [0, 1]
    assert picked["auc"]["agpo-reuse"]["5e-5"] > picked["auc"]["agpo-reuse"]["1e-4"]
    assert evidence.lr_of("agpo-reuse", sweep / "pick.json") == ["--lr", "5e-05"]
    with pytest.raises(SystemExit, match="no rate picked for agpo"):
        evidence.lr_of("agpo", sweep / "pick.json")
    # a filter arm the sweep did not cover takes its algorithm's rate
    assert evidence.lr_of("agpo-reuse-refill", sweep / "pick.json") == ["--lr", "5e-05"]
    assert evidence.lr_of("grpo16-refill", sweep / "pick.json") == ["--lr", "0.0001"]


def test_evidence_script_runs_scaled_down(tmp_path):
    """The documented commands, scaled down: two arms, one seed, a few steps; then the second
    round's: records, a second ``run`` that trains nothing, ``pick`` and ``--lr-from``."""
    out, sweep = tmp_path / "ev", tmp_path / "sweep"
    base = [sys.executable, str(ROOT / "scripts" / "evidence.py")]
    small = ["--sft-steps", "20", "--test-size", "40", "--eval-size", "40", "--prompts-per-step", "4",
             "--update-epochs", "2"]
    run = [*base, "run", "--out", str(out), "--seeds", "1", "--extra-seeds", "0", "--budget", "600", "--arms",
           "agpo,grpo16", "--results", str(sweep / "lr1e-4"), "--", *small, "--lr", "1e-4"]
    r = subprocess.run(run, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    r = subprocess.run([*base, "report", "--out", str(out), "--plot", str(tmp_path / "p.png")], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "GRPO, groups of 2G" in r.stdout and (tmp_path / "p.png").stat().st_size > 1000
    r = subprocess.run([*base, "report", "--results", str(sweep / "lr1e-4")], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0 and "GRPO, groups of 2G" in r.stdout, r.stdout + r.stderr
    import shutil

    shutil.rmtree(out)  # only the records are left: the same run trains nothing
    r = subprocess.run(run, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "exit" not in r.stdout and not out.exists(), r.stdout + r.stderr
    r = subprocess.run([*base, "pick", "--sweep", str(sweep)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and json.loads((sweep / "pick.json").read_text())["pick"]["grpo16"] == 1e-4, r.stderr
    r = subprocess.run([*base, "run", "--out", str(tmp_path / "main"), "--seeds", "1", "--extra-seeds", "0",
                        "--first-seed", "3", "--budget", "300", "--arms", "grpo16", "--results", str(tmp_path / "rec"),
                        "--lr-from", str(sweep / "pick.json"), "--", *small], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    flags = json.loads((tmp_path / "rec" / "grpo16" / "s3.json").read_text())["flags"]
    assert flags[flags.index("--lr") + 1] == "0.0001" and "--dump-groups" in flags


def test_run_takes_seeds_from_first_seed_and_dumps_the_first(tmp_path, monkeypatch):
    """Main runs after a sweep start at ``--first-seed`` (seeds the sweep did not pick the rate
    on); the first of them dumps its groups."""
    sys.path.insert(0, str(ROOT / "scripts"))
    import evidence

    calls = []
    monkeypatch.setattr(evidence, "launch", lambda out, arm, s, budget, extra, log, results, picks, dump_seed, *a:
                        calls.append((arm, s, dump_seed)))
    monkeypatch.setattr(evidence, "warm_start", lambda *a: None)
    evidence.main(["run", "--out", str(tmp_path), "--arms", "grpo16,agpo-reuse", "--seeds", "2", "--extra-seeds", "3",
                   "--first-seed", "3", "--jobs", "1"])
    assert sorted(calls) == sorted([("grpo16", 3, 3), ("grpo16", 4, 3), ("agpo-reuse", 3, 3), ("agpo-reuse", 4, 3),
                                    ("agpo-reuse", 5, 3)])
    assert "--dump-groups" in evidence.run_args(tmp_path, "grpo16", 3, 1000, [], dump_seed=3)
    assert "--dump-groups" not in evidence.run_args(tmp_path, "grpo16", 0, 1000, [], dump_seed=3)
    four = [evidence.run_args(tmp_path, arm, 0, 1000, [], group=4) for arm in ("agpo-reuse", "grpo16")]
    assert [f[f.index("--group-size") + 1] for f in four] == ["4", "8"]


def test_fixed_eps_arm_takes_agpos_realised_eps_from_the_records(tmp_path, monkeypatch):
    """``grpo16-eps`` runs GRPO-2G at an AGPO arm's mean eps over its recorded steps (each run's
    mean, then the runs' mean): AGPO as published by default, AGPO + probe reuse with
    ``--eps-from agpo-reuse`` (the SmolLM2 design), never the other one silently; the flags it
    makes build the documented SmolLM2 run, and ``run`` refuses to start it beside its source."""
    sys.path.insert(0, str(ROOT / "scripts"))
    import evidence

    def record(arm: str, seed: int, eps: list[float]) -> None:
        path = evidence.record_path(tmp_path, arm, seed)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"summary": {}, "curve": [], "steps": [{"eps/mean": e} for e in eps]}))

    with pytest.raises(SystemExit, match="no finished agpo-reuse run"):
        evidence.realised_eps(tmp_path / "none", tmp_path, "agpo-reuse")
    record("agpo-reuse", 0, [0.1, 0.2, 0.3])  # run mean 0.2
    record("agpo-reuse", 1, [0.12, math.nan])  # 0.12: NaN skipped
    record("agpo-reuse", 2, [math.nan])  # no eps logged: not a run of mean 0 (nor a division by zero)
    # 0.16, the mean of the runs' means; pooling the steps would give 0.18
    assert evidence.realised_eps(tmp_path / "none", tmp_path, "agpo-reuse") == pytest.approx(0.16)
    with pytest.raises(SystemExit, match="no finished agpo run"):  # the published arm is not there: no fallback
        evidence.realised_eps(tmp_path / "none", tmp_path)
    smol = ["--config", str(ROOT / "examples" / "smollm2_chain_sum.yaml"), "--prompts-per-step", "4",
            "--max-new-tokens", "48", "--test-size", "64", "--eval-size", "64", "--eval-every", "2", "--lr", "2.5e-5"]
    cfg = config_from_args(evidence.run_args(tmp_path / "none", "grpo16-eps", 1, 12000, smol, tmp_path, group=4,
                                             eps_from="agpo-reuse"))
    ctl = cfg.controller
    assert (ctl.adaptive_clip, ctl.adaptive_temp, cfg.rollout.group_size, ctl.eps_base) == (False, False, 8, 0.16)
    assert (cfg.model.model, cfg.run.eval_every, cfg.data.test_size, cfg.optim.lr) == ("smollm2-135m", 2, 64, 2.5e-5)
    record("agpo", 0, [0.3])
    assert evidence.realised_eps(tmp_path / "none", tmp_path) == pytest.approx(0.3)
    # agpo-reuse seed 3 not finished yet: grpo16-eps would read an eps that is still moving
    started = []
    monkeypatch.setattr(evidence, "launch", lambda out, arm, s, *a: started.append((arm, s)))
    monkeypatch.setattr(evidence, "warm_start", lambda *a: None)
    run = ["run", "--out", str(tmp_path / "none"), "--results", str(tmp_path), "--arms", "agpo-reuse,grpo16-eps",
           "--eps-from", "agpo-reuse"]
    with pytest.raises(SystemExit, match="command of its own"):
        evidence.main([*run, "--extra-seeds", "4"])
    assert started == []
    evidence.main([*run, "--extra-seeds", "3"])  # its seeds 0-2 are all recorded: grpo16-eps may go
    assert sorted(started) == [("agpo-reuse", s) for s in range(3)] + [("grpo16-eps", s) for s in range(3)]


def test_report_counts_all_equal_groups_among_the_sampled_ones():
    """Under --filter-groups the logged zero-std share covers the trained groups only; the
    report's "all-equal groups" is the sampled share, 1 - filter/informative_frac."""
    sys.path.insert(0, str(ROOT / "scripts"))
    import evidence

    steps = [{"reward/zero_std_frac": 0.0, "filter/informative_frac": 0.75}, {"reward/zero_std_frac": 0.25}]
    assert [r["reward/zero_std_frac"] for r in evidence.sampled_view(steps)] == [0.25, 0.25]
    assert evidence.mean_of(evidence.sampled_view(steps[:1]), "reward/zero_std_frac") == 0.25


def test_paired_says_the_smallest_effect_the_design_can_see():
    """Hand values: differences 1, 2, 3, 6 (mean 3, sd sqrt(14/3)); the 95% t interval uses
    t(3) = 3.182; the detectable difference (5% two-sided, 80% power) adds t80(3) = 0.978;
    the exact sign-flip p counts the 2 of 16 patterns with |sum| >= 12."""
    sys.path.insert(0, str(ROOT / "scripts"))
    import evidence

    r = evidence.paired([1.0, 2.0, 3.0, 6.0])
    sd = math.sqrt(14 / 3)
    assert r["mean"] == 3.0 and r["sd"] == pytest.approx(sd)
    assert r["hi"] - r["mean"] == pytest.approx(3.182 * sd / 2)
    assert r["detectable"] == pytest.approx((3.182 + 0.978) * sd / 2)
    assert r["p"] == pytest.approx(2 / 16)


def test_a_run_from_the_shared_warm_up_is_the_run_that_warms_up(tmp_path, capsys):
    """``run`` warms each seed up once and starts every arm from that model (``warm_start``):
    the RL part logs what the run that warms up itself logs, number for number, and the
    seed's other arm reuses the warm-up."""
    sys.path.insert(0, str(ROOT / "scripts"))
    import evidence

    extra = ["--sft-steps", "25", "--test-size", "40", "--eval-size", "40", "--prompts-per-step", "4",
             "--update-epochs", "2", "--eval-every", "2"]
    args = evidence.run_args(tmp_path, "agpo-reuse", 1, 1000, extra, dump_seed=1)
    assert evidence.train(args, tmp_path / "own") == 0
    out = tmp_path / "ev"
    evidence.main(["run", "--out", str(out), "--arms", "agpo-reuse,grpo16", "--seeds", "1", "--extra-seeds", "1",
                   "--first-seed", "1", "--budget", "1000", "--warmups", str(tmp_path / "w"), "--", *extra])
    assert capsys.readouterr().out.count("warm-up of seed 1: exit 0") == 1
    assert len(list((tmp_path / "w").glob("*-s1"))) == 1 and not (out / "warmup").exists()
    shared = evidence.run_dir(out, "agpo-reuse", 1)
    own = rows(tmp_path / "own")
    assert len(own) >= 3 and own == rows(shared)
    before = [json.loads((d / "summary.json").read_text())["accuracy_before"] for d in (tmp_path / "own", shared)]
    assert before[0] == before[1]
    assert json.loads((shared / "command.json").read_text()) == args
    assert (shared / "groups.jsonl").read_text() == (tmp_path / "own" / "groups.jsonl").read_text()
    warm = [evidence.read_run(d)["warmup"] for d in (tmp_path / "own", shared)]
    for w in warm:  # the record says how the start was made
        w.pop("sft/seconds")
    assert warm[0]["sft/steps"] == 25 and warm[0] == warm[1]


def test_warmup_curve_follows_the_runs_own_warm_up(tmp_path):
    """``warmup-curve`` evaluates along the warm-up a run does: its window loss at step 30 is
    the one ``agpo.train`` reports after a 30-step warm-up of the same seed and task."""
    base = [sys.executable, str(ROOT / "scripts" / "evidence.py")]
    task = ["--arith-terms", "3", "--max-operand", "9", "--test-size", "20"]
    r = subprocess.run([*base, "warmup-curve", "--seed", "2", "--steps", "30", "--every", "15", "--eval-size", "20",
                        "--", *task], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    curve = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    assert [c["step"] for c in curve] == [15, 30] and all(0 <= c["accuracy"] <= 1 for c in curve)
    cfg = config_from_args([*task, "--seed", "2", "--sft-steps", "30", "--sft-target-loss", "0", "--steps", "1",
                            "--prompts-per-step", "2", "--eval-size", "0", "--no-progress",
                            "--save-every", "0", "--out-dir", str(tmp_path / "run")])
    run(cfg)
    warm = next(json.loads(line) for line in open(tmp_path / "run" / "events.jsonl") if '"warmup"' in line)
    assert curve[-1]["window_loss"] == round(warm["sft/window_loss"], 4)
    assert curve[0]["window_loss"] != curve[1]["window_loss"]
