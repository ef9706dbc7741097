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
checkpoints beyond ``keep`` are deleted only after a newer one is in place. A write that
fails on any rank (disk full, ...) raises ``CheckpointWriteError`` on every rank, removes
the partial ``.tmp-*`` directory and leaves the previous checkpoints untouched. Under
torchrun the run directory must be on a filesystem every rank sees. The plain HF model of
a run is its ``RUN_DIR/final`` export (``agpo.scale.distributed.export_hf``).

Checkpoints are untrusted input: ``trainer_state.pt`` holds plain values and tensors only
(the NumPy RNG state is stored as plain ints) and is read with ``weights_only=True``; the
weights folder is read through ``agpo.scale.dcp_safe`` (allow-listed metadata, truncation
check, ``weights_only=True`` for everything else). ``validate`` names the file that is
truncated or corrupt; ``--resume auto`` skips such a checkpoint with a warning and takes
the newest one that is complete.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import warnings
from pathlib import Path

import numpy as np
import torch

from agpo.errors import CheckpointError, CheckpointWriteError
from agpo.scale.dcp_safe import check_folder
from agpo.scale.distributed import DistEnv, load_sharded, on_rank0, save_sharded

STATE_FILE = "trainer_state.pt"
WEIGHTS_DIR = "weights"
_STEP_DIR = re.compile(r"^step-(\d{6,})$")

RESUMABLE_CHANGES = {"run": {"resume", "overwrite", "stop_after", "progress", "tensorboard", "out_dir", "eval_every", "eval_size",
                             "save_every", "keep_checkpoints", "steps", "token_budget", "eval_max_new_tokens",
                             "dist_timeout"},
                     "guard": {"verifier_workers", "verifier_timeout", "verifier_batch_timeout", "reward_errors",
                               "max_skipped_steps"},
                     "model": {"device", "attn", "liger", "gradient_checkpointing"},
                     "rollout": {"generation_batch_size", "engine", "vllm_gpu_memory_utilization",
                                 "vllm_tensor_parallel_size", "vllm_sleep_level", "vllm_kv_cache_gib",
                                 "vllm_enforce_eager", "vllm_max_model_len", "max_prompt_tokens", "vllm_head_dtype"},
                     "optim": {"micro_batch_tokens", "packing"}, "loss": {"tis", "tis_cap"}}
"""Config fields a resumed run may change; any other difference is an error."""




class CheckpointWarning(UserWarning):
    """``--resume auto`` skipped a damaged checkpoint."""


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def rng_state() -> dict:
    """Python, NumPy, torch (and this rank's CUDA) RNG states in types ``weights_only`` reads."""
    npy = np.random.get_state(legacy=False)
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": {"bit_generator": npy["bit_generator"], "key": npy["state"]["key"].tolist(),
                       "pos": int(npy["state"]["pos"]), "has_gauss": int(npy["has_gauss"]),
                       "gauss": float(npy["gauss"])}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()      # this rank's device (a resume may have fewer GPUs)
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    npy = state["numpy"]
    if isinstance(npy, dict):
        npy = {"bit_generator": npy["bit_generator"], "has_gauss": npy["has_gauss"], "gauss": npy["gauss"],
               "state": {"key": np.asarray(npy["key"], dtype=np.uint32), "pos": npy["pos"]}}
    np.random.set_state(npy)  # (a tuple: a checkpoint written before the plain form)
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


def _failure(e: BaseException) -> str:
    """The root cause of a failed save, in one line (DCP wraps each rank's error)."""
    failures = getattr(e, "failures", None)
    if isinstance(failures, dict) and failures:
        rank, wrapped = sorted(failures.items())[0]
        cause = wrapped[0] if isinstance(wrapped, tuple) else wrapped
        return f"rank {rank}: {type(cause).__name__}: {cause}"
    return f"{type(e).__name__}: {e}"


def _space(root: Path, before: list) -> str:
    """Free space where checkpoints go, and what the last one took (a full disk often shows
    up as a torch or DCP error that does not say so)."""
    try:
        free = shutil.disk_usage(root if root.exists() else root.parent).free
    except OSError:
        return "free space unknown"
    last = sum(f.stat().st_size for f in before[-1][1].rglob("*") if f.is_file()) if before else 0
    return f"{free / 2**20:.0f} MiB free there" + (f", the last checkpoint took {last / 2**20:.0f} MiB" if last else "")


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_state(file: Path, state: dict) -> None:
    with open(file, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())


def save_checkpoint(run_dir: str | Path, step: int, model, optimizer, state: dict, *, keep: int = 2,
                    trainable_only: bool = False, env: DistEnv | None = None) -> Path:
    """Write checkpoint ``step`` atomically; returns its directory. Collective under
    torchrun (every rank calls it); ``state`` is written from rank 0. Raises
    ``CheckpointWriteError`` on every rank if any part fails (nothing else changes)."""
    from torch.distributed.checkpoint.api import CheckpointException

    root = checkpoint_dir(run_dir)
    final = root / f"step-{step:06d}"
    tmp = root / f".tmp-step-{step:06d}"
    before = list_checkpoints(run_dir)

    def prepare():
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(".tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir()

    def finish():
        _write_state(tmp / STATE_FILE, state)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(root)

    try:
        on_rank0(prepare)
        save_sharded(tmp / WEIGHTS_DIR, model, optimizer, trainable_only=trainable_only)
        on_rank0(finish)
    except (Exception, CheckpointException) as e:
        if env is None or env.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        prev = f"the previous checkpoint {before[-1][1]} is untouched" if before else "no earlier checkpoint exists"
        raise CheckpointWriteError(f"writing checkpoint {final} failed ({_failure(e)}; {_space(root, before)}); "
                                   f"{prev}. Free space or fix the file system, then continue with "
                                   f"--resume auto") from e

    def prune():
        for _, old in list_checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    on_rank0(prune)
    return final


def load_weights(path: Path, model, optimizer, *, trainable_only: bool = False) -> None:
    """Checkpoint ``path``'s weights and optimiser state into ``model`` / ``optimizer`` (in
    place, at this run's world size). Collective under torchrun."""
    try:
        load_sharded(Path(path) / WEIGHTS_DIR, model, optimizer, trainable_only=trainable_only)
    except Exception as e:
        raise CheckpointError(f"--resume {path}: cannot load {WEIGHTS_DIR}/ into this model "
                              f"({type(e).__name__}: {e})") from e


def _legacy_numpy_types() -> list:
    """NumPy's array reconstruction, for the RNG state of checkpoints written before it was
    stored as plain ints (torch's documented allow-list for NumPy arrays)."""
    core = getattr(np, "_core", None) or np.core
    return [core.multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]


def load_state(path: Path) -> dict:
    """``path``'s ``trainer_state.pt``, read with ``weights_only=True`` (plain values,
    tensors and NumPy arrays only: a checkpoint from elsewhere cannot run code)."""
    file = Path(path) / STATE_FILE
    try:
        with torch.serialization.safe_globals(_legacy_numpy_types()):
            state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - truncated, corrupt, or holding arbitrary objects
        first = (str(e).strip().splitlines() or [""])[0][:300]
        raise CheckpointError(f"checkpoint {path}: {file.name} is truncated, corrupt or holds more than plain "
                              f"values and tensors ({type(e).__name__}: {first})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path}: {file.name} holds a {type(state).__name__}, not a dict")
    return state


def validate(path: Path) -> dict:
    """Check checkpoint ``path`` without loading weights: ``trainer_state.pt`` reads, the
    weights' metadata reads and no weight file is missing or short. Returns the state;
    raises ``CheckpointError`` naming the damaged file."""
    state = load_state(path)
    try:
        check_folder(Path(path) / WEIGHTS_DIR)
    except ValueError as e:
        raise CheckpointError(f"checkpoint {path}: {str(e).replace(f'{Path(path)}{os.sep}', '')}") from None
    return state


def resolve_resume(resume: str | None, run_dir: str | Path) -> Path | None:
    """The checkpoint ``--resume`` names: ``auto`` = the newest complete one in ``run_dir``
    (damaged ones are skipped with a ``CheckpointWarning``; None when there is none: a
    fresh start), or a ``step-*`` directory (which must be complete)."""
    if not resume:
        return None
    if resume == "auto":
        problems = []
        for _, path in reversed(list_checkpoints(run_dir)):
            try:
                validate(path)
            except CheckpointError as e:
                problems.append(str(e))
                warnings.warn(f"--resume auto: skipping a damaged checkpoint: {e}", CheckpointWarning, stacklevel=2)
                continue
            if problems:
                warnings.warn(f"--resume auto: resuming from {path}, the newest complete checkpoint",
                              CheckpointWarning, stacklevel=2)
            return path
        if problems:
            raise CheckpointError("--resume auto: every checkpoint is damaged (" + "; ".join(problems)
                                  + "). Remove them to start afresh, or restore one from a copy.")
        return None
    path = Path(resume).expanduser()
    if not (path / STATE_FILE).is_file():
        raise CheckpointError(f"--resume {resume}: not a complete checkpoint (no {STATE_FILE}); "
                              f"pass a {checkpoint_dir(run_dir)}/step-* directory or --resume auto")
    validate(path)
    return path


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
