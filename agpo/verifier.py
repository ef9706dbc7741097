"""Symbolic answer equivalence with ``math-verify``, under a deadline that works in any thread.

``math-verify`` bounds its own parse/compare time with ``signal.alarm``, which only works
in the main thread and cannot interrupt a run-away sympy computation anywhere else. Here
its own timeouts are switched off and every comparison runs in a small worker *process*
(this file, run as a script) that the caller waits on with a deadline; a worker that
misses the deadline is killed and restarted on the next call. The caller can be any
thread; calls are serialised by a lock.

``MathVerifier.equivalent(gold, pred)`` returns True / False, or None when no verdict
could be had (timeout, worker error, ``math-verify`` not installed); every such failure is
counted in ``MathVerifier.stats`` (``VerifierStats``), never dropped silently. The rewards
(``agpo.rewards``) turn None into a score of 0.

The worker speaks JSON lines: the parent writes ``{"id", "gold", "pred"}``, the worker
answers ``{"id", "ok"}`` or ``{"id", "error"}``; it announces itself with ``{"ready": ...}``.
Nothing from the agpo package is imported at module level, so the file runs as a script.
"""

from __future__ import annotations

import atexit
import importlib.util
import json
import os
import queue
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field, fields

STARTUP_TIMEOUT_S = 60.0  # importing sympy + math-verify in a fresh interpreter


@dataclass(kw_only=True)
class VerifierStats:
    """Counters of one verifier (read them with ``snapshot()``; they only grow)."""

    calls: int = 0
    """Comparisons asked of math-verify."""
    equal: int = 0
    """Comparisons it judged equivalent."""
    timeouts: int = 0
    """Comparisons that missed the deadline (scored 0; the worker was restarted)."""
    errors: int = 0
    """Comparisons that raised inside math-verify or broke the worker (scored 0)."""
    unavailable: int = 0
    """Comparisons skipped because math-verify is not installed or its worker cannot start."""
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, name: str, n: int = 1) -> None:
        with self._lock:
            setattr(self, name, getattr(self, name) + n)

    def snapshot(self) -> dict[str, int]:
        """The counters as a plain dict (``failures`` = timeouts + errors + unavailable)."""
        with self._lock:
            out = {f.name: getattr(self, f.name) for f in fields(self) if not f.name.startswith("_")}
        out["failures"] = out["timeouts"] + out["errors"] + out["unavailable"]
        return out


def math_verify_installed() -> bool:
    return importlib.util.find_spec("math_verify") is not None


class MathVerifier:
    """Runs ``math_verify.parse`` + ``verify`` in a killable worker process with a deadline."""

    def __init__(self, timeout: float = 5.0):
        if not timeout > 0:
            raise ValueError(f"timeout: must be > 0 seconds, got {timeout}")
        self.timeout = float(timeout)
        self.stats = VerifierStats()
        self._lock = threading.Lock()
        self._proc: subprocess.Popen | None = None
        self._lines: queue.Queue | None = None
        self._next_id = 0
        self._broken: str | None = None  # why the worker cannot start; set once
        atexit.register(self.close)

    # -- worker management -------------------------------------------------------------
    def _start(self) -> None:
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        proc = subprocess.Popen([sys.executable, os.path.abspath(__file__)], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                                encoding="utf-8", env=env)
        lines: queue.Queue = queue.Queue()

        def pump(stream, q):
            for line in stream:
                q.put(line)
            q.put(None)

        threading.Thread(target=pump, args=(proc.stdout, lines), daemon=True).start()
        self._proc, self._lines = proc, lines
        ready = self._read(lambda msg: "ready" in msg, STARTUP_TIMEOUT_S)
        if ready is None or not ready.get("ready"):
            why = (ready or {}).get("error", "it did not start in time")
            self._kill()
            self._broken = f"math-verify worker unavailable: {why}"

    def _kill(self) -> None:
        proc, self._proc, self._lines = self._proc, None, None
        if proc is not None:
            proc.kill()
            proc.wait()
            for stream in (proc.stdin, proc.stdout):
                try:
                    stream.close()
                except OSError:
                    pass

    def _read(self, accept, timeout: float) -> dict | None:
        """Next worker message satisfying ``accept`` within ``timeout`` s; None on deadline."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            try:
                line = self._lines.get(timeout=left)
            except queue.Empty:
                return None
            if line is None:  # the worker died
                return {"error": "worker exited"}
            try:
                msg = json.loads(line)
            except ValueError:
                continue  # stray output
            if isinstance(msg, dict) and accept(msg):
                return msg

    def close(self) -> None:
        """Stop the worker (it restarts on the next call)."""
        with self._lock:
            self._kill()

    # -- the call ----------------------------------------------------------------------
    def equivalent(self, gold: str, pred: str) -> bool | None:
        """math-verify's verdict on ``pred`` against ``gold`` (bare answers, no ``\\boxed``);
        None when it could not give one (counted in ``stats``)."""
        if self._broken is None and not math_verify_installed():
            self._broken = "math-verify is not installed (pip install math-verify)"
        if self._broken is not None:
            self.stats.add("unavailable")
            return None
        with self._lock:
            if self._proc is None or self._proc.poll() is not None:
                self._kill()
                self._start()
                if self._broken is not None:
                    self.stats.add("unavailable")
                    return None
            self._next_id += 1
            rid = self._next_id
            self.stats.add("calls")
            try:
                self._proc.stdin.write(json.dumps({"id": rid, "gold": gold, "pred": pred}) + "\n")
                self._proc.stdin.flush()
            except OSError:
                self._kill()
                self.stats.add("errors")
                return None
            msg = self._read(lambda m: m.get("id") == rid or "id" not in m, self.timeout)
            if msg is None:
                self._kill()
                self.stats.add("timeouts")
                return None
            if "ok" not in msg:
                if msg.get("error") == "worker exited":
                    self._kill()
                self.stats.add("errors")
                return None
            if msg["ok"]:
                self.stats.add("equal")
            return bool(msg["ok"])


# -- the worker (this file run as a script) ----------------------------------------------
def _serve() -> None:
    import logging
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
    send({"ready": True})
    for line in sys.stdin:
        try:
            req = json.loads(line)
        except ValueError:
            continue
        try:
            gold = parse("\\boxed{" + req["gold"] + "}", parsing_timeout=None, raise_on_error=True)
            pred = parse("\\boxed{" + req["pred"] + "}", parsing_timeout=None, raise_on_error=True)
            ok = bool(gold) and bool(pred) and verify(gold, pred, timeout_seconds=None, raise_on_error=True)
            send({"id": req["id"], "ok": bool(ok)})
        except Exception as e:  # noqa: BLE001 - reported to the parent
            send({"id": req.get("id"), "error": f"{type(e).__name__}: {str(e)[:200]}"})


if __name__ == "__main__":
    _serve()
