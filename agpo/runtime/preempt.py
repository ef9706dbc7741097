"""Preemption: SIGTERM / SIGUSR1 finish the current step, checkpoint, and exit 75.

Schedulers preempt with a signal and a grace period: SLURM sends SIGTERM (and, with
``--signal=USR1@SECONDS``, SIGUSR1 that long before the time limit), Kubernetes sends
SIGTERM to the container's first process and SIGKILL ``terminationGracePeriodSeconds``
later, torchrun forwards the SIGTERM it receives to its workers (and SIGKILLs them 30 s
later). ``Preemption`` turns these signals into a request that the training loop reads
once per step; the handler itself only records the signal (nothing else is safe inside a
handler in the middle of a step).

Under torchrun the signal may reach only some ranks (one node of several is preempted,
or one worker is signalled by hand). ``Preemption.agreed(env)`` sums the per-rank flags
in one small all-reduce per step, so every rank sees the same answer after the same step
and all of them take the collective checkpoint together. A process that stops for a
signal ignores these signals from then on, and so does one that leaves with an error
status under torchrun (``ignore_preemption``): torchrun SIGTERMs the other workers as
soon as one exits, and they are already leaving with their checkpoint and status (the
interpreter resets a Python handler while it shuts down; SIG_IGN it keeps). Other
signals keep their default behaviour (SIGINT: KeyboardInterrupt, no checkpoint).
"""

from __future__ import annotations

import os
import signal
import threading

from agpo.scale.distributed import DistEnv, all_reduce_sum

SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGUSR1") if hasattr(signal, name))
"""The signals that request a checkpoint-and-exit."""


def ignore_preemption() -> None:
    """Ignore SIGTERM / SIGUSR1 from now on (main thread only): the process is leaving with
    its exit status, which a late signal would otherwise replace."""
    if threading.current_thread() is threading.main_thread():
        for sig in SIGNALS:
            signal.signal(sig, signal.SIG_IGN)


class Preemption:
    """Records SIGTERM / SIGUSR1 while active (a context manager; handlers are installed
    from the main thread only, and the previous ones restored on exit)."""

    def __init__(self):
        self.received: dict[str, int] = {}  # signal name -> times received on this rank
        self.stopping = False  # a stop was agreed: the process is on its way out
        self._previous: dict[int, object] = {}

    def __enter__(self) -> "Preemption":
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, old in self._previous.items():
            signal.signal(sig, signal.SIG_IGN if self.stopping else old)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        self.received[name] = self.received.get(name, 0) + 1
        note = ("already stopping" if self.stopping else
                "finishing this step, then checkpointing and exiting (status 75; continue with --resume auto)")
        try:  # os.write: print() is not safe inside a handler that may interrupt a print
            os.write(2, f"\nagpo: got {name}: {note}\n".encode())
        except OSError:
            pass

    def agreed(self, env: DistEnv) -> dict[str, int]:
        """How many ranks received each signal (empty: carry on). Collective under torchrun:
        every rank calls it once per step, at the same point."""
        flags = {f"{name}": float(name in self.received) for name in (s.name for s in SIGNALS)}
        counts = {name: int(round(n)) for name, n in all_reduce_sum(flags, env).items() if n > 0}
        self.stopping = bool(counts)
        return counts


def describe(counts: dict[str, int], env: DistEnv) -> str:
    """"SIGTERM on 1 of 2 ranks" (or "SIGTERM" in a single process)."""
    parts = []
    for name, n in sorted(counts.items()):
        parts.append(name if not env.distributed else f"{name} on {n} of {env.world_size} rank(s)")
    return ", ".join(parts)
