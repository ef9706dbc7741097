"""Rollout throughput: the same rollout on the HF engine and on the vLLM engine.

``pytest bench/test_bench_rollout.py --benchmark-only`` in an environment with vLLM
(``.venv-vllm`` on a CPU, see README; on a GPU the GPU suite's). One rollout = the
training loop's train phase: prompts of the chain_sum task x G = 4 samples at tau 1.0 on
``AGPO_BENCH_ROLLOUT_MODEL`` (smollm2-135m): by default 2 prompts and up to 8 new tokens;
with ``--bench-long`` also ``AGPO_BENCH_ROLLOUT_PROMPTS`` prompts (default 8) and up to
``AGPO_BENCH_ROLLOUT_TOKENS`` (64) new tokens, the size bench/results/ quotes.
``extra_info``: generated tokens,
tokens/s of generation (``perf/generate_tokens_per_s``'s definition: generated tokens
over generation seconds, weight sync excluded), the sync seconds of a full weight load,
(each vLLM rollout starts from an empty prefix cache, like a step's first phase after its
sync; the G rows of a prompt share its KV blocks within the rollout, HF recomputes them),
the engine start-up seconds and the peak RSS above the RSS before the model was loaded
(VmHWM reset per case: both cases can run in one process). The vLLM case is skipped where
vLLM is not importable.
"""

import os
import statistics
import time

import pytest
import torch
from peak_rss import status_mib

from agpo.config import TrainConfig
from agpo.learn.launch import resolve_defaults
from agpo.learn.trainer import Trainer
from agpo.models import load_model_and_tokenizer
from agpo.tasks.data import format_prompt, load_problems, uses_chat_template

MODEL = os.environ.get("AGPO_BENCH_ROLLOUT_MODEL", "smollm2-135m")
SIZES = {"small": (2, 8),
         "long": (int(os.environ.get("AGPO_BENCH_ROLLOUT_PROMPTS", "8")),
                  int(os.environ.get("AGPO_BENCH_ROLLOUT_TOKENS", "64")))}
"""Size -> (prompts, max new tokens)."""
G = 4


@pytest.mark.parametrize("size", ["small", pytest.param("long", marks=pytest.mark.bench_long)])
@pytest.mark.parametrize("engine", ["hf", "vllm"])
def test_rollout(benchmark, engine, size):
    PROMPTS, TOKENS = SIZES[size]
    if engine == "vllm":
        pytest.importorskip("vllm", reason="vLLM is not installed in this environment")
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    cfg = TrainConfig()
    cfg.model.model, cfg.rollout.engine, cfg.data.dataset = MODEL, engine, "chain_sum"
    cfg.rollout.prompts_per_step, cfg.rollout.group_size, cfg.rollout.max_new_tokens = PROMPTS, G, TOKENS
    cfg.run.eval_size, cfg.run.progress, cfg.warmup.sft_steps = 0, False, 0
    cfg = resolve_defaults(cfg)
    import gc

    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:  # VmHWM := current RSS (Linux >= 4.0)
        f.write("5")
    rss0 = status_mib("VmRSS")
    model, tok = load_model_and_tokenizer(MODEL, device=cfg.model.device)
    problems = load_problems(cfg.data, split="train")
    t0 = time.perf_counter()
    tr = Trainer(cfg, model, tok, problems)
    start_s = time.perf_counter() - t0
    prompts = [format_prompt(p, tok) for p in problems[:PROMPTS]]
    chat = uses_chat_template(tok)
    tau = torch.ones(PROMPTS)
    calls = {"n": 0}

    def rollout():
        calls["n"] += 1
        if engine == "vllm":  # as after a step's weight sync: no prompt KV left from the last rollout
            tr.engine.llm.reset_prefix_cache()
        return tr.engine.sample(prompts, tau, group_size=G, max_new_tokens=TOKENS, add_special_tokens=not chat,
                                seed=0, stream=calls["n"], weights_version=tr.weights_version)

    first = rollout()  # includes the first weight load (vLLM) and first-call allocations
    rolls = []
    benchmark.pedantic(lambda: rolls.append(rollout()), rounds=3 if size == "long" else 2, iterations=1)
    benchmark.extra_info.update({
        "bench": "rollout", "engine": engine, "model": MODEL + ("" if size == "long" else " (small)"),
        "device": str(tr.device), "prompts": PROMPTS,
        "group_size": G, "max_new_tokens": TOKENS,
        "generated_tokens": statistics.median(r.generated_tokens for r in rolls),
        "generate_tokens_per_s": statistics.median(r.generated_tokens / r.seconds for r in rolls),
        "weight_sync_s": first.sync_seconds, "engine_start_s": start_s, "peak_rss_mib": status_mib("VmHWM") - rss0,
        "threads": torch.get_num_threads()})
    tr.close()
