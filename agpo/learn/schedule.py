"""Where a run is in its data and its learning-rate schedule: the shuffled prompt order
(checkpointed, so a resumed run draws the same prompts) and the LR multiplier per
optimiser step."""

from __future__ import annotations

import math
import random

from agpo.tasks.data import Problem


class PromptSampler:
    """Shuffled passes over the train problems; its position is checkpointed."""

    def __init__(self, problems: list[Problem], seed: int):
        if not problems:
            raise ValueError("train problems: empty")
        self.problems, self.seed, self.epoch, self.pos = problems, seed, 0, 0
        self._order = self._permutation()

    def _permutation(self) -> list[int]:
        order = list(range(len(self.problems)))
        random.Random(f"agpo-prompts-{self.seed}-{self.epoch}").shuffle(order)
        return order

    def next(self, n: int) -> list[Problem]:
        out = []
        while len(out) < n:
            if self.pos == len(self._order):
                self.epoch, self.pos = self.epoch + 1, 0
                self._order = self._permutation()
            out.append(self.problems[self._order[self.pos]])
            self.pos += 1
        return out

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.pos = int(state["epoch"]), int(state["pos"])
        self._order = self._permutation()


def lr_lambda(total: int, warmup_ratio: float, schedule: str, min_ratio: float):
    """LR multiplier per optimiser step: linear warm-up, then constant / linear / cosine."""
    warm = int(round(total * warmup_ratio))

    def f(i: int) -> float:
        if i < warm:
            return (i + 1) / warm
        if schedule == "constant":
            return 1.0
        frac = min(1.0, (i - warm) / max(1, total - warm))
        if schedule == "linear":
            return 1.0 - (1.0 - min_ratio) * frac
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * frac))
    return f
