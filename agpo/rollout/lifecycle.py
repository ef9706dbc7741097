"""The lifecycle of a colocated engine that holds its own copy of the weights (vLLM), as
a small state machine whose transitions are recorded.

A colocated engine shares each GPU with the trainer. It must hold memory only while it
samples, and it must never be woken while PyTorch's caching allocator still keeps the
trainer's freed blocks: vLLM maps its weights and KV cache with the CUDA driver directly
(``cuMemCreate``), outside that allocator, so PyTorch's "free the cache and retry" never
runs for it and the wake runs out of memory (TRL and verl empty the cache before every
wake and after every weight load for this reason). The rules, in one place:

- **built asleep**: right after construction the engine sleeps (its dummy weights and KV
  cache freed at level 2), so the evaluation before RL and the first scoring run beside
  nothing;
- **woken for each rollout phase and for evaluation**: ``ready(version)``: release the
  cache, wake the weights, load the policy's weights if the engine does not hold
  ``version`` (always after a level-2 sleep), release the cache again (the load's
  gathered transients), wake the KV cache, reset the prefix cache when weights were
  loaded (KV blocks of the old weights must not be reused);
- **asleep during scoring and the update**: ``idle()`` after a step's last rollout and
  after an evaluation (level 1: weights offloaded to host memory; level 2: discarded).

Sleep level 0 keeps the engine resident: no sleep, no wake, still a cache release and a
prefix-cache reset after every load. ``events`` lists every transition in order
(``sleep``, ``release_cache``, ``wake:weights``, ``load_weights``, ``wake:kv_cache``,
``reset_prefix_cache``, ``generate``) for tests and logs; ``agpo.rollout.vllm`` drives a
real engine through it, any object with the four backend methods can be driven the same
way (tests/test_engine_lifecycle.py).
"""

from __future__ import annotations

import gc
import logging
from typing import Callable, Protocol

import torch

log = logging.getLogger(__name__)


def release_cached_memory() -> bool:
    """Return PyTorch's cached, unused CUDA blocks to the driver (after a ``gc.collect``
    for tensors only cycles still hold); True when there was a CUDA cache to empty. A
    no-op on machines without an initialised CUDA context."""
    gc.collect()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        return True
    return False


class EngineBackend(Protocol):
    """What the lifecycle drives (``vllm.LLM`` has these, ``load_weights`` aside)."""

    def sleep(self, level: int) -> None: ...
    def wake_up(self, tags: list[str]) -> None: ...
    def load_weights(self) -> None: ...
    def reset_prefix_cache(self) -> None: ...


class EngineLifecycle:
    """States ``awake`` and ``asleep``; the engine's weights version (None: none loaded).
    ``release``: what frees the trainer's cached memory (default ``release_cached_memory``)."""

    MAX_EVENTS = 10_000

    def __init__(self, backend: EngineBackend, *, sleep_level: int, release: Callable[[], object] | None = None):
        if sleep_level not in (0, 1, 2):
            raise ValueError(f"--vllm-sleep-level: expected 0, 1 or 2, got {sleep_level}")
        self.backend, self.sleep_level, self._release = backend, sleep_level, release
        self.state = "awake"            # as constructed
        self.synced: int | None = None  # dummy weights
        self.loads = 0
        self.events: list[str] = []

    # -- bookkeeping ---------------------------------------------------------------------
    def _record(self, event: str) -> None:
        self.events.append(event)
        if len(self.events) > self.MAX_EVENTS:  # a long run: keep the recent history
            del self.events[: len(self.events) - self.MAX_EVENTS // 2]
        log.debug("engine: %s", event)

    def release(self) -> None:
        self._record("release_cache")
        (self._release or release_cached_memory)()

    @property
    def asleep(self) -> bool:
        return self.state == "asleep"

    # -- transitions ---------------------------------------------------------------------
    def start(self) -> None:
        """Right after construction: to sleep (sleep level 0: stay resident)."""
        self.idle()

    def idle(self) -> None:
        """No sampling until the next ``ready``: sleep (level 1 or 2); a no-op at level 0
        or when already asleep."""
        if self.sleep_level == 0 or self.asleep:
            return
        self._record(f"sleep:{self.sleep_level}")
        self.backend.sleep(self.sleep_level)
        self.state = "asleep"
        if self.sleep_level == 2:
            self.synced = None  # discarded: the next ready() loads them again

    def ready(self, version: int) -> bool:
        """Awake and holding weights ``version``; True when they were loaded now."""
        was_asleep = self.asleep
        if was_asleep:
            self.release()
            self._record("wake:weights")
            self.backend.wake_up(["weights"])
        loaded = self.synced != version
        if loaded:
            self._record("load_weights")
            self.backend.load_weights()
            self.synced = version
            self.loads += 1
            self.release()
        if was_asleep:
            if not loaded:  # just released after the load otherwise
                self.release()
            self._record("wake:kv_cache")
            self.backend.wake_up(["kv_cache"])
            self.state = "awake"
        if loaded:
            self._record("reset_prefix_cache")
            self.backend.reset_prefix_cache()
        return loaded

    def generate(self, fn: Callable[[], object]):
        """``fn()`` (the engine's generate call), which needs the engine awake."""
        if self.asleep:
            raise RuntimeError("engine lifecycle: generate while asleep (call ready() first)")
        self._record("generate")
        return fn()
