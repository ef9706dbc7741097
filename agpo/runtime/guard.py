"""What a long run does when something goes wrong: settings, exit statuses, non-finite steps.

docs/operations.md is the user's view of all of it. Here:

- ``GuardConfig``: the ``guard`` section of the run config (``--verifier-workers``,
  ``--verifier-timeout``, ``--verifier-batch-timeout``, ``--reward-errors``,
  ``--max-skipped-steps``).
- ``exit_status(exc)``, which maps an exception that ended a run to ``(status, message)``
  (the statuses ``EXIT_*`` and the errors that carry them are in ``agpo.errors``).
- Non-finite steps: ``finite`` tells whether tensors / numbers are all finite;
  ``StepGuard`` snapshots the controller at the start of a training step and restores it
  when the step applied no optimiser step or left the controller non-finite (its state
  never advances on garbage), and counts skipped optimiser steps in a row
  (``TrainingDiverged`` once ``--max-skipped-steps`` is reached).
"""

from __future__ import annotations

import copy
import errno
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from agpo.errors import (  # noqa: F401
    EXIT_CHECKPOINT_WRITE,
    EXIT_DIVERGED,
    EXIT_ERROR,
    EXIT_OK,
    EXIT_PREEMPTED,
    EXIT_RANK_LOST,
    EXIT_USAGE,
    AgpoError,
    CheckpointWriteError,
    TrainingDiverged,
)
from agpo.runtime.checkpoint import list_checkpoints

REWARD_ERRORS = ("raise", "zero")


@dataclass(kw_only=True)
class GuardConfig:
    """How the run meets untrusted completions and non-finite steps (docs/operations.md)."""

    verifier_workers: int = 0
    """math-verify worker processes per rank (0: a quarter of the rank's cores, 2 to 8)."""
    verifier_timeout: float = 5.0
    """Seconds one math-verify comparison may take; a slower one scores 0 (verifier/timeouts)."""
    verifier_batch_timeout: float = 60.0
    """Seconds the comparisons of one phase (probe or train rollouts) may take in all; the rest score 0."""
    reward_errors: str = "raise"
    """A reward function that raises or returns a non-finite value: raise (stop the run, naming
    the row and its text) or zero (score the row 0, count it in reward/errors)."""
    max_skipped_steps: int = 10
    """Stop the run after this many optimiser steps in a row were skipped for a non-finite loss,
    gradient norm, advantage or log-prob (nothing of them is applied); 0: never stop."""

    def __post_init__(self) -> None:
        for name in ("verifier_workers", "max_skipped_steps"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"--{name.replace('_', '-')}: expected an int >= 0, got {v!r}")
        for name in ("verifier_timeout", "verifier_batch_timeout"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                raise ValueError(f"--{name.replace('_', '-')}: must be > 0 seconds, got {v!r}")
        if self.reward_errors not in REWARD_ERRORS:
            raise ValueError(f"--reward-errors: expected raise or zero, got {self.reward_errors!r}")



# -- non-finite steps ------------------------------------------------------------------------
def finite(*values) -> bool:
    """Whether every tensor entry / number given is finite (None is skipped)."""
    for v in values:
        if v is None:
            continue
        if isinstance(v, torch.Tensor):
            if v.numel() and not bool(torch.isfinite(v).all()):
                return False
        elif not math.isfinite(float(v)):
            return False
    return True


def _state_finite(state) -> bool:
    if isinstance(state, dict):
        return all(_state_finite(v) for v in state.values())
    if isinstance(state, (list, tuple)):
        return all(_state_finite(v) for v in state)
    if isinstance(state, float):
        return math.isfinite(state)
    return True


class StepGuard:
    """The controller's state around one training step, and the run of skipped optimiser
    steps (``skipped_in_a_row``; checkpointed with the trainer state)."""

    def __init__(self, max_skipped: int):
        self.max_skipped = max_skipped
        self.skipped_in_a_row = 0
        self._snapshot: dict | None = None

    def begin(self, controller) -> None:
        self._snapshot = copy.deepcopy(controller.state_dict())

    def record(self, applied: bool) -> None:
        """One optimiser step: applied, or skipped for a non-finite loss / gradient norm."""
        self.skipped_in_a_row = 0 if applied else self.skipped_in_a_row + 1

    def end(self, controller, applied_steps: int) -> bool:
        """Restore the controller when the step applied no optimiser step or left it
        non-finite; returns whether it was restored."""
        restore = applied_steps == 0 or not _state_finite(controller.state_dict())
        if restore and self._snapshot is not None:
            controller.load_state_dict(self._snapshot)
        self._snapshot = None
        return restore

    def check(self, step: int, last_checkpoint: str | None) -> None:
        """Raise ``TrainingDiverged`` once ``max_skipped`` optimiser steps in a row were skipped."""
        if self.max_skipped and self.skipped_in_a_row >= self.max_skipped:
            where = f"the last good checkpoint is {last_checkpoint}" if last_checkpoint else "no checkpoint was written"
            raise TrainingDiverged(
                f"{self.skipped_in_a_row} optimiser steps in a row were skipped for non-finite values (loss, "
                f"gradient norm, advantages or log-probs; --max-skipped-steps {self.max_skipped}), the last at "
                f"step {step}; none of them was applied "
                f"and {where}. Lower --lr or --grad-clip, check the reward and the data, then continue with "
                f"--resume auto (or raise --max-skipped-steps).")


# -- how a run ended -------------------------------------------------------------------------
_DIST_ERROR = re.compile(r"gloo|nccl|c10d|monitoredBarrier|connection (closed|reset) by peer|broken pipe", re.I)
"""A collective failed: a backend names itself; a reward or verifier timeout does not match."""


def _dist_failure(exc: BaseException) -> bool:
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized()):
        return False
    return isinstance(exc, getattr(dist, "DistError", ())) or (
        isinstance(exc, RuntimeError) and bool(_DIST_ERROR.search(str(exc))))


def exit_status(exc: BaseException, *, out_dir: str | None = None, dist_timeout: float | None = None):
    """``(status, message)`` for an exception that ended a run, or None for an unexpected
    one (re-raise it: the traceback is the message)."""
    if isinstance(exc, AgpoError) and not isinstance(exc, CheckpointWriteError):
        return exc.exit_status, str(exc)
    if isinstance(exc, ValueError) and str(exc).startswith("--"):  # a bad flag value found while building the run
        return EXIT_USAGE, str(exc)
    if _dist_failure(exc):  # (also when it surfaced while a checkpoint was written)
        import torch.distributed as dist
        last = last_checkpoint_name(out_dir) if out_dir else None
        first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
        return EXIT_RANK_LOST, (
            f"rank {dist.get_rank()} lost contact with the other ranks ({type(exc).__name__}: {first}). "
            f"Another rank died (see its log / torchrun's failure summary) or did not answer for "
            f"--dist-timeout ({dist_timeout} s). "
            + (f"The last complete checkpoint is {last}" if last else "No checkpoint was written yet")
            + "; continue with --resume auto.")
    if isinstance(exc, CheckpointWriteError):  # after the collective check: a dead rank can surface as one
        return exc.exit_status, str(exc)
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        return EXIT_CHECKPOINT_WRITE, f"{exc} (the disk is full; free space, then continue with --resume auto)"
    return None


def last_checkpoint_name(out_dir: str | Path) -> str | None:
    """The newest complete checkpoint of a run directory (for messages), or None."""
    found = list_checkpoints(out_dir)
    return str(found[-1][1]) if found else None
