"""``python -m agpo.train``: AGPO (or GRPO) fine-tuning of a Hugging Face causal LM.

With no arguments: the tiny preset on the embedded ``a+b=`` task, a supervised warm-up,
held-out accuracy, AGPO, held-out accuracy again; a few minutes on a 2-core CPU. Flags
and ``--config`` are described in ``agpo.config`` (``--help`` lists them); the step in
``agpo.trainer``; checkpoints in ``agpo.checkpoint``. The run directory gets
``config.yaml``, ``metrics.jsonl`` (one line per step), ``events.jsonl`` (evaluations),
``checkpoints/step-*/``, ``final/`` (a plain HF model) and ``summary.json``;
``python -m agpo.plot RUN_DIR`` draws it.

Under ``torchrun --nproc_per_node K [--nnodes M ...] -m agpo.train ...`` every rank runs
``run``: FSDP2 shards the policy (``agpo.parallel``), each rank samples its block of the
step's prompts, and rank 0 writes the run directory (docs/scale.md).
"""

from __future__ import annotations

import copy
import json
import random
import shutil
import sys
from pathlib import Path

import numpy as np
import torch

from agpo import checkpoint as ckpt
from agpo.config import ConfigError, TrainConfig, config_from_args
from agpo.data import DataError, load_problems
from agpo.distributed import DistEnv, broadcast_object, export_hf, init_distributed, shutdown_distributed
from agpo.metrics_log import MetricsLogger
from agpo.models import PRESETS, ModelNotFoundError, load_model_and_tokenizer, resolve_attn, resolve_dtype
from agpo.policy import Policy
from agpo.rollout import resolve_engine
from agpo.sft import supervised_warmup
from agpo.trainer import Trainer


def resolve_defaults(cfg: TrainConfig) -> TrainConfig:
    """Fill the model-dependent defaults (completion cap, micro-batch, warm-up length) and
    the device."""
    preset = PRESETS.get(cfg.model.model)
    if cfg.model.device == "auto":
        cfg.model.device = "cuda" if torch.cuda.is_available() else "cpu"
    if cfg.rollout.max_new_tokens is None:
        cfg.rollout.max_new_tokens = preset.max_new_tokens if preset else 512
    if cfg.optim.micro_batch_tokens is None:
        cfg.optim.micro_batch_tokens = preset.micro_batch_tokens if preset else 8192
    if cfg.warmup.sft_steps is None:
        cfg.warmup.sft_steps = 300 if (cfg.model.model == "tiny" and cfg.data.dataset == "arith") else 0
    cfg.rollout.engine = resolve_engine(cfg.rollout.engine, cfg.model.device)
    if cfg.loss.tis is None:
        cfg.loss.tis = "token" if cfg.rollout.engine == "vllm" else "off"
    return cfg


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


def _reference(cfg: TrainConfig, model, ref_dir: Path | None, saved: dict | None, load_kw: dict):
    """The frozen reference of the KL term for full fine-tuning with beta > 0 (LoRA uses the
    base with adapters off): the warmed-up start (``ref_dir``) or ``--model``."""
    if cfg.loss.beta == 0 or cfg.model.lora_rank:
        return None
    if saved:
        src = str(ref_dir) if ref_dir is not None else cfg.model.model
        ref = load_model_and_tokenizer(src, seed=cfg.run.seed, **load_kw)[0]
    else:
        ref = copy.deepcopy(model)
    return ref.eval().requires_grad_(False)


def run(cfg: TrainConfig) -> dict:
    """Train as ``cfg`` says; returns the summary (also written to ``summary.json``). Under
    torchrun every rank calls it; rank 0 writes the run directory."""
    cfg = resolve_defaults(cfg)
    env = init_distributed(cfg.model.device, timeout_s=cfg.run.dist_timeout)
    out = Path(cfg.run.out_dir)
    ref_dir = out / "reference"   # the warmed-up start: the KL reference and the LoRA base
    resume, have_ref = _find_start(cfg, out, ref_dir, env)
    saved = ckpt.load_state(resume) if resume else None
    if saved:
        ckpt.check_compatible(saved["config"], cfg.to_dict())
    if env.is_main:
        out.mkdir(parents=True, exist_ok=True)
    _seed_everything(cfg.run.seed)
    m = cfg.model
    preset = PRESETS.get(m.model)
    compute = resolve_dtype(m.dtype, str(env.device), preset)
    attn = resolve_attn(m.attn, str(env.device), compute, preset)  # for the device it will run on
    # torchrun on GPUs: load on the CPU in the compute dtype; sharding moves each rank's
    # shards to its GPU (upcast to fp32 master weights on the way, agpo.parallel)
    sharded_gpu = env.distributed and env.device.type == "cuda"
    load_kw = dict(dtype=compute, device="cpu" if sharded_gpu else str(env.device), attn=attn)
    source = str(ref_dir) if saved and have_ref else m.model
    model, tok = load_model_and_tokenizer(source, seed=cfg.run.seed, **load_kw)
    train_problems = load_problems(cfg.data, split="train")
    eval_problems = load_problems(cfg.data, split="test", limit=cfg.run.eval_size) if cfg.run.eval_size else []

    events: dict = dict(saved.get("events", {})) if saved else {}
    if not saved:
        if env.is_main:
            (out / "config.yaml").write_text(_yaml(cfg.to_dict()))
            shutil.rmtree(ref_dir, ignore_errors=True)  # an earlier run's start is not this run's
        if cfg.warmup.sft_steps:  # replicated on every rank, before sharding: small models only
            w = cfg.warmup
            model.to(env.device)
            events["warmup"] = supervised_warmup(Policy(model, impl=cfg.loss.impl), tok, train_problems,
                                                 steps=w.sft_steps, batch_size=w.sft_batch_size, lr=w.sft_lr,
                                                 seed=cfg.run.seed, progress=cfg.run.progress and env.is_main)
            if env.is_main:
                model.save_pretrained(str(ref_dir))
                tok.save_pretrained(str(ref_dir))
    ref_model = _reference(cfg, model, ref_dir if have_ref else None, saved, load_kw)

    trainer = Trainer(cfg, model, tok, train_problems, ref_model=ref_model, env=env, compute_dtype=compute)
    _say(env, f"agpo: {trainer.layout.describe()}; rollouts: {trainer.engine.describe()}")
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
    with MetricsLogger(out, total_steps=r.steps, progress=r.progress, tensorboard=r.tensorboard, enabled=env.is_main,
                       resume_step=trainer.step_count if saved else None) as log:
        if not saved:
            for name in ("warmup", "eval_before"):
                if name in events:
                    log.event(name, events[name])
        last_saved = trainer.step_count if saved else -1
        stopped = None
        while trainer.step_count < r.steps:
            if r.token_budget and trainer.tokens_generated >= r.token_budget:
                stopped = f"token budget {r.token_budget} reached"
                break
            metrics = trainer.step()
            step = trainer.step_count
            if r.eval_every and step % r.eval_every == 0 and eval_problems:
                metrics["eval/accuracy"] = trainer.evaluate(eval_problems)["accuracy"]
            log.log(step, metrics)
            if (r.save_every and step % r.save_every == 0) or step == r.stop_after:
                save()
                last_saved = step
            if step == r.stop_after and step < r.steps:
                _say(env, f"agpo: stopped after step {step} (--stop-after); continue with --resume auto")
                trainer.close()
                return {"stopped_after": step}
        if trainer.step_count != last_saved:
            save()
        export_hf(trainer.policy, trainer.model, tok, out / "final", env, dtype=compute)
        if eval_problems:
            events["eval_after"] = trainer.evaluate(eval_problems)
            log.event("eval_after", events["eval_after"])
    trainer.close()

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


def main(argv: list[str] | None = None) -> int:
    try:
        cfg = config_from_args(argv)
        try:
            run(cfg)
        finally:
            shutdown_distributed()
    except (ConfigError, DataError, ModelNotFoundError, ckpt.CheckpointError) as e:
        print(f"agpo.train: error: {e}", file=sys.stderr)
        return 2
    except ValueError as e:  # a bad flag value found while building the run (e.g. --reward)
        if not str(e).startswith("--"):
            raise
        print(f"agpo.train: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
