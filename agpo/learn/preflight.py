"""Checks of a run's config against this machine before anything is loaded: ``preflight(cfg)``.

``launch.run`` calls it first, before ``resolve_defaults`` (which may read the model's
config for the memory plan), the process group, the model, the data or the warm-up: everything a run would otherwise find out only after loading
the weights (or after a warm-up of minutes) is found here, and each failure is a
``ConfigError`` (exit status 2) whose one line names the flag and the fix:

- ``--model``: a missing path or a folder without a model; a misspelt preset (``qwen-14b``)
  gets "did you mean" instead of a hub lookup;
- ``--device``: a CUDA device on a torch build without CUDA or beyond the visible ones;
- ``--impl triton`` on a CPU run (without ``TRITON_INTERPRET=1``) or without triton;
- ``--rollout vllm`` without a supported vLLM; ``--reward`` that names no reward function;
- ``--tensorboard`` without the tensorboard package;
- ``--out-dir``: under a file, not writable, or holding an earlier run (refused unless
  ``--resume`` or ``--overwrite``; ``RUN_FILES`` says what an earlier run leaves).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path

import torch

from agpo.errors import ConfigError
from agpo.models import check_model_source
from agpo.rollout import resolve_engine
from agpo.tasks.rewards import load_reward

RUN_FILES = ("config.yaml", "summary.json", "metrics.jsonl", "events.jsonl", "checkpoints", "final", "reference",
             "tensorboard", "curves.png", "groups.jsonl")
"""What a run writes into its directory; one of them present means the directory holds a run."""


def earlier_run(out: Path) -> list[str]:
    """The run files ``out`` holds (empty: no earlier run there)."""
    if not out.is_dir():
        return []
    found = [name for name in RUN_FILES if (out / name).exists()]
    found += sorted(p.name for p in out.glob("step-*"))  # a checkpoint directory written flat
    return found


def remove_run_files(out: Path) -> None:
    """Delete the files an earlier run left in ``out`` (``RUN_FILES``); other files stay."""
    for name in earlier_run(out):
        path = out / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)


def _is_main_rank() -> bool:
    return os.environ.get("RANK", "0") == "0"


def _check_device(device: str) -> None:
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ConfigError(f"--device {device!r}: expected cpu, cuda, cuda:N or auto") from None
    if dev.type == "cpu":
        return
    if dev.type != "cuda":
        raise ConfigError(f"--device {device!r}: expected cpu, cuda, cuda:N or auto")
    if torch.version.cuda is None and not getattr(torch.version, "hip", None):
        raise ConfigError(f"--device {device}: this torch build ({torch.__version__}) has no CUDA support; "
                          "install a CUDA build of torch, or use --device cpu")
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0:
        raise ConfigError(f"--device {device}: no CUDA device is visible (CUDA_VISIBLE_DEVICES="
                          f"{os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}); use --device cpu")
    if dev.index is not None and dev.index >= count:
        raise ConfigError(f"--device {device}: only {count} CUDA device(s) are visible (cuda:0..cuda:{count - 1})")


def _check_impl(impl: str, device: str) -> None:
    if impl != "triton":
        return
    if importlib.util.find_spec("triton") is None:
        raise ConfigError("--impl triton: triton is not installed (Linux x86_64/aarch64 wheels: pip install triton); "
                          "use --impl torch or --impl auto")
    if not device.startswith("cuda") and os.environ.get("TRITON_INTERPRET") != "1":
        raise ConfigError(f"--impl triton: the Triton kernels need a CUDA device and this run is on {device}; use "
                          "--impl torch (or auto), or set TRITON_INTERPRET=1 to run them in Triton's (slow) interpreter")


def _check_vllm(asked: str) -> None:
    """``asked``: the --rollout value (``auto`` picks vLLM on CUDA when it imports)."""
    from agpo.rollout.vllm import VLLMUnavailable, check_vllm

    try:
        check_vllm()
    except VLLMUnavailable as e:
        msg = str(e)
        if asked == "auto":  # the user did not ask for vLLM: say why it was chosen
            raise ConfigError(f"--rollout auto chose vLLM (it imports on this CUDA machine), but {msg}; "
                              "pass --rollout hf, or install a supported vLLM") from None
        raise ConfigError(msg if msg.startswith("--rollout") else f"--rollout vllm: {msg}; or use --rollout hf") from None


def _check_out_dir(cfg) -> str | None:
    """Path checks; the earlier-run rule (rank 0). Returns a line for the log, or None."""
    r = cfg.run
    out = Path(r.out_dir).expanduser()
    for p in (out, *out.parents):
        if p.exists() and not p.is_dir():
            where = "is a file" if p == out else f"lies under {p}, which is a file"
            raise ConfigError(f"--out-dir {r.out_dir}: {where}, not a directory; choose another --out-dir")
        if p.exists():
            if not os.access(p, os.W_OK | os.X_OK):
                raise ConfigError(f"--out-dir {r.out_dir}: {p} is not writable; choose another --out-dir")
            break
    if r.overwrite and r.resume:
        raise ConfigError(f"--overwrite and --resume {r.resume}: --overwrite starts afresh, --resume continues; "
                          "give one of them")
    if r.resume or not _is_main_rank():
        return None
    found = earlier_run(out)
    if not found:
        return None
    if r.overwrite:
        return f"agpo: --overwrite: this run replaces the previous run in {r.out_dir} ({', '.join(found)})"
    raise ConfigError(f"--out-dir {r.out_dir}: holds an earlier run ({', '.join(found[:4])}); choose another "
                      "--out-dir, continue it with --resume auto, or replace it with --overwrite")


def preflight(cfg) -> list[str]:
    """Check ``cfg`` against this machine before anything is loaded (``cfg`` is not changed);
    raise ``ConfigError`` naming the flag and the fix. Returns lines for the log."""
    notes = []
    check_model_source(cfg.model.model)  # ModelNotFoundError: exit status 2 too
    device = str(cfg.model.device)
    if device == "auto":  # as resolve_defaults will
        device = "cuda" if torch.cuda.is_available() else "cpu"
    _check_device(device)
    _check_impl(cfg.loss.impl, device)
    try:
        load_reward(cfg.rollout.reward)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if resolve_engine(cfg.rollout.engine, device) == "vllm":
        _check_vllm(cfg.rollout.engine)
    if cfg.run.tensorboard and importlib.util.find_spec("tensorboard") is None:
        raise ConfigError('--tensorboard: the tensorboard package is not installed; pip install tensorboard '
                          '(or pip install "agpo[tensorboard]"), or leave out --tensorboard')
    note = _check_out_dir(cfg)
    if note:
        notes.append(note)
    return notes
