"""Checkpoints: written atomically, found again by ``--resume auto``.

A checkpoint is a directory ``RUN_DIR/checkpoints/step-NNNNNN/`` holding

- ``weights/``: policy weights and AdamW state as a ``torch.distributed.checkpoint``
  (DCP) folder: each rank writes its own shards, and a run at any other world size
  (one process included) loads it back, DCP resharding on load. A LoRA run saves only
  the adapters (and their optimiser state): the frozen base is rebuilt from ``--model``
  (or ``RUN_DIR/reference`` when a warm-up changed it).
- ``trainer_state.pt``: LR scheduler, controller state, RNG states (Python, NumPy, torch
  CPU and the current CUDA device), data position, step and token counters and the run
  config (rank 0's; every rank restores them on resume).

It is written to ``.tmp-step-NNNNNN`` beside its final place and renamed into place by
rank 0 once every rank has finished, so a directory named ``step-*`` is always complete;
a crash mid-write leaves only a ``.tmp-*`` directory, which the next save removes. Older
checkpoints beyond ``keep`` are deleted only after a newer one is in place. Under torchrun
the run directory must be on a filesystem every rank sees. The plain HF model of a run is
its ``RUN_DIR/final`` export (``agpo.distributed.export_hf``).
"""

from __future__ import annotations

import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

from agpo.distributed import DistEnv, barrier, load_sharded, save_sharded

STATE_FILE = "trainer_state.pt"
WEIGHTS_DIR = "weights"
_STEP_DIR = re.compile(r"^step-(\d{6,})$")

RESUMABLE_CHANGES = {"run": {"resume", "stop_after", "progress", "tensorboard", "out_dir", "eval_every", "eval_size",
                             "save_every", "keep_checkpoints", "steps", "token_budget",
                             "dist_timeout"},
                     "model": {"device", "attn"},
                     "rollout": {"generation_batch_size", "engine", "vllm_gpu_memory_utilization",
                                 "vllm_tensor_parallel_size", "vllm_sleep_level", "vllm_kv_cache_gib",
                                 "vllm_enforce_eager"},
                     "optim": {"micro_batch_tokens"}, "loss": {"tis", "tis_cap"}}
"""Config fields a resumed run may change; any other difference is an error."""


class CheckpointError(RuntimeError):
    """A checkpoint cannot be found, read or continued with this config."""


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()      # this rank's device (a resume may have fewer GPUs)
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def list_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints of a run, oldest first."""
    root = checkpoint_dir(run_dir)
    if not root.is_dir():
        return []
    out = []
    for d in root.iterdir():
        m = _STEP_DIR.match(d.name)
        if m and (d / STATE_FILE).is_file():
            out.append((int(m.group(1)), d))
    return sorted(out)


def save_checkpoint(run_dir: str | Path, step: int, model, optimizer, state: dict, *, keep: int = 2,
                    trainable_only: bool = False, env: DistEnv | None = None) -> Path:
    """Write checkpoint ``step`` atomically; returns its directory. Collective under
    torchrun (every rank calls it); ``state`` is written from rank 0."""
    main = env is None or env.is_main
    root = checkpoint_dir(run_dir)
    final = root / f"step-{step:06d}"
    tmp = root / f".tmp-step-{step:06d}"
    if main:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(".tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir()
    if env is not None:
        barrier(env)
    save_sharded(tmp / WEIGHTS_DIR, model, optimizer, trainable_only=trainable_only)
    if main:
        try:
            with open(tmp / STATE_FILE, "wb") as f:
                torch.save(state, f)
                f.flush()
                os.fsync(f.fileno())
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        for _, old in list_checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    if env is not None:
        barrier(env)
    return final


def load_weights(path: Path, model, optimizer, *, trainable_only: bool = False) -> None:
    """Checkpoint ``path``'s weights and optimiser state into ``model`` / ``optimizer`` (in
    place, at this run's world size). Collective under torchrun."""
    try:
        load_sharded(Path(path) / WEIGHTS_DIR, model, optimizer, trainable_only=trainable_only)
    except Exception as e:
        raise CheckpointError(f"--resume {path}: cannot load {WEIGHTS_DIR}/ into this model "
                              f"({type(e).__name__}: {e})") from e


def resolve_resume(resume: str | None, run_dir: str | Path) -> Path | None:
    """The checkpoint ``--resume`` names: ``auto`` = the latest complete one in ``run_dir``
    (None when there is none: a fresh start), or a ``step-*`` directory."""
    if not resume:
        return None
    if resume == "auto":
        found = list_checkpoints(run_dir)
        return found[-1][1] if found else None
    path = Path(resume).expanduser()
    if not (path / STATE_FILE).is_file():
        raise CheckpointError(f"--resume {resume}: not a complete checkpoint (no {STATE_FILE}); "
                              f"pass a {checkpoint_dir(run_dir)}/step-* directory or --resume auto")
    return path


def load_state(path: Path) -> dict:
    try:
        return torch.load(path / STATE_FILE, map_location="cpu", weights_only=False)
    except Exception as e:
        raise CheckpointError(f"--resume {path}: cannot read {STATE_FILE} ({type(e).__name__}: {e})") from e


def check_compatible(saved: dict, current: dict) -> None:
    """Raise if the config differs from the checkpoint's in a field a resume cannot change."""
    diffs = []
    for section, values in current.items():
        old = saved.get(section, {})
        for key, value in values.items():
            if key in RESUMABLE_CHANGES.get(section, set()):
                continue
            if key in old and old[key] != value:
                diffs.append(f"{section}.{key}: checkpoint {old[key]!r}, now {value!r}")
    if diffs:
        raise CheckpointError("--resume: the run config differs from the checkpoint's in " + "; ".join(diffs)
                              + ". Resume with the same settings, or start a new run in another --out-dir.")
