"""``python -m agpo.train``: AGPO (or GRPO) fine-tuning of a Hugging Face causal LM.

With no arguments: the tiny preset on the embedded ``a+b=`` task, a supervised warm-up,
held-out accuracy, AGPO, held-out accuracy again; a few minutes on a 2-core CPU. Flags
and ``--config`` are described in ``agpo.config`` (``--help`` lists them); the step in
``agpo.trainer``; checkpoints in ``agpo.checkpoint``. The run directory gets
``config.yaml``, ``metrics.jsonl`` (one line per step), ``events.jsonl`` (evaluations),
``checkpoints/step-*/`` and ``summary.json``; ``python -m agpo.plot RUN_DIR`` draws it.
"""

from __future__ import annotations

import copy
import json
import random
import sys
from pathlib import Path

import numpy as np
import torch

from agpo import checkpoint as ckpt
from agpo.config import ConfigError, TrainConfig, config_from_args
from agpo.data import DataError, load_problems
from agpo.eval import evaluate
from agpo.metrics_log import MetricsLogger
from agpo.models import PRESETS, ModelNotFoundError, load_model_and_tokenizer
from agpo.policy import Policy
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
    return cfg


def _evaluate(model, tokenizer, problems, cfg: TrainConfig) -> dict:
    return evaluate(model, tokenizer, problems, max_new_tokens=cfg.rollout.max_new_tokens, batch_size=64,
                    seed=cfg.run.seed, progress=False)["summary"]


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def run(cfg: TrainConfig) -> dict:
    """Train as ``cfg`` says; returns the summary (also written to ``summary.json``)."""
    cfg = resolve_defaults(cfg)
    out = Path(cfg.run.out_dir)
    resume = ckpt.resolve_resume(cfg.run.resume, out)
    saved = ckpt.load_state(resume) if resume else None
    if saved:
        ckpt.check_compatible(saved["config"], cfg.to_dict())
    out.mkdir(parents=True, exist_ok=True)
    _seed_everything(cfg.run.seed)
    m = cfg.model
    source = str(resume / "model") if resume else m.model
    model, tok = load_model_and_tokenizer(source, dtype=m.dtype, device=m.device, attn=m.attn, seed=cfg.run.seed)
    if m.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    train_problems = load_problems(cfg.data, split="train")
    eval_problems = load_problems(cfg.data, split="test", limit=cfg.run.eval_size) if cfg.run.eval_size else []

    events: dict = dict(saved.get("events", {})) if saved else {}
    if not saved:
        (out / "config.yaml").write_text(_yaml(cfg.to_dict()))
        if cfg.warmup.sft_steps:
            w = cfg.warmup
            events["warmup"] = supervised_warmup(Policy(model, impl=cfg.loss.impl), tok, train_problems,
                                                 steps=w.sft_steps, batch_size=w.sft_batch_size, lr=w.sft_lr,
                                                 seed=cfg.run.seed, progress=cfg.run.progress)
        if eval_problems:
            events["eval_before"] = _evaluate(model, tok, eval_problems, cfg)
    ref_model = None
    if cfg.loss.beta > 0:
        ref_dir = out / "reference"
        if saved and ref_dir.is_dir():
            ref_model, _ = load_model_and_tokenizer(str(ref_dir), dtype=m.dtype, device=m.device, attn=m.attn)
        elif saved:
            ref_model, _ = load_model_and_tokenizer(m.model, dtype=m.dtype, device=m.device, attn=m.attn,
                                                    seed=cfg.run.seed)
        else:
            ref_model = copy.deepcopy(model)
            if cfg.warmup.sft_steps:  # the warmed-up policy is the reference: keep it for a resume
                ref_model.save_pretrained(str(ref_dir))
                tok.save_pretrained(str(ref_dir))
        ref_model.eval().requires_grad_(False)

    trainer = Trainer(cfg, model, tok, train_problems, ref_model=ref_model)
    if saved:
        trainer.load_state_dict(saved["trainer"])
        ckpt.set_rng_state(saved["rng"])
        print(f"agpo: resumed from {resume} at step {trainer.step_count}")

    def save():
        state = {"trainer": trainer.state_dict(), "rng": ckpt.rng_state(), "config": cfg.to_dict(), "events": events}
        return ckpt.save_checkpoint(out, trainer.step_count, model, tok, state, keep=cfg.run.keep_checkpoints)

    r = cfg.run
    with MetricsLogger(out, total_steps=r.steps, progress=r.progress, tensorboard=r.tensorboard,
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
                metrics["eval/accuracy"] = _evaluate(model, tok, eval_problems, cfg)["accuracy"]
            log.log(step, metrics)
            if (r.save_every and step % r.save_every == 0) or step == r.stop_after:
                save()
                last_saved = step
            if step == r.stop_after and step < r.steps:
                print(f"agpo: stopped after step {step} (--stop-after); continue with --resume auto")
                return {"stopped_after": step}
        if trainer.step_count != last_saved:
            save()
        if eval_problems:
            events["eval_after"] = _evaluate(model, tok, eval_problems, cfg)
            log.event("eval_after", events["eval_after"])

    summary = {"steps": trainer.step_count, "tokens_generated": trainer.tokens_generated, "stopped": stopped,
               "algo": r.algo, "model": m.model, "dataset": cfg.data.dataset, "seed": r.seed}
    if "eval_before" in events:
        summary["accuracy_before"] = events["eval_before"]["accuracy"]
    if "eval_after" in events:
        summary["accuracy_after"] = events["eval_after"]["accuracy"]
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    if "accuracy_after" in summary:
        print(f"agpo: held-out accuracy {summary.get('accuracy_before', float('nan')):.1%} before RL -> "
              f"{summary['accuracy_after']:.1%} after {trainer.step_count} steps ({out})")
    return summary


def _yaml(d: dict) -> str:
    import yaml

    return yaml.safe_dump(d, sort_keys=False)


def main(argv: list[str] | None = None) -> int:
    try:
        cfg = config_from_args(argv)
        run(cfg)
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
