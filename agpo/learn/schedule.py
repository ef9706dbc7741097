"""Where a run is in its data and its learning-rate schedule: the shuffled prompt order
(checkpointed, so a resumed run draws the same prompts), the LR multiplier per
optimiser step, and a run sized by ``--token-budget``: its LR clock and its stop rule
(``TokenBudgetSchedule``, the trainer's part that applies them)."""

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


def _after_warmup(frac: float, schedule: str, min_ratio: float) -> float:
    """The multiplier ``frac`` of the way from the end of the warm-up to the end of the run."""
    if schedule == "constant":
        return 1.0
    frac = min(1.0, max(0.0, frac))
    if schedule == "linear":
        return 1.0 - (1.0 - min_ratio) * frac
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * frac))


def lr_lambda(total: int, warmup_ratio: float, schedule: str, min_ratio: float):
    """LR multiplier per optimiser step: linear warm-up, then constant / linear / cosine."""
    warm = int(round(total * warmup_ratio))

    def f(i: int) -> float:
        if i < warm:
            return (i + 1) / warm
        return _after_warmup((i - warm) / max(1, total - warm), schedule, min_ratio)
    return f


def budget_lr(spent: float, step_share: float, warmup_ratio: float, schedule: str, min_ratio: float) -> float:
    """LR multiplier of an optimiser step of a run sized by a token budget: the schedule's
    clock is the share of the budget generated (``spent`` when the optimiser step starts,
    ``step_share`` per optimiser step), so a run that stops at its budget ends its schedule
    there, however many steps that took. The warm-up is the first ``warmup_ratio`` of the
    budget (its first optimiser step at ``step_share / warmup_ratio``, never 0)."""
    if spent < warmup_ratio:
        return min(1.0, (spent + step_share) / warmup_ratio)
    return _after_warmup((spent - warmup_ratio) / max(1e-12, 1.0 - warmup_ratio), schedule, min_ratio)


def budget_allows(spent: int, last_step: int, budget: int) -> bool:
    """Whether a run with ``budget`` generated tokens takes another step, having generated
    ``spent`` so far and ``last_step`` in its last step (0 before the first): it stops at the
    step boundary nearest the budget, so a run of any algorithm ends within half a step of
    its own kind of the budget (the last step's size standing in for the next one's), and
    never passes it by more than one step."""
    if spent >= budget:
        return False
    return spent + last_step / 2 <= budget


class TokenBudgetSchedule:
    """The learning rate of the trainer's optimiser steps (``optim/lr``), set from the share of
    ``--token-budget`` generated when a run has one, and the budget's stop rule (a ``Trainer``
    mixin: it uses the trainer's config, optimiser, scheduler, ``tokens_generated``,
    ``last_step_tokens`` and ``budget_lr``)."""

    def _lr(self) -> float:
        """The learning rate of the last optimiser step (under a token budget) or of the next."""
        if self.cfg.run.token_budget and self.budget_lr is not None:
            return self.budget_lr
        return self.scheduler.get_last_lr()[0]

    def _set_budget_lr(self, epoch: int) -> None:
        """Each parameter group's LR for optimiser step ``epoch`` of this step, from the share
        of ``--token-budget`` generated when it starts (this step's tokens spread evenly over
        its epochs)."""
        o, budget, E = self.cfg.optim, self.cfg.run.token_budget, self.cfg.optim.update_epochs
        share = self.last_step_tokens / E / budget
        spent = self.tokens_generated / budget + epoch * share
        mult = budget_lr(spent, share, o.warmup_ratio, o.schedule, o.min_lr_ratio)
        for g in self.optimizer.param_groups:
            g["lr"] = g["initial_lr"] * mult
        self.budget_lr = self.optimizer.param_groups[0]["lr"]

    def budget_allows_step(self) -> bool:
        """Whether ``--token-budget`` (if any) leaves room for another step (``budget_allows``)."""
        budget = self.cfg.run.token_budget
        return not budget or budget_allows(self.tokens_generated, self.last_step_tokens, budget)
