"""The evidence round's two probe-free clip arms and its controller dumps:

- ``ControllerConfig(clip_inputs="rewards")``: the clip from the group's reward statistics
  alone; with 0/1 rewards a function of the pass count k/G, checked by hand;
- ``--clip-from-train``: no probe group, every sample at tau_base, the clip controller fed
  by the train group's own statistics (rewards and texts of that very group, all ranks'
  groups in order), on the tiny preset with designed rewards;
- ``--dump-groups``: ``groups.jsonl`` rows (pass counts, sigma/k/E, tau, eps) equal what the
  step used; a resumed run keeps only the rows up to its checkpoint.
"""

import copy
import json
import math

import pytest
import torch

import agpo.rollout.hf
from agpo.algo.controllers import AGPOController, ControllerConfig
from agpo.config import ConfigError, TrainConfig
from agpo.learn.launch import resolve_defaults
from agpo.learn.metrics import GROUPS_FILE, group_rows, keep_group_rows
from agpo.learn.trainer import Trainer


def bernoulli_sd(k: int, G: int) -> float:
    """Unbiased standard deviation of k ones among G 0/1 rewards."""
    return math.sqrt(k * (G - k) / (G * (G - 1)))


def bernoulli_skew(k: int, G: int) -> float:
    """docs/algorithm.md's skewness of k ones among G 0/1 rewards, by hand: the mean of the
    cubed standardised rewards (unbiased std), times sqrt(G(G-1))/(G-2) for G > 2, clamped to
    +-10; 0 for an all-equal group."""
    if k in (0, G):
        return 0.0
    p = k / G
    sd = bernoulli_sd(k, G)
    m3 = p * (1 - p) ** 3 + (1 - p) * (-p) ** 3  # mean of (r - p)^3
    g = m3 / sd**3
    if G > 2:
        g *= math.sqrt(G * (G - 1)) / (G - 2)
    return max(min(g, 10.0), -10.0)


@pytest.mark.parametrize("G, zeta", [(2, 0.0), (5, 0.3), (8, 0.0), (16, 0.5)])
def test_reward_only_clip_is_a_function_of_the_pass_count(G, zeta):
    cfg = ControllerConfig(clip_inputs="rewards", alpha_var=1.7, zeta_skew=zeta)
    g = torch.Generator().manual_seed(G)
    passes = torch.randint(0, G + 1, (12,), generator=g)
    rewards = torch.stack([(torch.randperm(G, generator=g) < k).double() for k in passes.tolist()])
    answers = [[f"a{torch.randint(0, 3, (1,), generator=g).item()}" for _ in range(G)] for _ in range(12)]
    ctl = AGPOController(cfg)
    ctl.step_kl_ema = 0.9  # ignored by this clip, as are the vote and policy entropies
    ctl.probe_step(rewards, answers, extract=None)
    eps = ctl.clip_step(torch.rand(12, generator=g) * 3).tolist()
    want = [min(max(0.2 / (1 + 1.7 * bernoulli_sd(k, G) + zeta * abs(bernoulli_skew(k, G))), 0.05), 0.4)
            for k in passes.tolist()]
    assert eps == pytest.approx(want, abs=1e-6)
    full = AGPOController(ControllerConfig(alpha_var=1.7, zeta_skew=zeta))  # the paper's inputs differ
    full.step_kl_ema = 0.9
    full.probe_step(rewards, answers, extract=None)
    assert full.clip_step(torch.ones(12)).tolist() != pytest.approx(want, abs=1e-3)


def test_clip_inputs_is_checked():
    with pytest.raises(ValueError, match=r"^clip_inputs: expected one of \('all', 'rewards'\), got 'pass'"):
        ControllerConfig(clip_inputs="pass")


def small(**controller) -> TrainConfig:
    cfg = TrainConfig()
    cfg.run.algo = "grpo"
    cfg.controller.adaptive_clip, cfg.controller.adaptive_temp = True, False
    cfg.rollout.prompts_per_step, cfg.rollout.group_size, cfg.rollout.clip_from_train = 4, 4, True
    cfg.run.steps, cfg.run.eval_size, cfg.run.progress = 2, 0, False
    for k, v in controller.items():
        setattr(cfg.controller, k, v)
    return resolve_defaults(cfg)


def designed(pattern):
    """A reward that ignores the text: the step's rows score ``pattern`` in order."""
    calls = [0]

    def reward(prompt, completion, reference):
        calls[0] += 1
        return pattern[(calls[0] - 1) % len(pattern)]
    return reward


PATTERN = [0, 0, 0, 0, 1, 0, 0, 0, 1, 1, 0, 0, 1, 1, 1, 0]  # pass counts 0, 1, 2, 3 of 4


def test_clip_from_train_draws_no_probe_and_clips_from_the_train_group(warm, monkeypatch):
    model, tok, train = warm
    cfg = small(clip_inputs="rewards")
    cfg.rollout.reward = designed(PATTERN)
    tr = Trainer(cfg, copy.deepcopy(model), tok, train)
    taus, seen = [], []
    real_sample, real_probe = agpo.rollout.hf.sample_groups, tr.controller.probe_step

    def spy_sample(*a, **kw):
        taus.append(a[3].clone())
        return real_sample(*a, **kw)

    def spy_probe(rewards, answers, **kw):
        seen.append((rewards.clone(), [list(a) for a in answers]))
        return real_probe(rewards, answers, **kw)

    monkeypatch.setattr(agpo.rollout.hf, "sample_groups", spy_sample)
    monkeypatch.setattr(tr.controller, "probe_step", spy_probe)
    for _ in range(2):
        m = tr.step()
    assert len(taus) == 2 and all(bool((t == 1.0).all()) for t in taus)  # one rollout per step, at tau_base
    assert m["tokens/generated_probe"] == 0 and m["tau/mean"] == pytest.approx(1.0)
    rewards, answers = seen[-1]  # the controller read the train group itself
    assert rewards.tolist() == [PATTERN[i:i + 4] for i in range(0, 16, 4)]
    assert all(len(a) == 4 for a in answers)
    want = [min(max(0.2 / (1 + bernoulli_sd(k, 4)), 0.05), 0.4) for k in (0, 1, 2, 3)]
    assert [m["eps/min"], m["eps/max"]] == pytest.approx([min(want), max(want)], abs=1e-6)


def test_clip_from_train_refuses_what_it_cannot_do():
    cfg = TrainConfig()
    cfg.rollout.clip_from_train = True  # --algo agpo: the temperature controller is on
    with pytest.raises(ConfigError, match=r"^--clip-from-train: the clip reads the train group's statistics.*"
                                          r"--algo grpo --adaptive-clip --clip-from-train"):
        resolve_defaults(TrainConfig.from_dict(cfg.to_dict()))
    d = small().to_dict()
    d["rollout"]["probe_reuse"] = True
    with pytest.raises(ConfigError, match=r"--probe-reuse"):
        TrainConfig.from_dict(d)


def test_dump_rows_are_what_the_step_used(warm, tmp_path):
    model, tok, train = warm
    cfg = TrainConfig()
    cfg.rollout.prompts_per_step, cfg.rollout.group_size = 4, 4
    cfg.run.eval_size, cfg.run.progress, cfg.run.dump_groups = 0, False, True
    cfg = resolve_defaults(cfg)
    tr = Trainer(cfg, copy.deepcopy(model), tok, train)
    m = tr.step()
    rows = tr.last_groups
    assert [r["group"] for r in rows] == [0, 1, 2, 3] and all(r["step"] == 1 for r in rows)
    probe = tr.controller.probe
    assert [r["tau"] for r in rows] == pytest.approx(list(probe.tau), abs=1e-5)
    assert [r["sigma"] for r in rows] == pytest.approx(list(probe.sigma), rel=1e-5)
    assert [r["E"] for r in rows] == pytest.approx(list(probe.entropy), rel=1e-5)
    for r in rows:  # 0/1 rewards: the probe's dispersion is its pass count's
        assert r["sigma"] == pytest.approx(bernoulli_sd(r["probe_pass"], 4), abs=1e-9)
        assert 0 <= r["train_pass"] <= r["train_size"] == 4
    assert max(r["eps"] for r in rows) == pytest.approx(m["eps/max"], abs=1e-6)
    json.dumps(rows)  # plain JSON


def test_group_rows_of_a_filtered_step_and_the_resume_trim(tmp_path):
    keep = torch.tensor([True, False, True])
    rows = group_rows(7, torch.tensor([[1.0, 0.0], [1.0, 1.0]]), torch.tensor([0.9, 1.0, 1.1]),
                      torch.tensor([0.15, 0.25], dtype=torch.float64), keep, torch.tensor([[0.0, 1.0], [0.0, 0.0], [1.0, 1.0]]), None)
    assert [(r["train_pass"], r["probe_pass"], r["eps"]) for r in rows] == [(1, 1, 0.15), (None, 0, None),
                                                                            (2, 2, 0.25)]
    nan = group_rows(1, torch.ones(1, 2), torch.tensor([float("nan")]), torch.tensor([0.2]), torch.tensor([True]),
                     None, None)
    assert nan[0]["tau"] is None and json.dumps(nan, allow_nan=False)  # strict JSON
    path = tmp_path / GROUPS_FILE
    path.write_text("".join(json.dumps({"step": s, "group": 0}) + "\n" for s in (1, 2, 3, 4)) + '{"step": 5, "gr')
    keep_group_rows(path, 2)  # the cut last line (a kill mid-write) is dropped, not fatal
    assert [json.loads(x)["step"] for x in path.read_text().splitlines()] == [1, 2]
    keep_group_rows(tmp_path / "absent.jsonl", 2)  # nothing to trim


def test_a_run_writes_groups_jsonl(tmp_path):
    from agpo.learn.launch import run

    cfg = small(clip_inputs="rewards")
    cfg.warmup.sft_steps, cfg.run.dump_groups, cfg.run.out_dir = 20, True, str(tmp_path / "run")
    run(cfg)
    rows = [json.loads(x) for x in (tmp_path / "run" / GROUPS_FILE).read_text().splitlines()]
    assert [(r["step"], r["group"]) for r in rows] == [(s, p) for s in (1, 2) for p in range(4)]
    for r in rows:  # GRPO + the reward-only clip from the train group: no probe, tau_base, eps from k/G
        assert r["probe_pass"] is None and r["tau"] == 1.0
        assert r["sigma"] == pytest.approx(bernoulli_sd(r["train_pass"], 4), abs=1e-9)
        assert r["eps"] == pytest.approx(min(max(0.2 / (1 + r["sigma"]), 0.05), 0.4), abs=1e-6)
