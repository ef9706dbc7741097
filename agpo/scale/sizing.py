"""What a run does with its memory plan (``agpo.scale.memory``): the settings it left unset,
the refusal of a plan that does not fit, and the plan as tables.

``derive`` fills the settings a user left unset (``None``: engine utilisation,
tensor-parallel size, ``max_model_len``, activation checkpointing, micro-batch tokens) from
the plan, ``refusal`` says which flag to change when a plan does not fit, ``table`` and
``summary`` print it. ``resolve`` does all of it for a ``TrainConfig`` at the start of a run
(``agpo.learn.launch.resolve_defaults``); ``python -m agpo.plan`` prints the tables.
"""

from __future__ import annotations

import dataclasses
import math
import os

from agpo.errors import ConfigError
from agpo.scale.memory import (
    DEFAULT_DEVICE_GIB,
    DEFAULT_PROMPT_TOKENS,
    ENGINE_OVERHEAD,
    GiB,
    Knobs,
    ModelShape,
    Plan,
    item_bytes,
    knobs_from_config,
    model_config,
    plan_memory,
)

TP_SIZES = (1, 2, 4, 8)
MAX_UTILIZATION = 0.9
"""The highest engine utilisation ``derive`` picks."""
MIN_MICRO_BATCH = 256
MIN_UTILIZATION = 0.1
"""The lowest engine utilisation ``derive`` picks when there is room (vLLM's profiling and graphs)."""
MARGIN = 0.04
"""Share of the device ``derive`` leaves free when it picks a setting (fragmentation, estimates)."""


# -- settings left unset ----------------------------------------------------------------------
def _fixed(k: Knobs, **kw) -> Knobs:
    return dataclasses.replace(k, **kw)


def derive(shape: ModelShape, k: Knobs, *, on_gpu: bool = True) -> Plan:
    """Fill ``k``'s unset settings and plan: ``max_model_len`` = prompt cap + ``--max-new-tokens``
    (within the model's positions); micro-batch tokens: the preset's, halved until the update
    fits; activation checkpointing: on when the update would not fit without it; tensor-parallel
    size: the smallest that gives the engine KV room for the whole rollout (else the one giving
    most); engine utilisation: what it needs for that (``_utilization``), within what the
    trainer's resident state and the sync leave. Without a
    GPU (``on_gpu=False``) the old defaults stand (checkpointing off, utilisation 0.3, TP 1)."""
    derived: dict = {}
    if k.max_model_len is None:
        v = k.seq_len if not shape.max_positions else min(k.seq_len, int(shape.max_positions))
        k = _fixed(k, max_model_len=v)
        derived["vllm_max_model_len"] = (v, f"--max-prompt-tokens {k.prompt_tokens} + --max-new-tokens "
                                            f"{k.max_new_tokens}" + (" (capped by the model's positions)"
                                                                     if v < k.seq_len else ""))
    if not on_gpu:
        fills = dict(checkpointing=False, gpu_memory_utilization=0.3, tp=1, micro_batch_tokens=k.default_micro_batch)
        for name, v in fills.items():
            if getattr(k, name) is None:
                k = _fixed(k, **{name: v})
                derived[_FIELD[name]] = (v, "default (no GPU: no plan)")
        plan = plan_memory(shape, k)
        plan.derived = derived
        return plan
    # the update phase depends on the engine only through its sleeping (or, at level 0, awake) budget
    probe = _fixed(k, tp=k.tp or 1, gpu_memory_utilization=k.gpu_memory_utilization or 0.0)
    dev = k.device_bytes * (1 - MARGIN)  # what the derived settings may plan for
    mb_unset, ck_unset = k.micro_batch_tokens is None, k.checkpointing is None
    n = k.micro_batch_tokens or k.default_micro_batch
    if ck_unset:
        off = plan_memory(shape, _fixed(probe, checkpointing=False, micro_batch_tokens=n)).update.peak
        k = _fixed(k, checkpointing=off > dev)
        derived["gradient_checkpointing"] = (k.checkpointing, f"the update needs {off / GiB:.1f} GiB without it at "
                                                              f"{n} tokens" + (" (fits)" if off <= dev else ""))
    if mb_unset:
        def peak(tokens):
            return plan_memory(shape, _fixed(probe, checkpointing=k.checkpointing, micro_batch_tokens=tokens)).update.peak
        if peak(MIN_MICRO_BATCH) <= dev:  # else no micro-batch fits: the state is the problem, keep the preset's
            while n > MIN_MICRO_BATCH and peak(n) > dev:
                n //= 2
        k = _fixed(k, micro_batch_tokens=n)
        derived["micro_batch_tokens"] = (n, "the preset's" if n == k.default_micro_batch else
                                         f"halved from {k.default_micro_batch} until the update fits")
    if k.engine == "vllm":
        engine_unset = {"tp": k.tp is None, "util": k.gpu_memory_utilization is None}
        choices = [t for t in TP_SIZES if t <= max(k.nproc_per_node, 1) and k.world % t == 0 and shape.heads % t == 0]
        if k.tp is not None:
            choices = [k.tp]
        best = None
        for t in choices or [1]:
            kt = _fixed(k, tp=t, gpu_memory_utilization=k.gpu_memory_utilization or _utilization(shape, k, t))
            p = plan_memory(shape, kt)
            full = p.kv["tokens"] >= p.kv["needed"]
            score = (p.fits, full, p.kv["tokens"] / max(p.kv["needed"], 1))
            if best is None or (not (best[0][0] and best[0][1]) and score > best[0]):
                best = (score, kt)
            if p.fits and full:
                break
        k = best[1]
        if engine_unset["tp"]:
            derived["vllm_tensor_parallel_size"] = (k.tp, "the smallest that gives the KV cache the whole rollout"
                                                    if best[0][1] else "the one giving the KV cache most room")
        if engine_unset["util"]:
            derived["vllm_gpu_memory_utilization"] = (k.gpu_memory_utilization,
                                                      "weights + KV for the rollout phase and 25% more, within "
                                                      "what the trainer's resident state and the sync leave")
    for name, v in (("tp", 1), ("gpu_memory_utilization", 0.3)):
        if getattr(k, name) is None:  # the HF engine: not used
            k = _fixed(k, **{name: v})
    plan = plan_memory(shape, k)
    plan.derived = derived
    return plan


_FIELD = {"checkpointing": "gradient_checkpointing", "gpu_memory_utilization": "vllm_gpu_memory_utilization",
          "tp": "vllm_tensor_parallel_size", "micro_batch_tokens": "micro_batch_tokens"}


def _utilization(shape: ModelShape, k: Knobs, tp: int) -> float:
    """The engine's share of the device: what it needs (weights, activations, and KV room for the
    whole rollout phase and a quarter more, at least one ``max_model_len`` request; never below
    ``MIN_UTILIZATION``), within what the rollout phase leaves beside the trainer (and, with sleep
    off, beside the update) less ``MARGIN``; in steps of 0.01, at most ``MAX_UTILIZATION``."""
    probe = plan_memory(shape, _fixed(k, tp=tp, gpu_memory_utilization=0.0))
    engine_rows = ("vLLM weights", "vLLM activations", "vLLM KV cache")
    other = sum(i.bytes for i in probe.rollout.items if not i.name.startswith(engine_rows))
    if k.sleep_level == 0:
        other = max(other, probe.update.peak)
    free = math.floor(((k.device_bytes - other) / k.device_bytes - MARGIN) * 100) / 100
    kv = probe.kv
    need = (item_bytes(probe.rollout, "vLLM weights") + ENGINE_OVERHEAD
            + 1.25 * kv["bytes_per_token"] * max(kv["needed"], k.max_model_len or 0))
    want = max(MIN_UTILIZATION, math.ceil(need / k.device_bytes * 100) / 100)
    return max(0.01, min(MAX_UTILIZATION, free, want))


def apply_derived(cfg, plan: Plan) -> None:
    """Write the plan's derived settings into ``cfg`` (so config.yaml records them)."""
    sections = {"gradient_checkpointing": cfg.model, "micro_batch_tokens": cfg.optim}
    for name, (value, _) in plan.derived.items():
        setattr(sections.get(name, cfg.rollout), name, value)


def refusal(plan: Plan) -> ConfigError | None:
    """The error a run that does not fit ends with (exit 2), naming the flags to change; None when it fits."""
    if plan.fits:
        return None
    why = "; ".join(f"{p.message} (change {p.flag})" for p in plan.problems)
    return ConfigError(f"memory plan: this run does not fit {plan.knobs.device_bytes / GiB:.0f} GiB GPUs: {why}. "
                       f"`python -m agpo.plan` with the same flags prints the whole plan")


# -- tables ------------------------------------------------------------------------------------
def table(plan: Plan, *, markdown: bool = False) -> str:
    """The plan as text (or Markdown): one table per phase, the KV cache, derived settings, the verdict."""
    s, k = plan.shape, plan.knobs
    lines = []
    head = (f"{s.model_type or 'model'}: P = {s.parameters():,} parameters ({s.parameters() / 1e9:.2f} B); "
            f"{k.world} GPU(s) x {k.device_bytes / GiB:.0f} GiB; "
            f"{'LoRA rank ' + str(k.lora_rank) if k.lora_rank else 'full fine-tuning'}"
            f"{', FSDP2' if k.sharded else ''}; rollout {k.engine}"
            + (f" (TP {k.tp}, utilisation {k.gpu_memory_utilization:.2f}, max_model_len {k.max_model_len})"
               if k.engine == "vllm" else "")
            + f"; checkpointing {'on' if k.checkpointing else 'off'}; {k.micro_batch_tokens} tokens per micro-batch")
    lines.append(head)
    for ph in plan.phases:
        lines.append("")
        if markdown:
            lines += [f"| {ph.name} | per GPU | how |", "|---|---|---|"]
            for i in ph.items:
                lines.append(f"| {i.name} | {i.bytes / GiB:.2f} GiB | {i.note} |")
            lines.append(f"| **{ph.name} peak** | **{ph.peak / GiB:.1f} GiB** | of {k.device_bytes / GiB:.0f} GiB |")
        else:
            lines.append(f"{ph.name} phase, per GPU:")
            for i in ph.items:
                lines.append(f"  {i.name:<52} {i.bytes / GiB:8.2f} GiB  {i.note}")
            lines.append(f"  {'peak':<52} {ph.peak / GiB:8.2f} GiB  of {k.device_bytes / GiB:.0f} GiB")
    kv = plan.kv
    lines.append("")
    lines.append(f"KV cache: {kv['bytes_per_token'] / 1024:.0f} KiB per token per GPU; holds {kv['tokens']:,} tokens; "
                 f"a rollout phase's {kv['rows']} sequences of {k.seq_len} need {kv['needed']:,}"
                 + ("" if kv["tokens"] >= kv["needed"] else
                    f" ({kv['tokens'] / max(kv['needed'], 1):.0%} at once: generated in turns)"))
    for name, (v, why) in plan.derived.items():
        flag = name.replace("_", "-")
        shown = (f"--{flag}" if v else f"--no-{flag}") if isinstance(v, bool) else f"--{flag} {v}"
        lines.append(f"auto: {shown} ({why})")
    if plan.fits:
        lines.append(f"FITS: rollout {plan.rollout.peak / GiB:.1f} GiB, update {plan.update.peak / GiB:.1f} GiB "
                     f"of {k.device_bytes / GiB:.0f} GiB per GPU")
    else:
        lines.append("DOES NOT FIT:")
        lines += [f"  - {p.message}: change {p.flag}" for p in plan.problems]
    return "\n".join(lines)


# -- a run's unset settings ----------------------------------------------------------------------
def _launch() -> tuple[int, int, bool]:
    """World size, ranks per node and whether torchrun started this process (its environment)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    launched = "RANK" in os.environ and "MASTER_ADDR" in os.environ
    return world, int(os.environ.get("LOCAL_WORLD_SIZE", str(world))), launched or world > 1


def _device_gib(device: str) -> float:
    import torch

    if str(device).startswith("cuda") and torch.cuda.is_available():
        index = torch.device(device).index
        index = int(os.environ.get("LOCAL_RANK", "0")) if index is None else index
        return torch.cuda.get_device_properties(index).total_memory / GiB
    return DEFAULT_DEVICE_GIB


def resolve(cfg, *, world: int | None = None, nproc_per_node: int | None = None, sharded: bool | None = None,
            device_gib: float | None = None, on_gpu: bool | None = None) -> Plan | None:
    """Fill ``cfg``'s unset memory settings (``--max-prompt-tokens``, ``--vllm-max-model-len``,
    ``--micro-batch-tokens``, ``--gradient-checkpointing``, ``--vllm-tensor-parallel-size``,
    ``--vllm-gpu-memory-utilization``) from the plan of its model, in place, and return the plan;
    None when the model's config.json cannot be had without loading it (the old defaults are
    filled instead). World size, ranks per node and device memory default to torchrun's
    environment and the visible GPU; ``on_gpu`` to ``cfg.model.device`` being CUDA."""
    from agpo.models import PRESETS

    w, nproc, launched = _launch()
    world = world or w
    nproc_per_node = nproc_per_node or min(nproc, world)
    sharded = launched if sharded is None else sharded
    on_gpu = str(cfg.model.device).startswith("cuda") if on_gpu is None else on_gpu
    device_gib = device_gib or (_device_gib(cfg.model.device) if on_gpu else DEFAULT_DEVICE_GIB)
    r = cfg.rollout
    if r.max_prompt_tokens is None:
        r.max_prompt_tokens = DEFAULT_PROMPT_TOKENS
    raw = model_config(cfg.model.model)
    if raw is None:
        preset = PRESETS.get(cfg.model.model)
        fills = [(cfg.optim, "micro_batch_tokens", preset.micro_batch_tokens if preset else 8192),
                 (cfg.model, "gradient_checkpointing", False), (r, "vllm_tensor_parallel_size", 1),
                 (r, "vllm_gpu_memory_utilization", 0.3),
                 (r, "vllm_max_model_len", r.max_prompt_tokens + (r.max_new_tokens or 512))]
        for section, name, v in fills:
            if getattr(section, name) is None:
                setattr(section, name, v)
        return None
    knobs = knobs_from_config(cfg, world=world, nproc_per_node=nproc_per_node, sharded=sharded, device_gib=device_gib)
    plan = derive(ModelShape.from_config(raw), knobs, on_gpu=on_gpu)
    apply_derived(cfg, plan)
    return plan


def summary(plan: Plan) -> str:
    """One line for the run log: the phases' peaks and what was derived."""
    k = plan.knobs
    line = (f"agpo: memory plan per GPU: rollout {plan.rollout.peak / GiB:.1f} GiB, update {plan.update.peak / GiB:.1f} "
            f"GiB of {k.device_bytes / GiB:.0f} GiB (python -m agpo.plan prints the tables)")
    if plan.derived:
        line += "; derived: " + ", ".join(f"{n.replace('_', '-')} {v}" for n, (v, _) in plan.derived.items())
    return line
