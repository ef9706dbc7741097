"""Rollout engines: how the policy's samples are generated (``--rollout {hf,vllm,auto}``).

- ``base``: ``Rollout`` (what every engine returns) and ``RolloutEngine`` (what the
  trainer calls: ``sample``, ``idle``, ``describe``, ``close``);
- ``hf``: ``generate`` on the policy with counter-based inverse-CDF sampling (the default on
  CPUs and the reference the tests compare against);
- ``vllm``: a colocated vLLM engine with weight sync and sleep mode;
- ``lifecycle``: that engine's sleep / wake / load order as a recorded state machine
  (caches released before every wake and after every load);
- ``noise``: per-row keys (and the HF engine's per-step uniforms);
- ``weights``: the policy's weights streamed for an engine that holds its own copy (one
  all-gather per FSDP unit, in the engine's dtype);
- ``correction``: engine vs trainer log-prob mismatch and truncated importance sampling.

``make_engine`` builds the engine a config asks for; ``resolve_engine`` turns ``auto`` into
``vllm`` when vLLM is importable and the policy runs on CUDA, else ``hf``. Docs:
docs/rollout.md.
"""

from __future__ import annotations

import importlib.util

import torch

from agpo.rollout.base import Rollout, RolloutEngine
from agpo.rollout.hf import (
    CounterSampler,
    HFEngine,
    RowTemperature,
    sample_groups,
    top_p_filter,
)
from agpo.rollout.noise import counter_hash, row_keys, step_uniforms

ENGINES = ("hf", "vllm", "auto")

__all__ = ["ENGINES", "CounterSampler", "HFEngine", "Rollout", "RolloutEngine", "RowTemperature", "counter_hash",
           "make_engine", "resolve_engine", "row_keys", "sample_groups", "step_uniforms", "top_p_filter"]


def resolve_engine(engine: str, device: str) -> str:
    """``hf`` or ``vllm`` for ``--rollout engine`` on ``device``."""
    if engine not in ENGINES:
        raise ValueError(f"--rollout: expected one of {', '.join(ENGINES)}, got {engine!r}")
    if engine != "auto":
        return engine
    on_cuda = str(device).startswith("cuda")
    return "vllm" if on_cuda and importlib.util.find_spec("vllm") is not None else "hf"


def make_engine(cfg, layout, tokenizer, *, dtype: torch.dtype) -> RolloutEngine:
    """The rollout engine of ``cfg.rollout`` over ``layout``'s policy."""
    r = cfg.rollout
    engine = resolve_engine(r.engine, str(layout.env.device))
    if engine == "hf":
        return HFEngine(layout, tokenizer, batch_rows=r.generation_batch_size)
    from agpo.rollout.vllm import VLLMEngine

    return VLLMEngine(layout, tokenizer, dtype=dtype, seed=cfg.run.seed, tensor_parallel_size=r.vllm_tensor_parallel_size,
                      gpu_memory_utilization=r.vllm_gpu_memory_utilization, kv_cache_gib=r.vllm_kv_cache_gib,
                      sleep_level=r.vllm_sleep_level, enforce_eager=r.vllm_enforce_eager,
                      max_model_len=r.vllm_max_model_len, head_dtype=r.vllm_head_dtype)
