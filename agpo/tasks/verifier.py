"""Symbolic answer equivalence with ``math-verify`` in a pool of worker processes, under deadlines.

Completions are untrusted: a model's answer can send sympy into a computation that never
ends (a power tower, a factorial of a huge number) or eats memory. ``math-verify``'s own
timeouts use ``signal.alarm`` and only work in the main thread, so here they are switched
off and every comparison runs in a small pool of worker *processes* (this file, run as a
script), with two deadlines:

- **per comparison** (``timeout``): the worker arms ``setitimer`` and abandons the
  comparison when it fires (reported as a timeout; the worker stays up). A worker that
  still has not answered ``hard_grace`` seconds later (stuck in C code) is killed and a
  new one started in the background.
- **per batch** (``batch_timeout``): ``verify_many`` returns by then whatever happens;
  comparisons not finished count as timeouts (a worker still on one finishes it under its
  own deadline; its late answer is ignored).

``MathVerifier.verify_many(pairs)`` spreads ``(gold, pred)`` pairs over the workers and
returns ``True`` / ``False`` per pair, or ``None`` where no verdict could be had (timeout,
worker error, ``math-verify`` not installed, input over ``max_chars``). Every such failure
is counted in ``MathVerifier.stats`` (``VerifierStats``), never dropped silently; the
rewards (``agpo.tasks.rewards``) score ``None`` as 0. ``equivalent(gold, pred)`` is the one-pair
form; inside ``with verifier.primed(pairs):`` it answers from one batched call (the
trainer's rewards are scored that way: one ``verify_many`` per phase). Safe in any thread
(calls are serialised by a lock).

Workers ignore SIGINT/SIGTERM/SIGUSR1/SIGHUP (a scheduler's preemption signal is for the
trainer, which keeps scoring until its step ends), exit when the parent goes away, and
run under an address-space limit (``MEMORY_LIMIT_BYTES``): a computation that needs more
fails with MemoryError (an error, scored 0) instead of taking the machine down.

Protocol (JSON lines): the parent writes ``{"id", "gold", "pred", "timeout"}``; the worker
answers ``{"id", "ok"}``, ``{"id", "timeout": true}`` or ``{"id", "error"}``, and
announces itself with ``{"ready": ...}``. Nothing from the agpo package is imported at
module level, so the file runs as a script.
"""

from __future__ import annotations

import atexit
import collections
import contextlib
import importlib.util
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field, fields

STARTUP_TIMEOUT_S = 60.0  # importing sympy + math-verify in a fresh interpreter (a loaded machine)
MEMORY_LIMIT_BYTES = 4 << 30  # RLIMIT_AS of a worker: sympy on a huge integer fails instead of swapping
MAX_CHARS = 10_000  # longer answers are never sent to a worker (agpo.tasks.rewards cuts far earlier)
_STARTUP_FAILURES = 3  # consecutive workers that die before "ready": math-verify is unusable


def default_workers() -> int:
    """Workers per process: a quarter of the cores this rank may use, at least 2, at most 8
    (cores from the CPU affinity mask, shared among ``LOCAL_WORLD_SIZE`` ranks under torchrun)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    ranks = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))
    return max(2, min(8, cores // ranks // 4))


@dataclass(kw_only=True)
class VerifierStats:
    """Counters of one verifier (read them with ``snapshot()``; they only grow)."""

    calls: int = 0
    """Comparisons asked of math-verify."""
    equal: int = 0
    """Comparisons it judged equivalent."""
    timeouts: int = 0
    """Comparisons that missed the per-comparison or the batch deadline (scored 0)."""
    errors: int = 0
    """Comparisons that raised inside math-verify or broke their worker (scored 0)."""
    unavailable: int = 0
    """Comparisons skipped because math-verify is not installed or its workers cannot start."""
    oversized: int = 0
    """Answers over the size / nesting limits, never parsed (scored 0; counted by agpo.tasks.rewards)."""
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, name: str, n: int = 1) -> None:
        with self._lock:
            setattr(self, name, getattr(self, name) + n)

    def snapshot(self) -> dict[str, int]:
        """The counters as a plain dict (``failures`` = timeouts + errors + unavailable + oversized)."""
        with self._lock:
            out = {f.name: getattr(self, f.name) for f in fields(self) if not f.name.startswith("_")}
        out["failures"] = out["timeouts"] + out["errors"] + out["unavailable"] + out["oversized"]
        return out


def math_verify_installed() -> bool:
    return importlib.util.find_spec("math_verify") is not None


class _Worker:
    """One worker process, its reader thread and what it is doing."""

    def __init__(self, wid: int, events: queue.Queue):
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.wid = wid
        self.proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), str(os.getpid())],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                     text=True, encoding="utf-8", env=env)
        self.ready = False
        self.started = time.monotonic()
        self.job: int | None = None  # request id of the comparison it works on (maybe an earlier batch's)
        self.hard_deadline = 0.0

        def pump(stream, q, wid):
            try:
                for line in stream:
                    q.put((wid, line))
            except (OSError, ValueError):
                pass
            q.put((wid, None))

        threading.Thread(target=pump, args=(self.proc.stdout, events, wid), daemon=True).start()

    def send(self, msg: dict) -> bool:
        try:
            self.proc.stdin.write(json.dumps(msg) + "\n")
            self.proc.stdin.flush()
            return True
        except (OSError, ValueError):
            return False

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()
        for stream in (self.proc.stdin, self.proc.stdout):
            try:
                stream.close()
            except (OSError, ValueError):
                pass


class MathVerifier:
    """``math_verify.parse`` + ``verify`` in a pool of killable workers with deadlines."""

    def __init__(self, timeout: float = 5.0, *, workers: int | None = None, batch_timeout: float = 60.0,
                 grace: float | None = None, max_chars: int = MAX_CHARS):
        self.stats = VerifierStats()
        self._lock = threading.Lock()
        self._pool: dict[int, _Worker] = {}
        self._events: queue.Queue = queue.Queue()
        self._next_wid = 0
        self._next_rid = 0
        self._batch: dict[int, int] = {}  # request id -> index, for the current batch
        self._startup_failures = 0
        self._broken: str | None = None  # why math-verify cannot be used; set once
        self._primed: dict[tuple[str, str], bool | None] = {}
        self.max_chars = max_chars
        self.configure(timeout=timeout, workers=workers, batch_timeout=batch_timeout, grace=grace)
        atexit.register(self.close)

    def configure(self, *, timeout: float | None = None, workers: int | None = None,
                  batch_timeout: float | None = None, grace: float | None = None) -> "MathVerifier":
        """Change the deadlines / pool size (``workers`` None or 0: ``default_workers()``).
        Running workers are kept (extra ones stop)."""
        for name, v in (("timeout", timeout), ("batch_timeout", batch_timeout)):
            if v is not None and not v > 0:
                raise ValueError(f"{name}: must be > 0 seconds, got {v}")
        if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 0):
            raise ValueError(f"workers: expected an int >= 0 (0: from the cores), got {workers!r}")
        if timeout is not None:
            self.timeout = float(timeout)
        if batch_timeout is not None:
            self.batch_timeout = float(batch_timeout)
        if grace is not None or not hasattr(self, "grace"):
            self.grace = float(grace) if grace is not None else None
        if workers is not None or not hasattr(self, "workers"):
            self.workers = workers or default_workers()
            with self._lock:
                for wid in sorted(self._pool)[self.workers:]:
                    self._pool.pop(wid).kill()
        return self

    @property
    def hard_grace(self) -> float:
        """Seconds after the per-comparison deadline before a silent worker is killed."""
        return self.grace if self.grace is not None else max(1.0, 0.5 * self.timeout)

    # -- pool management ----------------------------------------------------------------
    def _spawn(self) -> None:
        self._next_wid += 1
        self._pool[self._next_wid] = _Worker(self._next_wid, self._events)

    def _fill(self) -> None:
        while len(self._pool) < self.workers:
            self._spawn()

    def _drop(self, w: _Worker, respawn: bool = True) -> None:
        self._pool.pop(w.wid, None)
        w.kill()
        if respawn and self._broken is None:
            self._spawn()

    def start(self, wait: bool = True) -> bool:
        """Start the workers now (they start lazily on the first call otherwise); with
        ``wait``, until all are ready or broken. Returns whether math-verify is usable."""
        if self._check_installed():
            return False
        with self._lock:
            self._fill()
            deadline = time.monotonic() + STARTUP_TIMEOUT_S
            while wait and self._broken is None and not all(w.ready for w in self._pool.values()):
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                try:
                    self._handle(*self._events.get(timeout=left), results=None)
                except queue.Empty:
                    break
        return self._broken is None

    def close(self) -> None:
        """Stop the workers (they restart on the next call)."""
        with self._lock:
            for w in list(self._pool.values()):
                w.kill()
            self._pool.clear()

    def _check_installed(self) -> bool:
        if self._broken is None and not math_verify_installed():
            self._broken = "math-verify is not installed (pip install math-verify)"
        return self._broken is not None

    # -- the calls -----------------------------------------------------------------------
    def equivalent(self, gold: str, pred: str) -> bool | None:
        """math-verify's verdict on ``pred`` against ``gold`` (bare answers, no ``\\boxed``);
        None when it could not give one (counted in ``stats``)."""
        key = (gold, pred)
        if key in self._primed:
            return self._primed[key]
        return self.verify_many([key])[0]

    @contextlib.contextmanager
    def primed(self, pairs):
        """Verify ``pairs`` in one batch now; inside the block ``equivalent`` answers them
        from the results (reward functions keep their one-row form)."""
        unique = list(dict.fromkeys(pairs))
        results = self.verify_many(unique)
        self._primed = dict(zip(unique, results))
        try:
            yield self
        finally:
            self._primed = {}

    def verify_many(self, pairs, *, batch_timeout: float | None = None) -> list[bool | None]:
        """Verdicts for ``(gold, pred)`` pairs, spread over the workers; returns within
        ``batch_timeout`` (default ``self.batch_timeout``), give or take a worker kill."""
        pairs = [(str(g), str(p)) for g, p in pairs]
        n = len(pairs)
        results: list[bool | None] = [None] * n
        if not n:
            return results
        if self._check_installed():
            self.stats.add("unavailable", n)
            return results
        self.stats.add("calls", n)
        todo = collections.deque()
        for i, (g, p) in enumerate(pairs):
            if len(g) > self.max_chars or len(p) > self.max_chars:
                self.stats.add("oversized")
            else:
                todo.append(i)
        end = time.monotonic() + (batch_timeout if batch_timeout is not None else self.batch_timeout)
        with self._lock:
            self._batch = {}
            self._fill()
            while (todo or self._in_flight()) and self._broken is None:
                self._assign(todo, pairs, results)
                now = time.monotonic()
                if now >= end:
                    break
                wake = min([end] + [w.hard_deadline for w in self._pool.values() if w.job is not None]
                           + [w.started + STARTUP_TIMEOUT_S for w in self._pool.values() if not w.ready])
                try:
                    self._handle(*self._events.get(timeout=max(0.0, wake - now)), results=results)
                except queue.Empty:
                    pass
                self._expire(time.monotonic(), results)
            left = len(todo) + len(self._in_flight())
            # the batch deadline passed: what is left counts as timed out; workers still on an
            # abandoned comparison finish it (their own deadline) and their answer is ignored
            self.stats.add("unavailable" if self._broken is not None else "timeouts", left)
            self._batch = {}
        self.stats.add("equal", sum(r is True for r in results))
        return results

    def _in_flight(self) -> list[_Worker]:
        return [w for w in self._pool.values() if w.job in self._batch]

    def _assign(self, todo, pairs, results) -> None:
        for w in list(self._pool.values()):
            if not todo:
                return
            if w.ready and w.job is None:
                i = todo.popleft()
                gold, pred = pairs[i]
                self._next_rid += 1
                if w.send({"id": self._next_rid, "gold": gold, "pred": pred, "timeout": self.timeout}):
                    w.job, w.hard_deadline = self._next_rid, time.monotonic() + self.timeout + self.hard_grace
                    self._batch[w.job] = i
                else:  # the worker died between calls: this pair is not to blame, retry it
                    todo.appendleft(i)
                    self._drop(w)

    def _expire(self, now: float, results) -> None:
        for w in list(self._pool.values()):
            if w.job is not None and now >= w.hard_deadline:
                if w.job in self._batch:
                    self.stats.add("timeouts")
                self._drop(w)
            elif not w.ready and now >= w.started + STARTUP_TIMEOUT_S:
                self._startup_failed(w, "it did not start in time")

    def _startup_failed(self, w: _Worker, why: str) -> None:
        self._startup_failures += 1
        if self._startup_failures >= _STARTUP_FAILURES:
            self._broken = f"math-verify workers cannot start: {why}"
            for other in list(self._pool.values()):
                self._drop(other, respawn=False)
        else:
            self._drop(w)

    def _handle(self, wid: int, line: str | None, *, results) -> None:
        w = self._pool.get(wid)
        if w is None:
            return  # a worker already dropped
        if line is None:  # it exited
            if not w.ready:
                self._startup_failed(w, "a worker exited while starting")
                return
            if w.job in self._batch:
                self.stats.add("errors")  # it died on this comparison (e.g. out of memory)
            self._drop(w)
            return
        try:
            msg = json.loads(line)
        except ValueError:
            return  # stray output
        if not isinstance(msg, dict):
            return
        if "ready" in msg:
            if msg["ready"]:
                w.ready, self._startup_failures = True, 0
            else:
                self._broken = f"math-verify worker unavailable: {msg.get('error')}"
                self._drop(w, respawn=False)
            return
        if w.job is None or msg.get("id") != w.job:
            return
        i, w.job = self._batch.pop(w.job, None), None
        if i is None or results is None:
            return  # the answer to an abandoned comparison of an earlier batch
        if "ok" in msg:
            results[i] = bool(msg["ok"])
        else:
            self.stats.add("timeouts" if msg.get("timeout") else "errors")


# -- the worker (this file run as a script) ----------------------------------------------
class _Deadline(BaseException):
    """Raised by the comparison's timer: a BaseException, so no ``except Exception`` inside
    sympy or math-verify swallows it."""


def _serve(parent: int) -> None:
    import logging
    for sig in ("SIGINT", "SIGTERM", "SIGUSR1", "SIGUSR2", "SIGHUP"):
        if hasattr(signal, sig):
            signal.signal(getattr(signal, sig), signal.SIG_IGN)
    try:
        import resource
        resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT_BYTES, MEMORY_LIMIT_BYTES))
    except (ImportError, ValueError, OSError):
        pass

    def orphan_watch():  # the parent was SIGKILLed: do not outlive it
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(0)

    threading.Thread(target=orphan_watch, daemon=True).start()
    out = os.fdopen(os.dup(1), "w", encoding="utf-8")
    sys.stdout = sys.stderr  # anything a library prints stays off the protocol channel
    logging.disable(logging.CRITICAL)

    def send(msg):
        out.write(json.dumps(msg) + "\n")
        out.flush()

    try:
        from math_verify import parse, verify
    except Exception as e:  # noqa: BLE001 - reported to the parent
        send({"ready": False, "error": f"{type(e).__name__}: {e}"})
        return
    armed = [False]

    def on_alarm(signum, frame):
        if armed[0]:
            raise _Deadline()

    signal.signal(signal.SIGALRM, on_alarm)
    try:  # sympy imports parts of itself on first use: pay that before the first deadline
        verify(parse("\\boxed{\\frac{1}{2}}"), parse("\\boxed{0.5}"))
    except Exception:  # noqa: BLE001
        pass
    send({"ready": True})
    for line in sys.stdin:
        try:
            req = json.loads(line)
            rid = req["id"]
        except (ValueError, KeyError, TypeError):
            continue
        reply = {"id": rid, "timeout": True}
        try:  # the outer try: the timer may also fire while an inner handler runs
            try:
                armed[0] = True
                signal.setitimer(signal.ITIMER_REAL, float(req.get("timeout", 5.0)))
                gold = parse("\\boxed{" + req["gold"] + "}", parsing_timeout=None, raise_on_error=True)
                pred = parse("\\boxed{" + req["pred"] + "}", parsing_timeout=None, raise_on_error=True)
                ok = bool(gold) and bool(pred) and verify(gold, pred, timeout_seconds=None, raise_on_error=True)
                reply = {"id": rid, "ok": bool(ok)}
            except Exception as e:  # noqa: BLE001 - reported (MemoryError, RecursionError, ...)
                reply = {"id": rid, "error": f"{type(e).__name__}: {str(e)[:200]}"}
            finally:
                armed[0] = False
                signal.setitimer(signal.ITIMER_REAL, 0)
        except _Deadline:
            pass
        send(reply)


if __name__ == "__main__":
    _serve(int(sys.argv[1]) if len(sys.argv) > 1 else os.getppid())
