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

    def no_reward(completion_ids, **kwargs):
        return [None] * len(completion_ids)
    trainer = make(model_dir, tmp_path, reward_funcs=no_reward, max_steps=1)
    with pytest.raises(ValueError, match="^reward_funcs: every reward function returned None"):
        trainer.train()
