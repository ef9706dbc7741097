"""``--filter-groups`` (agpo.learn.refill): train groups whose rewards are all equal are
dropped and rounds of fresh prompts refill the step (DAPO's dynamic sampling). Built on
constructed batches whose all-equal groups are known, designed rewards in a real trainer
step, and a 2-rank run against the run of one process."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from test_evidence import ROOT, _rollout
from test_train import _designed_rewards, small_cfg
from test_train_scale import argv_for, assert_rows_close, cfg_for, rows, torchrun

from agpo.algo.controllers import ProbeStats, adaptive_clip, entropy_ratio
from agpo.config import ConfigError, config_from_args
from agpo.learn.launch import run
from agpo.learn.refill import (choose_trained, in_step_order, informative, join_rollouts, merge_probe_stats, owners,
                               rank_order)
from agpo.learn.trainer import Trainer


GRADED = f"{ROOT / 'tests/fixtures/designed_rewards.py'}:graded"


# -- the pieces, on constructed batches ------------------------------------------------------------
def test_informative_marks_the_groups_whose_rewards_differ():
    r = torch.tensor([[0.0, 0, 0, 0], [1, 1, 1, 1], [0, 1, 0, 0], [0.5, 0.5, 0.5, 0.5], [1e308, 1e308, 1e308, 1e308],
                      [-3.0, -3.0, -3.0, -2.0]], dtype=torch.float64)
    assert informative(r).tolist() == [False, False, True, False, False, True]
    # pooled with the probe (--probe-reuse): one baseline over both, so a probe success makes group 0 informative
    probe = torch.tensor([[0.0, 1], [1, 1], [0, 0], [0.5, 0.5], [1e308, 1e308], [-3, -3]], dtype=torch.float64)
    assert informative(r, probe).tolist() == [True, False, True, False, False, True]
    # a NaN group has no usable advantages: it is dropped, not trained on
    assert informative(torch.tensor([[math.nan, 1.0], [1.0, 1.0]])).tolist() == [False, False]
    assert informative(torch.zeros(1, 2)).tolist() == [False]  # N = 1


def test_choose_trained_takes_the_first_informative_and_one_group_per_rank():
    owner = owners([4, 4], 2)  # two rounds of 4 prompts; each rank samples a block of 2 per round
    assert owner.tolist() == [0, 0, 1, 1, 0, 0, 1, 1]
    useful = torch.tensor([False, True, False, False, True, True, True, True])
    # the first 4 informative groups in step order: 1, 4, 5, 6; rank 1 has group 6
    assert choose_trained(useful, owner, 4, 2).nonzero().view(-1).tolist() == [1, 4, 5, 6]
    # limit 2: groups 1 and 4 are rank 0's; rank 1 gets its first informative group past the cut
    assert choose_trained(useful, owner, 2, 2).nonzero().view(-1).tolist() == [1, 4, 6]
    # rank 1 has no informative group at all: its first group (advantage 0)
    only0 = torch.tensor([True, True, False, False, True, False, False, False])
    assert choose_trained(only0, owner, 2, 2).nonzero().view(-1).tolist() == [0, 1, 2]
    # nothing informative at all (every group solved or failed): each rank keeps its first group
    none = torch.zeros(8, dtype=torch.bool)
    assert choose_trained(none, owner, 4, 2).nonzero().view(-1).tolist() == [0, 2]
    assert choose_trained(none, owners([3], 1), 4, 1).nonzero().view(-1).tolist() == [0]


def test_rank_order_puts_gathered_values_in_step_order():
    owner = torch.tensor([0, 1, 1, 0, 1])  # step order; rank 0 sampled groups 0 and 3
    order = rank_order(owner, 2)
    assert order.tolist() == [0, 3, 1, 2, 4]
    gathered = torch.tensor([10.0, 13.0, 11.0, 12.0, 14.0])  # rank 0's values, then rank 1's
    assert in_step_order(gathered, order).tolist() == [10.0, 11.0, 12.0, 13.0, 14.0]
    assert rank_order(torch.zeros(3, dtype=torch.long), 1).tolist() == [0, 1, 2]


def test_merged_probe_stats_and_joined_rollouts_keep_round_order():
    a = ProbeStats((0.1, 0.2), (0.0, 1.0), (0.3, 0.4), (1.0, 2.0), (0.0, 0.5), (1.0, 1.1))
    b = ProbeStats((0.5,), (-1.0,), (0.6,), (3.0,), (0.7,), (0.9,))
    m = merge_probe_stats([a, b])
    assert m.sigma == (0.1, 0.2, 0.5) and m.skew == (0.0, 1.0, -1.0) and m.tau == (1.0, 1.1, 0.9)
    assert merge_probe_stats([a]) is a
    r1, r2 = _rollout(2 * 3, 4, 3, 1.1, seed=1), _rollout(1 * 3, 6, 3, 0.8, seed=2)
    r1.seconds, r2.seconds = 1.0, 2.0
    j = join_rollouts([r1, r2])
    assert j.texts == r1.texts + r2.texts and j.batch.rows == 9 and j.group_size == 3
    assert j.generated_tokens == r1.generated_tokens + r2.generated_tokens and j.seconds == 3.0
    assert j.batch.completion_ids.shape[1] == 6 and j.logprobs.shape == (9, 6)
    for i, (roll, k) in enumerate([*[(r1, k) for k in range(6)], *[(r2, k) for k in range(3)]]):
        n = int(roll.batch.completion_mask[k].sum())
        assert j.batch.completion_ids[i, :n].tolist() == roll.batch.completion_ids[k, :n].tolist()
        assert int(j.batch.completion_mask[i].sum()) == n
        assert torch.equal(j.logprobs[i, :n], roll.logprobs[k, :n])
    assert join_rollouts([r1, _rollout(3, 4, 3, 1.0, seed=3, lp=False)]).logprobs is None


def test_filter_flags_are_checked():
    with pytest.raises(ConfigError, match="--probe-filter"):
        config_from_args(["--algo", "agpo", "--filter-groups", "--probe-filter"])
    with pytest.raises(ConfigError, match="--filter-rounds"):
        config_from_args(["--filter-groups", "--filter-rounds", "0"])
    cfg = config_from_args(["--algo", "grpo", "--filter-groups", "--filter-rounds", "2"])
    assert cfg.rollout.filter_groups and cfg.rollout.filter_rounds == 2


# -- a trainer step with designed rewards ------------------------------------------------------------
ROUND1 = [0, 0, 0, 0, 1, 1, 1, 1, 0, 1, 0, 1, 0, 0, 0, 0]  # groups: all 0, all 1, informative, all 0
ROUND2 = [1, 0, 0, 0, 1, 1, 1, 1, 0, 1, 1, 0, 0, 0, 1, 1]  # informative, all 1, informative, informative


def _spied(tr, monkeypatch, seen):
    real_sample, real_update, real_correct = tr.engine.sample, tr.update, tr._correct
    real_clip, real_score = tr.controller.clip_step, tr.score

    def spy_score(policy, batch, **kw):
        out = real_score(policy, batch, **kw)
        seen.setdefault("scored", (batch.completion_mask.clone(), out[1].clone()))  # the first: old log-probs, entropy
        return out

    def spy_sample(prompts, tau, **kw):
        out = real_sample(prompts, tau, **kw)
        seen.setdefault("phases", []).append((list(prompts), kw["group_size"], out))
        return out

    def spy_update(batch, adv, eps, *a, **kw):
        seen.update(rows=batch.rows, adv=adv.clone(), eps=eps.clone())
        return real_update(batch, adv, eps, *a, **kw)

    def spy_correct(problems, roll, rewards):
        seen.update(problems=list(problems), texts=list(roll.texts), rewards=rewards.clone())
        return real_correct(problems, roll, rewards)

    def spy_clip(h, groups=None):
        seen.update(groups=groups, probe=tr.controller.probe, h=torch.as_tensor(h).clone())
        seen["clip"] = real_clip(h, groups=groups)
        return seen["clip"]

    monkeypatch.setattr(tr.engine, "sample", spy_sample)
    monkeypatch.setattr(tr, "update", spy_update)
    monkeypatch.setattr(tr, "_correct", spy_correct)
    monkeypatch.setattr(tr.controller, "clip_step", spy_clip)
    monkeypatch.setattr(tr, "score", spy_score)


def test_grpo_step_refills_the_groups_it_drops(warm, monkeypatch):
    """Round 1 has one informative group of 4, so a second round of 4 fresh prompts is drawn;
    it has three: the step trains on round 1's group 2 and round 2's groups 0, 2, 3 (step
    groups 2, 4, 6, 7), with their own rewards' advantages, and every generated token counts."""
    model, tok, train = warm
    cfg = small_cfg()
    cfg.controller.adaptive_clip = cfg.controller.adaptive_temp = False
    cfg.rollout.filter_groups, cfg.run.dump_groups = True, True
    cfg.rollout.reward = _designed_rewards(ROUND1 + ROUND2)
    tr = Trainer(cfg, copy.deepcopy(model), tok, train)
    seen = {}
    _spied(tr, monkeypatch, seen)
    m = tr.step()
    (p1, g1, r1), (p2, g2, r2) = seen["phases"]
    assert g1 == g2 == 4 and len(p1) == len(p2) == 4 and p1 != p2 and tr.sampler.pos == 8
    assert seen["rows"] == 16
    want_texts = r1.texts[8:12] + r2.texts[0:4] + r2.texts[8:16]
    assert seen["texts"] == want_texts
    trained_rewards = torch.tensor([ROUND1[8:12], ROUND2[0:4], ROUND2[8:12], ROUND2[12:16]], dtype=torch.float64)
    torch.testing.assert_close(seen["rewards"], trained_rewards)
    torch.testing.assert_close(seen["adv"], tr.controller.advantages(trained_rewards).reshape(-1))
    assert seen["groups"] == [2, 4, 6, 7]
    assert m["filter/rounds"] == 2 and m["filter/groups"] == 4 and m["filter/informative_frac"] == 0.5
    assert m["reward/zero_std_frac"] == 0.0
    assert m["tokens/generated_train"] == r1.generated_tokens + r2.generated_tokens  # the dropped groups' too
    assert m["tokens/generated_total"] == tr.tokens_generated == tr.last_step_tokens
    assert math.isfinite(m["kl/step"])
    dump = tr.last_groups  # every sampled group, the dropped ones with their pass counts and no eps
    assert [r["group"] for r in dump] == list(range(8))
    assert [r["train_pass"] for r in dump] == [0, 4, 2, 0, 1, 4, 2, 2]
    assert [r["trained"] for r in dump] == [False, False, True, False, True, False, True, True]
    assert [r["eps"] is None for r in dump] == [not r["trained"] for r in dump]


def test_agpo_step_refills_with_a_probe_per_round(warm, monkeypatch):
    """With AGPO each round draws its probe (at tau_base) before its train groups: the
    temperature baseline runs over both rounds' probe groups in order, and the clip reads the
    merged statistics at the trained groups' step positions."""
    model, tok, train = warm
    cfg = small_cfg()
    cfg.rollout.filter_groups, cfg.rollout.probe_size, cfg.controller.dispersion = True, 2, "std"
    cfg.rollout.probe_reuse = False  # the probe trains nothing: the trained groups are the train groups alone
    probe1, probe2 = [0, 1, 1, 1, 0, 0, 0, 1], [1, 1, 0, 1, 0, 0, 1, 0]
    cfg.rollout.reward = _designed_rewards(probe1 + ROUND1 + probe2 + ROUND2)
    tr = Trainer(cfg, copy.deepcopy(model), tok, train)
    seen = {}
    _spied(tr, monkeypatch, seen)
    m = tr.step()
    assert [(len(p), g) for p, g, _ in seen["phases"]] == [(4, 2), (4, 4), (4, 2), (4, 4)]
    assert seen["phases"][0][0] == seen["phases"][1][0] and seen["phases"][2][0] == seen["phases"][3][0]
    assert seen["groups"] == [2, 4, 6, 7]
    probe = seen["probe"]
    assert len(probe.sigma) == 8
    sd = lambda k: math.sqrt(k * (2 - k) / 2)  # unbiased sd of k ones among 2 binary rewards (std dispersion)
    pairs = [probe1[i:i + 2] for i in range(0, 8, 2)] + [probe2[i:i + 2] for i in range(0, 8, 2)]
    assert list(probe.sigma) == pytest.approx([sd(sum(p)) for p in pairs], abs=1e-9)
    # each trained group's eps from its own step position's statistics
    c, ctl = cfg.controller, tr.controller
    h = seen["h"].tolist()
    mask, ent = seen["scored"]  # each trained group's token-mean entropy, in the trained rows' order
    want_h = [float((ent[4 * i:4 * i + 4] * mask[4 * i:4 * i + 4]).sum() / mask[4 * i:4 * i + 4].sum()) for i in range(4)]
    assert h == pytest.approx(want_h, rel=1e-5)
    ref = h[0]
    want = []
    for i, g in enumerate(seen["groups"]):
        want.append(adaptive_clip(probe.sigma[g], probe.skew[g], probe.entropy[g], entropy_ratio(h[i], ref, c), 0.0, c))
        ref = c.h_ref_alpha * h[i] + (1 - c.h_ref_alpha) * ref
    assert seen["clip"].tolist() == pytest.approx(want, rel=1e-6)
    assert seen["eps"].tolist() == pytest.approx([e for e in want for _ in range(4)], rel=1e-6)
    assert m["tokens/generated_probe"] == seen["phases"][0][2].generated_tokens + seen["phases"][2][2].generated_tokens
    assert ctl.probe_used


def test_a_step_that_finds_nothing_trains_on_one_group(warm, monkeypatch):
    """Every group all equal for --filter-rounds rounds: the step stops there and trains on
    its first group (zero advantages), having counted every round's tokens."""
    model, tok, train = warm
    cfg = small_cfg()
    cfg.controller.adaptive_clip = cfg.controller.adaptive_temp = False
    cfg.rollout.filter_groups, cfg.rollout.filter_rounds = True, 3
    cfg.rollout.reward = _designed_rewards([1.0] * 16)
    tr = Trainer(cfg, copy.deepcopy(model), tok, train)
    seen = {}
    _spied(tr, monkeypatch, seen)
    m = tr.step()
    assert len(seen["phases"]) == 3 and seen["rows"] == 4
    assert seen["texts"] == seen["phases"][0][2].texts[:4]
    assert torch.all(seen["adv"] == 0)
    assert m["filter/rounds"] == 3 and m["filter/groups"] == 1 and m["filter/informative_frac"] == 0.0
    assert m["tokens/generated_train"] == sum(r.generated_tokens for _, _, r in seen["phases"])


@pytest.mark.timeout(400)
def test_refill_at_two_ranks_matches_one_process(tmp_path):
    """--filter-groups with AGPO's probe under torchrun: rounds, the non-contiguous trained
    groups of each rank, the merged statistics and the gathers in step order give the run of
    one process. The designed reward drops the prompts whose answer is a multiple of 3 and
    passes the others once or twice in 4, so their eps differ: a rank that applied another
    group's eps to its rows would clip other tokens."""
    over = dict(reward=GRADED, probe_size=4, sft_steps=0, eval_size=0, save_every=0, beta=0.0)
    p = torchrun(argv_for(tmp_path / "ws2", **over) + ["--filter-groups", "--probe-reuse"])
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-5000:]
    cfg = cfg_for(tmp_path / "ws1", **over)
    cfg.rollout.filter_groups = cfg.rollout.probe_reuse = True
    run(cfg)
    a, b = rows(tmp_path / "ws2"), rows(tmp_path / "ws1")
    assert any(r["filter/rounds"] > 1 for r in b) and all(r["eps/max"] > r["eps/min"] for r in b)
    assert_rows_close(a, b)
