"""The held-out evaluation of a training run: greedy accuracy of the current policy, each
rank a block of the problems, through the rollout engine when it holds its own weights.
"""

from __future__ import annotations

from agpo.tasks.data import Problem
from agpo.tasks.evaluate import evaluate


def evaluate_held_out(trainer, problems: list[Problem]) -> dict:
    """Greedy held-out accuracy of ``trainer``'s policy (``agpo.tasks.evaluate.evaluate``), each
    rank a block of problems.

    With an engine that holds its own weights (vLLM) the completions come from it: woken,
    synced to the current weights, put back to sleep afterwards; the policy is never
    gathered beside it (``agpo.rollout.lifecycle``). Otherwise HF ``generate`` on the
    gathered policy (ranks may make different numbers of calls), with any engine asleep."""
    cfg = trainer.cfg
    batch_size = cfg.rollout.generation_batch_size or 64
    n, world, rank = len(problems), trainer.env.world_size, trainer.env.rank
    mine = problems[rank * n // world:(rank + 1) * n // world]
    cap = cfg.run.eval_max_new_tokens or cfg.rollout.max_new_tokens
    if trainer.engine.holds_weights:
        def complete(prompts, **kw):
            return trainer.engine.complete(prompts, weights_version=trainer.weights_version, **kw)

        try:
            if mine:
                s = evaluate(None, trainer.tokenizer, mine, max_new_tokens=cap, seed=cfg.run.seed, progress=False,
                             generate=complete)["summary"]
            else:  # the engine call is collective: every rank makes it
                s = None
                complete([], max_new_tokens=cap)
        finally:
            trainer.engine.idle()
    else:
        trainer.engine.idle()
        with trainer.layout.generation() as model:
            s = evaluate(model, trainer.tokenizer, mine, max_new_tokens=cap, batch_size=batch_size,
                         seed=cfg.run.seed, progress=False)["summary"] if mine else None
    if not trainer.env.distributed:
        return s
    parts = [q for q in trainer._gather(s) if q is not None]
    total = sum(q["n"] for q in parts)
    tokens = sum(q["generated_tokens"] for q in parts)
    acc = sum(q["accuracy"] * q["n"] for q in parts) / total
    return {**parts[0], "n": total, "accuracy": acc, "pass@1": acc,
            "no_answer_rate": sum(q["no_answer_rate"] * q["n"] for q in parts) / total,
            "mean_completion_tokens": tokens / total, "generated_tokens": tokens,
            "generation_s": max(q["generation_s"] for q in parts),
            "verifier": {k: sum(q["verifier"][k] for q in parts) for k in parts[0]["verifier"]}}
