"""The engine-independent parts of ``agpo.rollout``: the HF engine's own log-probs, the
policy's weights as an engine receives them, truncated importance sampling and the
mismatch figures (float64 references), engine selection, and the trainer passing the
TIS weight into the loss. The vLLM engine itself: tests/test_vllm_rollout.py."""

import copy
import importlib.util
import math

import pytest
import torch

import agpo.learn.policy
from agpo.config import TrainConfig
from agpo.learn.launch import resolve_defaults
from agpo.learn.trainer import Trainer
from agpo.models import build_char_tokenizer, build_tiny_model
from agpo.rollout import HFEngine, resolve_engine, sample_groups, top_p_filter
from agpo.rollout.correction import importance_weights, mismatch_metrics, mismatch_sums
from agpo.rollout.weights import policy_weights
from agpo.tasks.data import load_problems
from agpo.train import main

PROMPTS = ["12+34=", "7*8=", "100-1=", "5+5="]


@pytest.fixture(scope="module")
def tiny():
    tok = build_char_tokenizer()
    return build_tiny_model(tok, seed=0).eval(), tok


# -- the HF engine's log-probs -----------------------------------------------------------
@pytest.mark.parametrize("tau,top_p", [(0.7, 1.0), (2.0, 1.0), (1.0, 0.6)])
def test_hf_engine_logprobs_are_those_of_the_sampled_distribution(tiny, tau, top_p):
    """Recorded log-probs = log_softmax(top_p_filter(z / tau)) of the sampled token, z from
    a fresh float64 forward of prompt + completion (no KV cache, no padding)."""
    model, tok = tiny
    roll = sample_groups(model, tok, PROMPTS, torch.full((4,), tau), group_size=3, max_new_tokens=6, top_p=top_p,
                         seed=4, stream=1)
    m64 = copy.deepcopy(model).double()
    b = roll.batch
    checked = 0
    for r in range(b.rows):
        n = int(b.completion_mask[r].sum())
        prompt = b.prompt_ids[r][b.prompt_mask[r].bool()]
        seq = torch.cat([prompt, b.completion_ids[r, :n]]).unsqueeze(0)
        with torch.no_grad():
            z = m64(seq).logits[0, prompt.numel() - 1:-1] / tau
        ref = torch.log_softmax(top_p_filter(z, top_p), -1).gather(1, b.completion_ids[r, :n, None])[:, 0]
        # fp32 engine against a float64 forward: a few ulps of |z| (< 10) per logit
        assert torch.allclose(roll.logprobs[r, :n].double(), ref, rtol=0, atol=2e-5), (r, roll.logprobs[r, :n], ref)
        assert (roll.logprobs[r, n:] == 0).all()
        checked += n
    assert checked > 20


# -- weights as an engine receives them ------------------------------------------------
def test_policy_weights_are_the_checkpoint_with_tied_head(tiny):
    model, _ = tiny
    got = dict(policy_weights(model))
    sd = model.state_dict()
    assert set(got) == set(sd)  # the tied head under both names, nothing else
    for k, v in sd.items():
        assert torch.equal(got[k], v), k


def test_policy_weights_merge_lora_like_peft(tiny):
    """Merged stream = peft's own merge_and_unload of a copy (an independent reference),
    with plain names; the frozen base arrives too."""
    from agpo.scale.lora import apply_lora

    model, _ = tiny
    peft_model = apply_lora(copy.deepcopy(model), rank=4, alpha=8.0)
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_" in n:
                p.normal_(0, 0.2, generator=torch.Generator().manual_seed(len(n)))
    got = dict(policy_weights(peft_model))
    ref = copy.deepcopy(peft_model).merge_and_unload().state_dict()
    assert set(got) == set(ref)
    assert not any("lora" in k or "base_layer" in k for k in got)
    for k, v in ref.items():
        torch.testing.assert_close(got[k].float(), v.float(), rtol=0, atol=1e-6)  # fp32 merge, one rounding
    changed = [k for k in ref if not torch.equal(ref[k], model.state_dict()[k])]
    assert any("q_proj.weight" in k for k in changed) and not any("embed" in k for k in changed)
    with peft_model.disable_adapter():  # adapters off: the base, bit for bit
        for k, v in policy_weights(peft_model):
            assert torch.equal(v, model.state_dict()[k]), k


# -- truncated importance sampling -----------------------------------------------------
def _problem(seed=0, R=5, C=7):
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(R, C, generator=g, dtype=torch.float64) * 4
    eng = old + torch.randn(R, C, generator=g, dtype=torch.float64) * 0.3
    mask = (torch.rand(R, C, generator=g) > 0.3).long()
    mask[2] = 0  # a fully masked row
    return old.float(), eng.float(), mask


def test_token_tis_against_float64():
    old, eng, mask = _problem()
    w = importance_weights(old, eng, mask, mode="token", cap=2.0)
    for r in range(old.shape[0]):
        for c in range(old.shape[1]):
            want = min(math.exp(float(old[r, c]) - float(eng[r, c])), 2.0) if mask[r, c] else 0.0
            assert abs(float(w[r, c]) - want) <= 1e-6 * max(1.0, want)
    assert importance_weights(old, eng, mask, mode="off", cap=2.0) is None


def test_seq_tis_against_float64_and_extremes():
    old, eng, mask = _problem(seed=1)
    old[0, mask[0].bool()] += 50.0  # exp overflows float32 and float64 sums: must give the cap
    eng[1, mask[1].bool()] += 50.0  # a vanishing weight: 0, not NaN
    w = importance_weights(old, eng, mask, mode="seq", cap=1.5)
    for r in range(old.shape[0]):
        s = sum(float(old[r, c]) - float(eng[r, c]) for c in range(old.shape[1]) if mask[r, c])
        want = min(math.exp(min(s, 700.0)), 1.5)
        for c in range(old.shape[1]):
            assert abs(float(w[r, c]) - (want if mask[r, c] else 0.0)) <= 1e-6, (r, c)
    assert torch.isfinite(w).all() and float(w[0].max()) == 1.5 and float(w[1].max()) < 1e-20


def test_tis_bad_input():
    old, eng, mask = _problem()
    with pytest.raises(ValueError, match="--tis"):
        importance_weights(old, eng, mask, mode="tok", cap=2.0)
    with pytest.raises(ValueError, match="--tis-cap"):
        importance_weights(old, eng, mask, mode="token", cap=0.0)
    with pytest.raises(ValueError, match="shapes"):
        importance_weights(old, eng[:, :3], mask, mode="token", cap=2.0)


def test_mismatch_figures_hand_computed():
    old = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -0.5, 0.0]])
    eng = torch.tensor([[-1.0, -2.2, -2.95], [-0.5, -0.3, 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    w = importance_weights(old, eng, mask, mode="token", cap=1.1)
    m = mismatch_metrics(mismatch_sums(old, eng, mask, w, 1.1))
    # |d| = 0, 0.2, 0.05, 0, 0.2 over 5 tokens; ratios 1, e^0.2 = 1.22 (out), e^-0.05 = 0.95,
    # 1, e^-0.2 = 0.82 (out); weights 1, 1.1 (capped), 0.951, 1, 0.819
    assert m["rollout/logprob_abs_diff_mean"] == pytest.approx(0.45 / 5, abs=1e-6)
    assert m["rollout/ratio_outside_frac"] == pytest.approx(2 / 5)
    assert m["rollout/tis_weight_mean"] == pytest.approx((1 + 1.1 + math.exp(-0.05) + 1 + math.exp(-0.2)) / 5, abs=1e-6)
    assert m["rollout/tis_capped_frac"] == pytest.approx(1 / 5)


# -- engine choice and the trainer -----------------------------------------------------
def test_auto_engine_and_tis_defaults():
    assert resolve_engine("auto", "cpu") == "hf"
    assert resolve_engine("hf", "cuda") == "hf" and resolve_engine("vllm", "cpu") == "vllm"
    with pytest.raises(ValueError, match="--rollout"):
        resolve_engine("sglang", "cpu")
    cfg = TrainConfig()
    cfg.model.device = "cpu"
    cfg = resolve_defaults(cfg)
    assert cfg.rollout.engine == "hf" and cfg.loss.tis == "off"
    cfg = TrainConfig()
    cfg.model.device, cfg.rollout.engine = "cpu", "vllm"
    assert resolve_defaults(cfg).loss.tis == "token"


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM is installed here")
def test_vllm_missing_is_a_clear_error(tmp_path, capsys):
    code = main(["--rollout", "vllm", "--out-dir", str(tmp_path / "r"), "--no-progress", "--sft-steps", "0",
                 "--eval-size", "0", "--steps", "1"])
    assert code == 2
    assert "--rollout vllm: vLLM is not importable" in capsys.readouterr().err


def test_trainer_passes_the_tis_weight_to_the_loss(tmp_path, monkeypatch):
    """--tis token on the HF engine: the loss gets is_weight = min(pi_old / pi_engine, cap)
    of this step's rollout (near 1: same weights), and the step reports the mismatch."""
    cfg = TrainConfig()
    cfg.model.device, cfg.loss.tis, cfg.loss.tis_cap = "cpu", "token", 1.5
    cfg.rollout.prompts_per_step, cfg.rollout.group_size = 2, 4
    cfg.run.eval_size, cfg.run.progress, cfg.run.out_dir, cfg.warmup.sft_steps = 0, False, str(tmp_path), 0
    cfg = resolve_defaults(cfg)
    tok = build_char_tokenizer()
    tr = Trainer(cfg, build_tiny_model(tok, seed=0), tok, load_problems(cfg.data, split="train"))
    assert isinstance(tr.engine, HFEngine)
    seen = []
    real = agpo.learn.policy.agpo_loss

    def spy(*a, **kw):  # packed micro-batches (the default): one weight per real token, no mask
        targets = a[2]
        mask = kw["mask"].clone() if kw.get("mask") is not None else torch.ones_like(targets, dtype=torch.bool)
        seen.append((kw["is_weight"].clone(), mask))
        return real(*a, **kw)

    monkeypatch.setattr(agpo.learn.policy, "agpo_loss", spy)
    m = tr.step()
    assert seen and all(w.shape == mask.shape for w, mask in seen)
    for w, mask in seen:
        assert (w[~mask] == 0).all() and (w[mask] > 0.999).all() and (w[mask] < 1.001).all()
    assert m["rollout/logprob_abs_diff_mean"] < 1e-4 and m["rollout/ratio_outside_frac"] == 0.0
    assert m["rollout/tis_weight_mean"] == pytest.approx(1.0, abs=1e-3)
