"""Per-step metrics of a training run: ``metrics.jsonl``, ``events.jsonl``, a progress bar.

``MetricsLogger`` is what ``agpo.train`` writes a run directory's curves with, on the main
process only (``enabled=False`` on the other ranks turns every method into a no-op):

- ``metrics.jsonl``: one JSON object per line and per step, ``{"step": 3, "reward/mean": ...}``.
  Each line is flushed as soon as it is written, so a crash loses nothing that was logged.
  NaN and +-inf are written as ``null`` so that every line is strict JSON.
- ``events.jsonl``: one line per one-off event (``{"event": "eval_before", ...}``), also
  printed as one line above the progress bar.
- a ``tqdm`` progress bar with a short postfix (reward, accuracy, eps, tau);
- optionally TensorBoard scalars under ``RUN_DIR/tensorboard`` (needs the ``tensorboard``
  package, imported only when asked for).

Resuming (``resume_step=N``) rewrites ``metrics.jsonl`` atomically keeping the rows with
``step <= N`` (the steps the checkpoint contains), so the file of a resumed run is the same
as the file of an uninterrupted one; without ``resume_step`` the files start empty.

``read_metrics(path)`` reads the rows back (a run directory or the file itself), skipping a
last line cut short by a crash. ``agpo.plot`` draws them.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

__all__ = ["MetricsLogger", "read_metrics", "TensorBoardMissingError", "METRICS_FILE", "EVENTS_FILE"]

METRICS_FILE = "metrics.jsonl"
EVENTS_FILE = "events.jsonl"
TENSORBOARD_DIR = "tensorboard"

# (metric key, short name in the progress bar postfix)
_POSTFIX_KEYS = (("reward/mean", "reward"), ("reward/accuracy", "acc"), ("eps/mean", "eps"), ("tau/mean", "tau"))


class TensorBoardMissingError(ImportError):
    """``tensorboard=True`` without the ``tensorboard`` package installed."""


def _json_value(key: str, value: Any) -> Any:
    """A metric value as strict JSON: int stays int, floats are finite or ``None``."""
    if value is None:
        return None
    if hasattr(value, "item") and callable(value.item):  # 0-d torch / numpy values
        value = value.item()
    if isinstance(value, bool):
        return value
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        return value
    try:
        f = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"metric {key!r} is not a number: {value!r}") from None
    return f if math.isfinite(f) else None


def _json_payload(payload: Any) -> Any:
    """Event payloads may nest: replace non-finite floats anywhere by ``None``."""
    if isinstance(payload, dict):
        return {str(k): _json_payload(v) for k, v in payload.items()}
    if isinstance(payload, (list, tuple)):
        return [_json_payload(v) for v in payload]
    if hasattr(payload, "item") and callable(payload.item) and getattr(payload, "ndim", 0) == 0:
        payload = payload.item()
    if isinstance(payload, float) and not math.isfinite(payload):
        return None
    if isinstance(payload, (str, int, float, bool)) or payload is None:
        return payload
    return str(payload)


def _dumps(obj: Any) -> str:
    return json.dumps(obj, allow_nan=False, ensure_ascii=False)


def _short(v: Any) -> str:
    return "nan" if v is None else f"{v:.3g}" if isinstance(v, (int, float)) else str(v)


def _parse_lines(text: str, path: Path) -> list[tuple[str, dict]]:
    """(raw line, parsed object) for every complete, valid JSON object line.

    A last line that does not parse (the file was cut mid-write) is skipped; a bad line
    in the middle means the file is not a metrics file and raises ``ValueError``.
    """
    lines = text.splitlines()
    out = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            if i == len(lines) - 1:
                break  # truncated by a crash
            raise ValueError(f"{path}: line {i + 1} is not JSON ({e.msg})") from None
        if not isinstance(obj, dict):
            raise ValueError(f"{path}: line {i + 1} is not a JSON object")
        out.append((line, obj))
    return out


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """The rows of a ``metrics.jsonl`` (``path`` is the file or the run directory).

    ``null`` values come back as ``None``; a truncated last line is skipped.
    """
    p = Path(path)
    if p.is_dir():
        p = p / METRICS_FILE
    return [obj for _, obj in _parse_lines(p.read_text(encoding="utf-8"), p)]


def _atomic_write(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


class MetricsLogger:
    """Writes the per-step metrics and the events of one run (see the module docstring)."""

    def __init__(self, run_dir: str | os.PathLike, *, total_steps: int, enabled: bool = True,
                 progress: bool = True, tensorboard: bool = False, resume_step: int | None = None):
        self.enabled = enabled
        self.run_dir = Path(run_dir)
        self.total_steps = total_steps
        self.resume_step = resume_step
        self._metrics = self._events = self._bar = self._tb = None
        self._closed = False
        if not enabled:
            return
        if resume_step is not None and resume_step < 0:
            raise ValueError(f"resume_step must be >= 0, got {resume_step}")
        writer_cls = _summary_writer_class() if tensorboard else None  # fail before touching files
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.run_dir / METRICS_FILE
        self.events_path = self.run_dir / EVENTS_FILE
        if resume_step is None:
            self._metrics = open(self.metrics_path, "w", encoding="utf-8")
            self._events = open(self.events_path, "w", encoding="utf-8")
        else:
            self._truncate_metrics(resume_step)
            self._metrics = open(self.metrics_path, "a", encoding="utf-8")
            self._events = open(self.events_path, "a", encoding="utf-8")
        if writer_cls is not None:
            kw = {} if resume_step is None else {"purge_step": resume_step + 1}
            self._tb = writer_cls(log_dir=str(self.run_dir / TENSORBOARD_DIR), **kw)
        if progress:
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, initial=resume_step or 0, unit="step", dynamic_ncols=True)

    def _truncate_metrics(self, resume_step: int) -> None:
        """Keep the rows with ``step <= resume_step`` (atomically: temp file + ``os.replace``)."""
        if not self.metrics_path.exists():
            _atomic_write(self.metrics_path, "")
            return
        kept = [line for line, obj in _parse_lines(self.metrics_path.read_text(encoding="utf-8"), self.metrics_path)
                if isinstance(obj.get("step"), int) and obj["step"] <= resume_step]
        _atomic_write(self.metrics_path, "".join(line + "\n" for line in kept))

    def log(self, step: int, metrics: dict[str, float]) -> None:
        """Append the metrics of ``step``; update the progress bar and TensorBoard."""
        if not self.enabled:
            return
        self._check_open()
        row: dict[str, Any] = {"step": int(step)}
        for k, v in metrics.items():
            if k == "step":
                continue
            row[str(k)] = _json_value(k, v)
        self._metrics.write(_dumps(row) + "\n")
        self._metrics.flush()
        if self._bar is not None:
            if step > self._bar.n:
                self._bar.update(step - self._bar.n)
            parts = [f"{short}={_short(row[key])}" for key, short in _POSTFIX_KEYS if key in row]
            self._bar.set_postfix_str(" ".join(parts), refresh=True)
        if self._tb is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                    self._tb.add_scalar(k, v, global_step=row["step"])
            self._tb.flush()

    def event(self, name: str, payload: dict) -> None:
        """Append ``{"event": name, **payload}`` to ``events.jsonl`` and print it as one line."""
        if not self.enabled:
            return
        self._check_open()
        obj = {"event": name, **_json_payload(dict(payload))}
        line = _dumps(obj)
        self._events.write(line + "\n")
        self._events.flush()
        from tqdm import tqdm

        shown = " ".join(f"{k}={_short(v)}" for k, v in obj.items()
                         if k != "event" and (v is None or isinstance(v, (int, float, str))))
        tqdm.write(f"agpo: {name}: {shown}" if shown else f"agpo: {name}")

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("MetricsLogger is closed")

    def close(self) -> None:
        """Close the files, the progress bar and the TensorBoard writer (idempotent)."""
        if self._closed:
            return
        self._closed = True
        for f in (self._metrics, self._events):
            if f is not None:
                f.close()
        if self._bar is not None:
            self._bar.close()
        if self._tb is not None:
            self._tb.close()

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _summary_writer_class():
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:
        raise TensorBoardMissingError("--tensorboard needs the tensorboard package (pip install tensorboard)") from e
    return SummaryWriter
