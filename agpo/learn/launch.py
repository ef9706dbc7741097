"""One training run from a ``TrainConfig``: ``run(cfg)`` (and ``resolve_defaults``).

Resolves the model-dependent defaults, checks the config against the machine
(``agpo.learn.preflight``), reads the data (``training_problems``: the held-out problems are
never training ones), finds a checkpoint to continue from, loads (or
streams into shards) the model, runs the supervised warm-up and the evaluation before RL,
then the RL steps with their checkpoints, preemption handling and metrics, the export and
the final evaluation. Under torchrun every rank calls ``run``; rank 0 writes the run
directory (layout in ``python -m agpo.train --help`` and docs/operations.md).
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from agpo.config import ConfigError, TrainConfig
from agpo.learn.metrics import GROUPS_FILE, keep_group_rows
from agpo.learn.policy import Policy
from agpo.learn.preflight import preflight, remove_run_files
from agpo.learn.sft import supervised_warmup
from agpo.learn.trainer import Trainer
from agpo.models import (
    PRESETS,
    load_model_and_tokenizer,
    prepare_tokenizer,
    resolve_attn,
    resolve_dtype,
)
from agpo.rollout import resolve_engine
from agpo.rollout.correction import resolve_tis
from agpo.runtime import checkpoint as ckpt
from agpo.runtime.guard import EXIT_PREEMPTED, last_checkpoint_name
from agpo.runtime.metrics_log import MetricsLogger
from agpo.runtime.preempt import Preemption, describe
from agpo.scale.distributed import (
    DistEnv,
    all_reduce_sum,
    broadcast_object,
    export_hf,
    init_distributed,
)
from agpo.scale.liger import apply_liger, wants_liger
from agpo.scale.loading import empty_model, weights_dir
from agpo.scale.sizing import refusal
from agpo.scale.sizing import resolve as resolve_memory
from agpo.scale.sizing import summary as memory_summary
from agpo.tasks.data import carves_held_out, held_out, load_problems, overlap_count, split_training_file


def resolve_defaults(cfg: TrainConfig) -> TrainConfig:
    """Fill the model-dependent defaults (task, completion cap, warm-up length), the device, and
    the memory settings left unset (``agpo.scale.sizing.resolve``); on CUDA, refuse a run whose
    memory plan does not fit (``ConfigError`` naming the flag to change)."""
    preset = PRESETS.get(cfg.model.model)
    if cfg.data.dataset is None:  # the preset's task; any other model: GSM8K
        cfg.data.dataset = preset.dataset if preset else "gsm8k"
    if cfg.model.device == "auto":
        cfg.model.device = "cuda" if torch.cuda.is_available() else "cpu"
    if cfg.rollout.max_new_tokens is None:
        cfg.rollout.max_new_tokens = preset.max_new_tokens if preset else 512
    embedded = cfg.model.model == "tiny" and cfg.data.dataset == "arith"
    if cfg.warmup.sft_steps is None:
        cfg.warmup.sft_steps = 1500 if embedded else 0
    if cfg.warmup.sft_target_loss is None:
        cfg.warmup.sft_target_loss = 0.5 if embedded else 0.0
    cfg.rollout.engine = resolve_engine(cfg.rollout.engine, cfg.model.device)
    try:
        cfg.loss.tis = resolve_tis(cfg.loss.tis, cfg.rollout.engine, cfg.loss.score_temperature)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    # the unset memory settings (micro-batch, checkpointing, vLLM's share, TP, max_model_len) from the
    # memory plan, so config.yaml records them; on CUDA a plan that does not fit ends the run (exit 2)
    plan = resolve_memory(cfg)
    if plan is not None and str(cfg.model.device).startswith("cuda"):
        if refusal(plan) is not None:
            raise refusal(plan)
        if os.environ.get("RANK", "0") == "0":
            print(memory_summary(plan), flush=True)
    return cfg


def training_problems(cfg: TrainConfig) -> tuple[list, list, str]:
    """``(train, held_out, what)``: the training problems, the held-out evaluation's (at most
    ``--eval-size``; none when it is 0) and a line saying where the held-out ones come from
    and how many of them are also training problems (0 unless the files given overlap)."""
    d, n = cfg.data, cfg.run.eval_size
    if carves_held_out(d):  # one file for both: hold a seeded part of it out, train on the rest
        train, test = split_training_file(d)
        where = (f"{len(test)} of the {len(train) + len(test)} problems of --data-path {d.path} held out "
                 f"(seeded by --data-seed; at most --test-size {d.test_size}), never trained on")
        test = test[:n] if n else []
    else:
        train = load_problems(d, split="train")
        test = load_problems(held_out(d), split="test", limit=n) if n else []
        src = held_out(d)
        where = (f"--eval-data-path {src.eval_path}" if src.eval_path else
                 f"--data-path {src.path}" if src.path else f"the {src.dataset or 'arith'} test split")
    if not test:
        return train, test, "agpo: no held-out evaluation (--eval-size 0)" + (
            f"; {where.split(' (')[0]} all the same (the split does not depend on --eval-size)"
            if carves_held_out(d) else "")
    overlap = overlap_count(test, train)
    line = f"agpo: held-out evaluation on {len(test)} problems ({where}); {overlap} of them also among the " \
           f"{len(train)} training problems"
    if overlap:
        line += " -- the held-out accuracy is partly training accuracy; pass a disjoint --eval-data-path"
    return train, test, line


def _any_rank(env: DistEnv):
    """A flag set on any rank, on every rank (one small all-reduce)."""
    return lambda flag: all_reduce_sum({"flag": float(flag)}, env)["flag"] > 0


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _find_start(cfg: TrainConfig, out: Path, ref_dir: Path, env: DistEnv) -> tuple[Path | None, bool]:
    """The checkpoint to resume from (None: a fresh start) and whether the run has a saved
    warmed-up start, as rank 0 sees them: every rank must make the same choice."""
    found, err = None, None
    if env.is_main:
        try:
            found = (ckpt.resolve_resume(cfg.run.resume, out), ref_dir.is_dir())
        except ckpt.CheckpointError as e:
            err = str(e)
    found, err = broadcast_object((found, err), env)
    if err:
        raise ckpt.CheckpointError(err)
    return found


def _streamed_weights(cfg: TrainConfig, env: DistEnv, source: str, resuming: bool) -> Path | None:
    """The safetensors folder the ranks read their shards from (``agpo.scale.loading``), or None
    for the plain path: one process, a warm-up still to run (it trains a replicated
    model), or weights that are no local safetensors folder. Rank 0 finds it (converting
    the SmolLM2 preset once) and tells the others."""
    if not env.distributed or (cfg.warmup.sft_steps and not resuming):
        return None
    return broadcast_object(weights_dir(source) if env.is_main else None, env)


def _reference(cfg: TrainConfig, model, ref_dir: Path | None, saved: dict | None, load_kw: dict,
               stream: Path | None = None, attn: str | None = None):
    """The frozen reference of the KL term for full fine-tuning with beta > 0 (LoRA uses the
    base with adapters off): the warmed-up start (``ref_dir``) or ``--model``; empty when its
    shards are read from ``stream`` (the same start)."""
    if cfg.loss.beta == 0 or cfg.model.lora_rank:
        return None
    if stream is not None:
        return empty_model(stream, dtype=load_kw["dtype"], attn=attn).requires_grad_(False)
    if saved:
        src = str(ref_dir) if ref_dir is not None else cfg.model.model
        ref = load_model_and_tokenizer(src, seed=cfg.run.seed, **load_kw)[0]
    else:
        ref = copy.deepcopy(model)
    return ref.eval().requires_grad_(False)


def run(cfg: TrainConfig) -> dict:
    """Train as ``cfg`` says; returns the summary (also written to ``summary.json``). Under
    torchrun every rank calls it; rank 0 writes the run directory."""
    notes = preflight(cfg)  # every check that needs no model, before anything is read or loaded
    cfg = resolve_defaults(cfg)
    env = init_distributed(cfg.model.device, timeout_s=cfg.run.dist_timeout)
    for note in notes:
        _say(env, note)
    out = Path(cfg.run.out_dir)
    ref_dir = out / "reference"   # the warmed-up start: the KL reference and the LoRA base
    resume, have_ref = _find_start(cfg, out, ref_dir, env)
    saved = ckpt.load_state(resume) if resume else None
    if saved:
        ckpt.check_compatible(saved["config"], cfg.to_dict())
    train_problems, eval_problems, data_note = training_problems(cfg)  # data errors before the model loads
    _say(env, data_note)
    if env.is_main:
        out.mkdir(parents=True, exist_ok=True)
    _seed_everything(cfg.run.seed)
    m = cfg.model
    preset = PRESETS.get(m.model)
    compute = resolve_dtype(m.dtype, str(env.device), preset)
    attn = resolve_attn(m.attn, str(env.device), compute, preset)  # for the device it will run on
    if cfg.optim.packing is None:  # packing pays where attention is varlen (agpo.learn.packing)
        cfg.optim.packing = attn == "flash_attention_2"
    # torchrun on GPUs: load on the CPU in the compute dtype; sharding moves each rank's
    # shards to its GPU (upcast to fp32 master weights on the way, agpo.scale.parallel)
    sharded_gpu = env.distributed and env.device.type == "cuda"
    load_kw = dict(dtype=compute, device="cpu" if sharded_gpu else str(env.device), attn=attn)
    source = str(ref_dir) if saved and have_ref else m.model
    stream = _streamed_weights(cfg, env, source, saved is not None)
    if stream:  # empty here, each rank's shards read from the files once sharded (agpo.scale.loading)
        from transformers import AutoTokenizer

        model = empty_model(stream, dtype=compute, attn=attn)
        tok = prepare_tokenizer(model, AutoTokenizer.from_pretrained(str(stream)))
    else:
        model, tok = load_model_and_tokenizer(source, seed=cfg.run.seed, **load_kw)

    events: dict = dict(saved.get("events", {})) if saved else {}
    if not saved:
        if env.is_main:
            if cfg.run.overwrite:  # preflight allowed it and said so: the earlier run's files go
                remove_run_files(out)
            (out / "config.yaml").write_text(_yaml(cfg.to_dict()))
            shutil.rmtree(ref_dir, ignore_errors=True)  # an earlier run's start is not this run's
        if cfg.warmup.sft_steps:  # replicated on every rank, before sharding: small models only
            w = cfg.warmup
            model.to(env.device)
            events["warmup"] = supervised_warmup(Policy(model, impl=cfg.loss.impl), tok, train_problems,
                                                 steps=w.sft_steps, batch_size=w.sft_batch_size, lr=w.sft_lr,
                                                 seed=cfg.run.seed, progress=cfg.run.progress and env.is_main,
                                                 target_loss=w.sft_target_loss or None,
                                                 agree=_any_rank(env) if env.distributed else None)
            if env.is_main:
                model.save_pretrained(str(ref_dir))
                tok.save_pretrained(str(ref_dir))
    ref_model = _reference(cfg, model, ref_dir if have_ref else None, saved, load_kw, stream, attn)
    if m.liger is None:  # the default: on where it can run (config.yaml keeps null = auto)
        m.liger = wants_liger(model, str(env.device))
    if m.liger:
        for net in (model, ref_model):
            if net is not None:
                family = apply_liger(net, str(env.device))
        _say(env, f"agpo: Liger-Kernel RMSNorm, RoPE and SwiGLU in the {family} decoder")

    trainer = Trainer(cfg, model, tok, train_problems, ref_model=ref_model, env=env, compute_dtype=compute,
                      weights=stream, ref_weights=stream if ref_model is not None else None)
    _say(env, f"agpo: {trainer.layout.describe()}; rollouts: {trainer.engine.describe()}")
    if stream:
        _say(env, f"agpo: weights read into the shards from {stream} (no rank holds the whole model)")
    if saved:
        trainer.load_checkpoint(resume, saved)
        ckpt.set_rng_state(saved["rng"])
        _say(env, f"agpo: resumed from {resume} at step {trainer.step_count}")
    elif eval_problems:
        events["eval_before"] = trainer.evaluate(eval_problems)

    def save():
        extra = {"rng": ckpt.rng_state(), "config": cfg.to_dict(), "events": events, "world_size": env.world_size}
        return trainer.save_checkpoint(out, extra, keep=cfg.run.keep_checkpoints)

    r = cfg.run
    if r.dump_groups and env.is_main:  # a resumed run continues the file from its checkpoint's step
        keep_group_rows(out / GROUPS_FILE, trainer.step_count if saved else 0)
    with MetricsLogger(out, total_steps=r.steps, progress=r.progress, tensorboard=r.tensorboard, enabled=env.is_main,
                       resume_step=trainer.step_count if saved else None) as log, Preemption() as preempt, \
            contextlib.closing(trainer):  # the rollout engine is shut down however the run ends
        if not saved:
            for name in ("warmup", "eval_before"):
                if name in events:
                    log.event(name, events[name])
        last_saved = trainer.step_count if saved else -1
        stopped = None
        signals = preempt.agreed(env)  # also a signal that came during the warm-up or the first evaluation
        while trainer.step_count < r.steps and not signals:
            if not trainer.budget_allows_step():  # the step boundary nearest the budget
                stopped = f"token budget {r.token_budget} reached"
                break
            metrics = trainer.step()
            step = trainer.step_count
            if r.eval_every and step % r.eval_every == 0 and eval_problems:
                metrics["eval/accuracy"] = trainer.evaluate(eval_problems)["accuracy"]
            log.log(step, metrics)
            if r.dump_groups and env.is_main:
                with open(out / GROUPS_FILE, "a") as f:
                    f.writelines(json.dumps(row, allow_nan=False) + "\n" for row in trainer.last_groups)
            trainer.guard.check(step, last_checkpoint_name(out))  # too many non-finite steps in a row
            in_streak = trainer.guard.skipped_in_a_row > 0  # keep the last checkpoint from before it
            if (r.save_every and step % r.save_every == 0 and not in_streak) or step == r.stop_after:
                save()
                last_saved = step
            if step == r.stop_after and step < r.steps:
                _say(env, f"agpo: stopped after step {step} (--stop-after); continue with --resume auto")
                return {"stopped_after": step}
            signals = preempt.agreed(env)  # one small all-reduce: every rank stops after the same step
        if signals:
            path = save() if trainer.step_count != last_saved else last_checkpoint_name(out)
            _say(env, f"agpo: {describe(signals, env)}: stopped after step {trainer.step_count} with checkpoint "
                      f"{path}; exit status {EXIT_PREEMPTED}, continue with --resume auto")
            return {"preempted": trainer.step_count, "signals": signals}
        if trainer.step_count != last_saved:
            save()
        export_hf(trainer.policy, trainer.model, tok, out / "final", env, dtype=compute)
        if eval_problems:
            events["eval_after"] = trainer.evaluate(eval_problems)
            log.event("eval_after", events["eval_after"])

    summary = {"steps": trainer.step_count, "tokens_generated": trainer.tokens_generated, "stopped": stopped,
               "algo": r.algo, "model": m.model, "dataset": cfg.data.dataset, "seed": r.seed,
               "world_size": env.world_size}
    if "eval_before" in events:
        summary["accuracy_before"] = events["eval_before"]["accuracy"]
    if "eval_after" in events:
        summary["accuracy_after"] = events["eval_after"]["accuracy"]
    if env.is_main:
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    if "accuracy_after" in summary:
        _say(env, f"agpo: held-out accuracy {summary.get('accuracy_before', float('nan')):.1%} before RL -> "
                  f"{summary['accuracy_after']:.1%} after {trainer.step_count} steps ({out})")
    return summary


def _say(env: DistEnv, text: str) -> None:
    if env.is_main:
        print(text, flush=True)


def _yaml(d: dict) -> str:
    import yaml

    return yaml.safe_dump(d, sort_keys=False)
