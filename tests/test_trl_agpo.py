"""Full AGPO inside TRL (agpo.integrations.trl.AGPOTrainer) on a tiny random Qwen2, on CPU.

``trainer.train()`` runs the probe, the per-prompt temperature and the per-group clip; the
old log-probs at per-row temperature equal TRL's own scoring run one temperature at a
time; a resumed run continues the controller exactly; bad setups fail with one line.
"""

import math

import pytest
import torch

pytest.importorskip("trl")
pytest.importorskip("datasets")

from test_trl_integration import DATA, G, even_tokens, model_dir  # noqa: E402,F401
from trl import GRPOConfig, GRPOTrainer  # noqa: E402

from agpo.algo.controllers import ControllerConfig  # noqa: E402
from agpo.integrations.trl import STATE_FILE, AGPOTrainer, AGPOTRLConfig  # noqa: E402

# lambda_temp and the tau range wide enough that the temperature visibly moves on a toy reward
CONTROLLER = ControllerConfig(lambda_temp=1.0, tau_min=0.5, tau_max=1.6)


def make(model_dir, tmp_path, *, agpo=None, reward_funcs=even_tokens, **overrides):
    opts = dict(output_dir=str(tmp_path), use_cpu=True, bf16=False, report_to=[], max_completion_length=8,
                num_generations=G, per_device_train_batch_size=4, max_steps=3, logging_steps=1,
                save_strategy="no", learning_rate=1e-3, seed=0, temperature=1.0)
    opts.update(overrides)
    return AGPOTrainer(model=model_dir, reward_funcs=reward_funcs, args=GRPOConfig(**opts), train_dataset=DATA,
                       agpo=agpo or AGPOTRLConfig(controller=CONTROLLER))


def record_batches(trainer):
    seen = []
    inner = trainer._generate_and_score_completions

    def wrapped(inputs):
        batch = inner(inputs)
        if trainer.model.training:
            seen.append({k: v.detach().clone() for k, v in batch.items() if torch.is_tensor(v)})
        return batch
    trainer._generate_and_score_completions = wrapped
    return seen


def test_train_runs_the_probe_the_temperature_and_the_clip(model_dir, tmp_path):
    trainer = make(model_dir, tmp_path)
    seen = record_batches(trainer)
    trainer.train()
    ctl = trainer.controller
    assert trainer.state.global_step == 3 and len(seen) == 3
    assert ctl.probe_steps == 3 and ctl.clip_steps == 3 and ctl.kl_steps == 2  # the last update's KL: next batch
    for batch in seen:
        tau, eps = batch["temperature"], batch["eps_low"]
        assert tau.shape == eps.shape == (4,)
        assert torch.equal(tau.view(-1, G), tau.view(-1, G)[:, :1].expand(-1, G))  # one temperature per group
        assert bool(((tau >= CONTROLLER.tau_min) & (tau <= CONTROLLER.tau_max)).all())
        assert bool(((eps >= CONTROLLER.eps_min) & (eps <= CONTROLLER.eps_max)).all())
        assert torch.equal(batch["eps_high"], eps)
    taus = torch.cat([b["temperature"] for b in seen])
    assert taus.unique().numel() > 1, "the temperature controller never moved"
    logs = {k for row in trainer.state.log_history for k in row}
    assert {"agpo/tau_mean", "agpo/eps_mean", "agpo/probe_tokens", "agpo/generated_tokens", "agpo/step_kl"} <= logs
    assert trainer.agpo_tokens["probe"] > 0 and trainer.agpo_tokens["train"] > 0


def test_old_logps_at_row_temperature_equal_trl_scoring_one_temperature_at_a_time(model_dir, tmp_path):
    trainer = make(model_dir, tmp_path)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(2, 40, (4, 11), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # a left-padded prompt
    tau = torch.tensor([0.7, 0.7, 1.3, 1.3])
    trainer._agpo_rows_tau = tau
    ours, _, _ = trainer._get_per_token_logps_and_entropies(trainer.model, ids, mask, 5)
    trainer._agpo_rows_tau = None
    for t in (0.7, 1.3):
        plain = GRPOTrainer(model=model_dir, reward_funcs=even_tokens, train_dataset=DATA,
                            args=GRPOConfig(output_dir=str(tmp_path / f"t{t}"), use_cpu=True, bf16=False, report_to=[],
                                            num_generations=G, per_device_train_batch_size=4, temperature=t,
                                            max_completion_length=8))
        rows = tau == t
        theirs, _, _ = plain._get_per_token_logps_and_entropies(plain.model, ids[rows], mask[rows], 5)
        torch.testing.assert_close(ours[rows], theirs, rtol=1e-5, atol=1e-5)


def test_resume_continues_the_controller_exactly(model_dir, tmp_path):
    full = make(model_dir, tmp_path / "full", max_steps=3)
    seen_full = record_batches(full)
    full.train()
    part = make(model_dir, tmp_path / "part", max_steps=3, save_strategy="steps", save_steps=2)
    part.train()
    ckpt = tmp_path / "part" / "checkpoint-2"
    assert (ckpt / STATE_FILE).exists()
    resumed = make(model_dir, tmp_path / "part", max_steps=3)
    seen_resumed = record_batches(resumed)
    resumed.train(resume_from_checkpoint=str(ckpt))
    assert len(seen_resumed) == 1
    torch.testing.assert_close(seen_resumed[0]["temperature"], seen_full[2]["temperature"])
    torch.testing.assert_close(seen_resumed[0]["eps_low"], seen_full[2]["eps_low"])
    a, b = full.controller.state_dict(), resumed.controller.state_dict()
    for k in a:
        if isinstance(a[k], float):
            assert math.isclose(a[k], b[k], rel_tol=1e-6, abs_tol=1e-9), k
        else:
            assert a[k] == b[k] or k == "probe", k


def test_bad_setups_fail_with_one_line_naming_the_fix(model_dir, tmp_path):
    with pytest.raises(ValueError, match="^use_vllm: .*use_vllm=False"):
        make(model_dir, tmp_path, use_vllm=True)
    with pytest.raises(ValueError, match="top_k"):
        make(model_dir, tmp_path, top_k=5)
    with pytest.raises(TypeError, match="^agpo: expected an AGPOTRLConfig"):
        make(model_dir, tmp_path, agpo=CONTROLLER)
    args = GRPOConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, report_to=[], num_generations=G,
                      per_device_train_batch_size=4)
    args.num_generations = 1  # GRPOConfig itself refuses 1 at construction; a later change reaches us
    with pytest.raises(ValueError, match="^num_generations: 1; AGPO's group statistics need >= 2"):
        AGPOTrainer(model=model_dir, reward_funcs=even_tokens, args=args, train_dataset=DATA)

    def no_reward(completion_ids, **kwargs):
        return [None] * len(completion_ids)
    trainer = make(model_dir, tmp_path, reward_funcs=no_reward, max_steps=1)
    with pytest.raises(ValueError, match="^reward_funcs: every reward function returned None"):
        trainer.train()


@pytest.mark.parametrize("reuse", [False, True], ids=["probe", "probe-reuse"])
def test_the_trl_step_takes_agpo_train_steps_decisions(warm, tmp_path, reuse):
    """The same tiny model, prompts (agpo's prompt order, TRL unshuffled), seed and reward:
    TRL's AGPO picks the same per-prompt temperatures and eps as ``agpo.train``'s step, step
    after step (a learning rate of 1e-12 keeps both policies where they are, so the samples,
    keyed by (seed, step, phase, row) in both, are the same). With probe reuse TRL's groups
    are the train rows followed by the probe rows."""
    import copy

    from datasets import Dataset

    from agpo.learn.trainer import Trainer
    from agpo.tasks.rewards import correctness_reward, score_batch
    from test_train import small_cfg

    model, tok, train = warm
    P, G, N = 2, 4, 3
    cfg = small_cfg()
    cfg.rollout.prompts_per_step, cfg.rollout.group_size = P, G
    cfg.optim.lr = 1e-12
    cfg.optim.update_epochs = 1
    cfg.controller.lambda_temp = 1.0
    cfg.rollout.probe_reuse, cfg.rollout.probe_size = reuse, (G if reuse else None)
    # correctness plus a per-row offset (the same in every phase: phases score P * G rows in
    # order), so that the groups differ whatever the warm model samples and tau moves
    offset, calls = [0.0, 0.0, 0.5, 0.0, 0.3, 0.9, 0.0, 0.6], [0]

    def mixed(prompt, completion, reference):
        calls[0] += 1
        return correctness_reward(prompt, completion, reference) + offset[(calls[0] - 1) % len(offset)]
    cfg.rollout.reward = mixed
    ours = Trainer(cfg, copy.deepcopy(model), tok, train)
    order = copy.deepcopy(ours.sampler)
    problems = [q for _ in range(N) for q in order.next(P)]
    assert all(q.verbatim for q in problems)  # the a+b= task: the prompt is the text, no stop string
    seen = {"tau": [], "eps": []}
    probe_step, clip_step = ours.controller.probe_step, ours.controller.clip_step
    ours.controller.probe_step = lambda *a, **k: seen["tau"].append(probe_step(*a, **k)) or seen["tau"][-1]
    ours.controller.clip_step = lambda *a, **k: seen["eps"].append(clip_step(*a, **k)) or seen["eps"][-1]
    for _ in range(N):
        ours.step()

    folder = tmp_path / "tiny"
    copy.deepcopy(model).save_pretrained(folder)
    tok.save_pretrained(folder)

    def reward(prompts, completions, reference, **kwargs):
        return score_batch(ours.reward_fn, prompts, completions, reference, on_error="zero",
                           verifier=ours.verifier).values

    data = Dataset.from_dict({"prompt": [q.prompt for q in problems], "reference": [q.reference for q in problems]})
    rows = 2 * G if reuse else G  # TRL's num_generations: with reuse, the train group and the probe
    args = GRPOConfig(output_dir=str(tmp_path / "trl"), use_cpu=True, bf16=False, report_to=[], num_generations=rows,
                      per_device_train_batch_size=P * rows, max_steps=N, max_completion_length=cfg.rollout.max_new_tokens,
                      temperature=cfg.controller.tau_base, shuffle_dataset=False, learning_rate=1e-12, seed=0,
                      save_strategy="no", logging_steps=1, beta=0.0)
    trl_trainer = AGPOTrainer(model=str(folder), reward_funcs=reward, args=args, train_dataset=data,
                              agpo=AGPOTRLConfig(controller=cfg.controller, seed=cfg.run.seed, probe_reuse=reuse,
                                                 probe_size=G if reuse else None))
    batches = record_batches(trl_trainer)
    trl_trainer.train()
    assert len(batches) == N
    taus = torch.cat(seen["tau"])
    assert taus.unique().numel() > 2, f"the temperature controller barely moved: {taus}"
    for s, batch in enumerate(batches):
        tau = batch["temperature"].view(P, rows)[:, 0]
        eps = batch["eps_low"].view(P, rows)[:, 0]
        if reuse:  # the probe rows at tau_base, the group's eps
            assert bool((batch["temperature"].view(P, rows)[:, G:] == cfg.controller.tau_base).all())
            assert bool((batch["eps_low"].view(P, rows) == eps[:, None]).all())
        torch.testing.assert_close(tau, seen["tau"][s], rtol=1e-5, atol=1e-6, msg=f"tau at step {s}")
        torch.testing.assert_close(eps, seen["eps"][s], rtol=1e-5, atol=1e-6, msg=f"eps at step {s}")
    a, b = ours.controller.state_dict(), trl_trainer.controller.state_dict()
    for k in ("baseline", "h_ref", "h_count", "probe_steps", "clip_steps"):
        assert a[k] == pytest.approx(b[k], rel=1e-5, abs=1e-7), k


def test_the_example_runs_full_agpo_and_prints_what_the_controllers_chose():
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "examples/trl_agpo.py", "--steps", "2", "--sft-steps", "100"], cwd=root,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = [line for line in out.stdout.splitlines() if line.startswith("step ")]
    assert [line.split(":")[0] for line in lines] == ["step 1", "step 2"], out.stdout[-2000:]
    assert all(" tau " in line and " eps " in line and "probe tokens" in line for line in lines)


def test_evaluation_samples_at_tau_base_and_leaves_the_controller_alone(model_dir, tmp_path):
    trainer = make(model_dir, tmp_path)
    trainer.model.eval()
    before = trainer.controller.state_dict()
    batch = trainer._generate_and_score_completions([{"prompt": p} for p in DATA["prompt"][:2] for _ in range(G)])
    assert batch["completion_ids"].shape[0] == 2 * G and "eps_low" not in batch
    assert trainer.controller.state_dict() == before and trainer.agpo_tokens == {"probe": 0, "train": 0}
    assert trainer._agpo_rows_tau is None


def test_off_policy_batches_reuse_trl_old_logps_scored_at_the_row_temperatures(model_dir, tmp_path):
    """With several updates per generation TRL scores old log-probs itself (through the
    per-row-temperature override); the clip's pending step-KL batch reuses them: they equal a
    fresh scoring of the rows at their temperatures."""
    trainer = make(model_dir, tmp_path, num_iterations=2, max_steps=2)
    seen = record_batches(trainer)
    pending = []
    inner = trainer._generate_and_score_completions

    def keep(inputs):
        batch = inner(inputs)
        pending.append(trainer._agpo_pending)
        return batch
    trainer._generate_and_score_completions = keep
    trainer.train()
    assert len(seen) == 1 and "old_per_token_logps" in seen[0]
    rows, tau, old = pending[0]
    torch.testing.assert_close(old, seen[0]["old_per_token_logps"])
    fresh, _ = trainer.policy_token_stats({**seen[0], **rows}, temperature=tau.view(-1, 1))
    mask = rows["completion_mask"].bool()
    assert not torch.allclose(fresh[mask], old[mask])  # the policy moved after two updates...
    trainer2 = make(model_dir, tmp_path / "b", num_iterations=2, max_steps=2)
    fresh0, _ = trainer2.policy_token_stats({**seen[0], **rows}, temperature=tau.view(-1, 1))
    torch.testing.assert_close(fresh0[mask], old[mask], rtol=1e-5, atol=1e-5)  # ...but not before them
