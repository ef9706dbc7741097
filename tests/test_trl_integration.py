"""AGPOGRPOTrainer (agpo_kernels.integrations.trl) against TRL's own GRPO loss, on CPU.

A tiny random Qwen2 model, a character tokenizer and a toy reward; no mocks. Checks that
the fused loss and its gradients equal TRL's ``_compute_loss`` on the same batch for each
supported ``loss_type`` (with and without the reference KL), that a few GRPO steps run,
that per-sequence eps / temperature in the batch reach the loss, and the controller hook.
"""

import copy
import types

import pytest
import torch

pytest.importorskip("trl")
pytest.importorskip("datasets")

from datasets import Dataset  # noqa: E402
from tokenizers import Tokenizer, models, pre_tokenizers  # noqa: E402
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM  # noqa: E402
from trl import GRPOConfig, GRPOTrainer  # noqa: E402

import agpo_kernels.integrations.trl as trl_module  # noqa: E402
from agpo_kernels.integrations.trl import (  # noqa: E402
    AGPOClipCallback,
    AGPOControllerCallback,
    AGPOGRPOTrainer,
    full_head,
)
from agpo_kernels.precision import resolve_compute_dtype  # noqa: E402

VOCAB = 320
G = 2


def _controllers_missing():
    try:
        import agpo.algo.controllers  # noqa: F401
    except ImportError as exc:
        return str(exc)
    return None


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny random Qwen2 model and a character-level tokenizer saved to a folder."""
    chars = list("abcdefghijklmnopqrstuvwxyz0123456789 +=?.")
    vocab = {"<pad>": 0, "<eos>": 1, **{c: i + 2 for i, c in enumerate(chars)}}
    vocab.update({f"<t{i}>": i for i in range(len(vocab), VOCAB)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
                      pad_token_id=0, eos_token_id=1, bos_token_id=1)
    path = tmp_path_factory.mktemp("tiny_qwen2")
    Qwen2ForCausalLM(cfg).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def even_tokens(completion_ids, **kwargs):
    """Toy reward: the fraction of even token ids in the completion."""
    return [sum(t % 2 == 0 for t in ids) / max(len(ids), 1) for ids in completion_ids]


DATA = Dataset.from_dict({"prompt": ["1+1=", "2+3=", "ab?", "zz.", "7+0=", "c d"] * 2})


def make_trainer(cls, model_dir, tmp_path, callbacks=None, **overrides):
    opts = dict(output_dir=str(tmp_path), use_cpu=True, bf16=False, report_to=[], max_completion_length=8,
                num_generations=G, per_device_train_batch_size=4, max_steps=3, logging_steps=1,
                save_strategy="no", learning_rate=1e-3, seed=0, gradient_checkpointing=False,
                use_bias_correction_kl=False)
    opts.update(overrides)
    return cls(model=model_dir, reward_funcs=even_tokens, args=GRPOConfig(**opts), train_dataset=DATA,
               callbacks=callbacks)


def make_batch(trainer, seed=0):
    """One scored generation batch with off-policy old log-probs (so some ratios clip)."""
    torch.manual_seed(seed)
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1
    prompts = [p for p in DATA["prompt"][:4] for _ in range(G)]  # 4 groups of G, as TRL's sampler
    batch = trainer._generate_and_score_completions([{"prompt": p} for p in prompts])
    ids = batch["completion_ids"]
    with torch.no_grad():
        logp, _ = trainer.policy_token_stats(batch)
    g = torch.Generator().manual_seed(seed)
    batch["old_per_token_logps"] = logp + 0.3 * torch.randn(logp.shape, generator=g)
    if "ref_per_token_logps" in batch:  # the reference equals the fresh policy: make the KL non-zero
        batch["ref_per_token_logps"] = batch["ref_per_token_logps"] + 0.3 * torch.randn(logp.shape, generator=g)
    batch["completion_mask"] = batch["completion_mask"].clone()
    batch["completion_mask"][-1, ids.size(1) // 2:] = 0  # a short completion
    batch["completion_mask"][-2] = 0  # and an empty one (TRL's mean over sequences counts it)
    return batch


def loss_and_grads(fn, trainer, batch):
    trainer.model.zero_grad(set_to_none=True)
    loss = fn(trainer.model, batch)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
    return loss.detach(), grads


@pytest.mark.parametrize("loss_type,beta,kl_fix,ent", [
    ("grpo", 0.0, False, 0.0), ("bnpo", 0.04, False, 0.0), ("dr_grpo", 0.0, False, 0.0), ("dapo", 0.04, False, 0.0),
    ("dapo", 0.2, True, 0.0),
    # TRL's entropy bonus is a token mean whatever the loss type (agpo's default aggregates it like the loss)
    ("grpo", 0.04, False, 0.05), ("dr_grpo", 0.0, False, 0.1), ("dapo", 0.04, False, 0.05),
    ("bnpo", 0.0, False, "accum"), ("dapo", 0.0, False, "accum"),  # the bonus under gradient accumulation
    # TRL's delta (two-sided clipping) is agpo's dual clip when delta > 1 + epsilon_high
    ("grpo", 0.04, False, "delta"), ("dapo", 0.2, True, "delta")])
def test_same_loss_and_gradients_as_trl(model_dir, tmp_path, loss_type, beta, kl_fix, ent):
    delta = dict(delta=1.3) if ent == "delta" else {}
    accum = 3 if ent == "accum" else 1
    ent = {"delta": 0.0, "accum": 0.07}.get(ent, ent)
    trainer = make_trainer(AGPOGRPOTrainer, model_dir, tmp_path, loss_type=loss_type, beta=beta,
                           use_bias_correction_kl=kl_fix, entropy_coef=ent, **delta)
    assert trainer.agpo_fallback is None
    batch = make_batch(trainer)
    trainer.current_gradient_accumulation_steps = accum
    assert (beta > 0) == ("ref_per_token_logps" in batch)
    ours, g_ours = loss_and_grads(trainer.agpo_compute_loss, trainer, batch)
    theirs, g_trl = loss_and_grads(lambda m, b: GRPOTrainer._compute_loss(trainer, m, b), trainer, batch)
    assert trainer._metrics["train"]["clip_ratio/region_mean"][0] > 0  # the clip is exercised
    if delta:  # and the dual clip binds: some negative-advantage token's ratio is above delta
        ratio = torch.exp(trainer.policy_token_stats(batch)[0] - batch["old_per_token_logps"])
        neg = (batch["advantages"].view(-1, 1) < 0) & (batch["completion_mask"] > 0)
        assert bool((ratio[neg] > delta["delta"]).any())
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    assert g_ours.keys() == g_trl.keys() and len(g_ours) > 0
    for name in g_trl:
        torch.testing.assert_close(g_ours[name], g_trl[name], rtol=1e-4, atol=1e-6, msg=name)
    # The metrics TRL logs agree as well.
    m = trainer._metrics["train"]
    for key in ["entropy", "clip_ratio/region_mean"] + (["kl"] if beta else []) + (["policy_loss"] if ent else []):
        assert m[key][0] == pytest.approx(m[key][1], rel=1e-5, abs=1e-6), key


def test_old_logps_absent_matches_trl(model_dir, tmp_path, monkeypatch):
    """On-policy batches carry no old log-probs; TRL then uses its own, detached. Ours come
    from the same forward (old_logp=None): one backbone pass, no scoring pass."""
    trainer = make_trainer(AGPOGRPOTrainer, model_dir, tmp_path, temperature=0.7)
    batch = make_batch(trainer)
    del batch["old_per_token_logps"]
    calls = {"backbone": 0, "linear_logprobs": 0}
    hook = trainer.model.base_model.register_forward_hook(lambda *a: calls.update(backbone=calls["backbone"] + 1))
    real = trl_module.linear_logprobs
    monkeypatch.setattr(trl_module, "linear_logprobs",
                        lambda *a, **k: calls.update(linear_logprobs=calls["linear_logprobs"] + 1) or real(*a, **k))
    ours, g_ours = loss_and_grads(trainer.agpo_compute_loss, trainer, batch)
    hook.remove()
    assert calls == {"backbone": 1, "linear_logprobs": 0}
    theirs, g_trl = loss_and_grads(lambda m, b: GRPOTrainer._compute_loss(trainer, m, b), trainer, batch)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    for name in g_trl:
        torch.testing.assert_close(g_ours[name], g_trl[name], rtol=1e-4, atol=1e-6, msg=name)


def test_grpo_steps_run(model_dir, tmp_path):
    trainer = make_trainer(AGPOGRPOTrainer, model_dir, tmp_path, beta=0.04, loss_type="dapo")
    before = copy.deepcopy(trainer.model.state_dict())
    trainer.train()
    assert trainer.state.global_step == 3
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 3 and all(torch.isfinite(torch.tensor(h["loss"])) for h in logs)
    assert all("entropy" in h and "kl" in h for h in logs)
    changed = any(not torch.equal(before[k], v) for k, v in trainer.model.state_dict().items())
    assert changed, "the policy did not move"


def test_per_sequence_eps_and_temperature_reach_the_loss(model_dir, tmp_path):
    trainer = make_trainer(AGPOGRPOTrainer, model_dir, tmp_path, epsilon=0.2)
    batch = make_batch(trainer)
    B = batch["completion_ids"].size(0)
    base, _ = loss_and_grads(trainer.agpo_compute_loss, trainer, batch)
    same = dict(batch, eps_low=torch.full((B,), 0.2), eps_high=torch.full((B,), 0.2))
    torch.testing.assert_close(loss_and_grads(trainer.agpo_compute_loss, trainer, same)[0], base)
    wide = dict(batch, eps_low=torch.full((B,), 0.9), eps_high=torch.full((B,), 5.0))
    assert not torch.allclose(loss_and_grads(trainer.agpo_compute_loss, trainer, wide)[0], base)
    # A tensor equal to the configured temperature is the same loss; another changes it.
    tau = dict(batch, temperature=torch.full((B,), float(trainer.temperature)))
    torch.testing.assert_close(loss_and_grads(trainer.agpo_compute_loss, trainer, tau)[0], base)
    hot = dict(batch, temperature=torch.tensor([0.5, 2.0] * (B // 2)))
    assert not torch.allclose(loss_and_grads(trainer.agpo_compute_loss, trainer, hot)[0], base)
    # Per-sequence eps equal to TRL's scalars (widened) give TRL's loss for the same scalars.
    trainer.epsilon_low, trainer.epsilon_high = 0.9, 5.0
    wide_trl, _ = loss_and_grads(lambda m, b: GRPOTrainer._compute_loss(trainer, m, b), trainer, batch)
    trainer.epsilon_low = trainer.epsilon_high = 0.2
    torch.testing.assert_close(loss_and_grads(trainer.agpo_compute_loss, trainer, wide)[0], wide_trl)


@pytest.mark.parametrize("level", ["token", "sequence"])
def test_vllm_importance_sampling_correction_matches_trl(model_dir, tmp_path, level):
    """TRL's vLLM IS correction multiplies the clipped surrogate by the (truncated) ratio of
    trainer to rollout-engine probabilities: agpo_loss's is_weight, same loss and grads."""
    trainer = make_trainer(AGPOGRPOTrainer, model_dir, tmp_path, beta=0.04, loss_type="dapo")
    batch = make_batch(trainer)
    B, C = batch["completion_ids"].shape
    g = torch.Generator().manual_seed(3)
    batch["importance_sampling_ratio"] = torch.rand(B, C if level == "token" else 1, generator=g) * 2
    trainer.use_vllm, trainer.vllm_importance_sampling_correction = True, True  # as a vLLM run sets them
    ours, g_ours = loss_and_grads(trainer.agpo_compute_loss, trainer, batch)
    theirs, g_trl = loss_and_grads(lambda m, b: GRPOTrainer._compute_loss(trainer, m, b), trainer, batch)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    for name in g_trl:
        torch.testing.assert_close(g_ours[name], g_trl[name], rtol=1e-4, atol=1e-6, msg=name)
    trainer.use_vllm = False
    assert not torch.allclose(loss_and_grads(trainer.agpo_compute_loss, trainer, batch)[0], ours)


def test_head_runs_inside_the_model_forward_in_the_autocast_dtype(model_dir, tmp_path, monkeypatch):
    """bf16 autocast with fp32 master weights (TRL's bf16=True): agpo_loss is called while
    the model's forward runs (where FSDP/ZeRO-3 hold the head gathered), with the fp32
    weight itself (no copy by the trainer) and resolves a bf16 head; the loss matches
    TRL's own under the same autocast to bf16 accuracy, the head gradient stays fp32."""
    trainer = make_trainer(AGPOGRPOTrainer, model_dir, tmp_path, bf16=True, beta=0.04, loss_type="bnpo")
    batch = make_batch(trainer)
    inside, seen = [False], []
    trainer.model.register_forward_pre_hook(lambda *a: inside.__setitem__(0, True))
    trainer.model.register_forward_hook(lambda *a: inside.__setitem__(0, False))
    real = trl_module.agpo_loss

    def spy(hidden, weight, *a, **k):
        seen.append((inside[0], weight is trainer.model.lm_head.weight, resolve_compute_dtype(hidden, None)))
        return real(hidden, weight, *a, **k)

    monkeypatch.setattr(trl_module, "agpo_loss", spy)
    ours, g_ours = loss_and_grads(trainer.agpo_compute_loss, trainer, batch)  # enters autocast itself
    with trainer.accelerator.autocast():
        theirs, _ = loss_and_grads(lambda m, b: GRPOTrainer._compute_loss(trainer, m, b), trainer, batch)
    assert seen == [(True, True, torch.bfloat16)]
    assert trainer.model.lm_head.weight.dtype == torch.float32 and g_ours["lm_head.weight"].dtype == torch.float32
    torch.testing.assert_close(ours, theirs, rtol=3e-2, atol=2e-3)


def test_full_head_gathers_an_fsdp2_sharded_weight(tmp_path):
    """FSDP2 keeps parameters as DTensors: full_head hands agpo_loss the whole weight, and
    the gradient comes back to the sharded parameter (1-rank gloo mesh, in process)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from agpo_kernels import agpo_loss

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        head = torch.nn.Linear(16, 40, bias=False)
        plain = head.weight.detach().clone().requires_grad_()
        head.weight = torch.nn.Parameter(distribute_tensor(head.weight.detach(), mesh, [Shard(0)]))
        holder = types.SimpleNamespace(get_output_embeddings=lambda: head)
        weight, bias = full_head(holder)
        assert not hasattr(weight, "full_tensor") and bias is None
        h, y = torch.randn(2, 5, 16), torch.randint(0, 40, (2, 5))
        for w in (weight, plain):
            loss, _ = agpo_loss(h, w, y, torch.tensor([1.0, -0.5]), None, impl="torch")
            loss.backward()
        assert hasattr(head.weight.grad, "full_tensor")
        torch.testing.assert_close(head.weight.grad.full_tensor(), plain.grad)
    finally:
        dist.destroy_process_group()


def test_unsupported_config_falls_back_to_trl(model_dir, tmp_path):
    with pytest.warns(UserWarning, match="cispo"):
        trainer = make_trainer(AGPOGRPOTrainer, model_dir, tmp_path, loss_type="cispo")
    batch = make_batch(trainer)
    ours = trainer.compute_loss(trainer.model, batch)
    theirs = GRPOTrainer._compute_loss(trainer, trainer.model, batch)
    torch.testing.assert_close(ours, theirs)


def test_delta_that_is_not_a_dual_clip_falls_back_and_a_per_sequence_eps_past_it_is_refused(model_dir, tmp_path):
    with pytest.warns(UserWarning, match="delta <= 1 \\+ epsilon_high"):
        low = make_trainer(AGPOGRPOTrainer, model_dir, tmp_path, delta=1.1, epsilon_high=0.2)
    assert "delta" in low.agpo_fallback
    trainer = make_trainer(AGPOGRPOTrainer, model_dir, tmp_path, delta=1.3)
    assert trainer.agpo_fallback is None
    batch = make_batch(trainer)
    batch["eps_high"] = torch.full((batch["advantages"].numel(),), 0.35)
    with pytest.raises(ValueError, match="eps_high: a per-sequence value reaches delta - 1"):
        trainer.agpo_compute_loss(trainer.model, batch)


@pytest.mark.skipif(_controllers_missing() is not None,
                    reason=f"agpo.algo.controllers not importable yet: {_controllers_missing()}")
def test_clip_callback_sets_per_sequence_eps(model_dir, tmp_path):
    from agpo.algo.controllers import ControllerConfig

    cb = AGPOClipCallback(ControllerConfig(adaptive_temp=False))
    trainer = make_trainer(AGPOGRPOTrainer, model_dir, tmp_path, callbacks=[cb])
    trainer.train()
    assert trainer.state.global_step == 3
    assert cb.controller.clip_steps >= 1 and cb.controller.probe_steps == cb.controller.clip_steps
    cfg = cb.controller.config
    eps = [h["agpo/eps_mean"] for h in trainer.state.log_history if "agpo/eps_mean" in h]
    assert eps and all(cfg.eps_min - 1e-6 <= e <= cfg.eps_max + 1e-6 for e in eps)
    # What it does not do: no temperature is logged as if applied; TRL's one temperature samples.
    logged = {k for h in trainer.state.log_history for k in h} | set(cb.last)
    assert not any("tau" in k or k.startswith(("probe/", "controller/")) for k in logged), logged
    assert {"agpo/vote_entropy", "agpo/reward_dispersion", "agpo/step_kl_ema"} <= set(cb.last), cb.last


@pytest.mark.skipif(_controllers_missing() is not None,
                    reason=f"agpo.algo.controllers not importable yet: {_controllers_missing()}")
def test_clip_callback_is_the_clip_controller_alone():
    from agpo.algo.controllers import AGPOController, ControllerConfig

    assert AGPOClipCallback().controller.config.adaptive_temp is False
    assert AGPOClipCallback().controller.config.adaptive_clip is True
    with pytest.warns(UserWarning, match="adaptive_temp is ignored"):
        cb = AGPOClipCallback(ControllerConfig())
    assert cb.controller.config.adaptive_temp is False
    with pytest.warns(UserWarning, match="adaptive_temp is ignored"):
        cb = AGPOClipCallback(controller=AGPOController(ControllerConfig(eps_base=0.3)))
    assert cb.controller.config.adaptive_temp is False and cb.controller.config.eps_base == 0.3
    with pytest.warns(UserWarning, match="plain GRPO"):
        AGPOClipCallback(ControllerConfig(adaptive_clip=False, adaptive_temp=False))
    doc = trl_module.__doc__ + AGPOClipCallback.__doc__
    assert "no probe group" in doc and "not** AGPO" in doc


@pytest.mark.skipif(_controllers_missing() is not None,
                    reason=f"agpo.algo.controllers not importable yet: {_controllers_missing()}")
def test_old_callback_name_is_a_deprecated_alias(model_dir, tmp_path):
    with pytest.warns(DeprecationWarning, match="AGPOClipCallback"):
        cb = AGPOControllerCallback()
    assert isinstance(cb, AGPOClipCallback) and cb.controller.config.adaptive_temp is False
    trainer = make_trainer(AGPOGRPOTrainer, model_dir, tmp_path, callbacks=[cb])
    trainer.train()
    assert cb.controller.clip_steps >= 1


def test_controller_callback_needs_controllers():
    if _controllers_missing() is None:
        assert AGPOClipCallback().controller is not None
    else:
        with pytest.raises(ImportError, match="agpo.algo.controllers"):
            AGPOClipCallback()


def test_the_grpo_example_runs():
    """examples/trl_grpo.py, as the README shows it: the fused loss and the clip callback."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "examples/trl_grpo.py"], cwd=root, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = [line for line in out.stdout.splitlines() if line.startswith("step ")]
    assert len(lines) == 3 and all(" eps " in line for line in lines), out.stdout[-2000:]
