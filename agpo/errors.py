"""The errors that end a run, each carrying the exit status it ends the run with.

Every module raises its errors from here, so mapping an exception to an exit status
(``agpo.runtime.guard.exit_status``) needs no import of the module that raised it.
The statuses are documented in docs/operations.md. Imports nothing of the package.
"""

from __future__ import annotations

EXIT_OK = 0
"""Finished (or stopped by --stop-after / --token-budget)."""
EXIT_ERROR = 1
"""An unexpected error (a traceback is printed); also a reward function that raised."""
EXIT_USAGE = 2
"""A bad flag, data file, model path, or an unreadable / incompatible checkpoint."""
EXIT_DIVERGED = 3
"""--max-skipped-steps optimiser steps in a row had a non-finite loss or gradient norm."""
EXIT_RANK_LOST = 69
"""Under torchrun: another rank died or stopped answering (collectives give up after --dist-timeout)."""
EXIT_CHECKPOINT_WRITE = 74
"""A checkpoint (or another run file) could not be written (disk full, ...); the previous checkpoint is intact."""
EXIT_PREEMPTED = 75
"""SIGTERM / SIGUSR1: the current step was finished and checkpointed; continue with --resume auto."""

class AgpoError(Exception):
    """Base of the errors that end a run with a known status; the message says what to do."""

    exit_status = EXIT_ERROR


class UsageError(AgpoError):
    """Something the user gave cannot be used; the message names it and the fix."""

    exit_status = EXIT_USAGE


class ConfigError(UsageError, ValueError):
    """A bad configuration value; the message names the flag and the fix."""


class DataError(UsageError, ValueError):
    """A data source is missing, malformed or empty; the message names file and line."""


class ModelNotFoundError(UsageError, FileNotFoundError):
    """The weights are neither on disk nor downloadable; the message says what to do."""


class CheckpointError(UsageError, RuntimeError):
    """A checkpoint cannot be found, read or continued with this config."""


class LigerError(UsageError, RuntimeError):
    """Liger cannot be applied as asked; the message says why and what to do."""


class CheckpointWriteError(AgpoError, RuntimeError):
    """A checkpoint could not be written (disk full, ...); the previous ones are untouched."""

    exit_status = EXIT_CHECKPOINT_WRITE


class TrainingDiverged(AgpoError, RuntimeError):
    """Too many optimiser steps in a row were non-finite (``--max-skipped-steps``)."""

    exit_status = EXIT_DIVERGED
