"""Supervised warm-up: a few hundred steps of next-token loss on reference answers.

A randomly initialised model (the tiny preset) gets no reward at all, and RL without
reward has no signal; a short warm-up on the train split brings held-out accuracy to a
partial level that RL then lifts. With a target loss the warm-up stops once the mean loss
of its last ``TARGET_WINDOW`` steps reaches it: a seed whose model learns late gets more
steps, so every seed starts RL from about the same accuracy (a fixed step count stops the
tiny preset anywhere between 4% and 60% held-out accuracy, depending on the seed). The loss is the mean negative log-prob of the answer
tokens (the reference, then EOS), computed from hidden states by the fused
``linear_logprobs``: no logits here either.
"""

from __future__ import annotations

import random
import time

import torch

from agpo.learn.batches import SequenceBatch
from agpo.learn.policy import Policy
from agpo.tasks.data import Problem, format_prompt, uses_chat_template


def answer_text(problem: Problem) -> str:
    """The target completion: the bare reference for verbatim tasks, else a boxed answer."""
    return problem.reference if problem.verbatim else f"The answer is \\boxed{{{problem.reference}}}."


def sft_batch(tokenizer, problems: list[Problem]) -> SequenceBatch:
    """Prompt (left-padded) + reference answer and EOS (right-padded) rows."""
    chat = uses_chat_template(tokenizer)
    enc = tokenizer([format_prompt(p, tokenizer) for p in problems], return_tensors="pt", padding=True,
                    add_special_tokens=not chat)
    eos = tokenizer.eos_token_id
    answers = [tokenizer(answer_text(p), add_special_tokens=False)["input_ids"] + ([eos] if eos is not None else [])
               for p in problems]
    width = max(len(a) for a in answers)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = torch.full((len(problems), width), pad, dtype=torch.long)
    mask = torch.zeros((len(problems), width), dtype=torch.long)
    for i, a in enumerate(answers):
        ids[i, :len(a)] = torch.tensor(a)
        mask[i, :len(a)] = 1
    return SequenceBatch(prompt_ids=enc["input_ids"], prompt_mask=enc["attention_mask"], completion_ids=ids,
                         completion_mask=mask, temperature=torch.ones(len(problems)))


TARGET_WINDOW = 20
"""Warm-up steps whose mean loss is compared with the target loss."""


def supervised_warmup(policy: Policy, tokenizer, problems: list[Problem], *, steps: int, batch_size: int,
                      lr: float, seed: int = 0, progress: bool = True,
                      target_loss: float | None = None, agree=None, every: int = 0,
                      watch=None) -> dict[str, float]:
    """AdamW steps of answer-token NLL on random batches of ``problems``: ``steps`` of them,
    or fewer when ``target_loss`` is given and the mean loss of the last ``TARGET_WINDOW``
    steps falls to it first (``sft/reached_target`` says whether it did). ``agree``: under
    torchrun, a callable that makes every rank's stop decision the same (any rank's).
    ``watch``: called as ``watch(step, window_loss)`` after every ``every``-th step (a
    warm-up's curve; it may evaluate the model, whose mode it must leave as it found it)."""
    from tqdm.auto import tqdm

    model = policy.model
    device = next(model.parameters()).device
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0, betas=(0.9, 0.99))
    rng = random.Random(f"agpo-sft-{seed}")
    model.train()
    t0, loss_v, recent, done = time.perf_counter(), float("nan"), [], 0
    bar = tqdm(range(steps), desc="warm-up", unit="step", disable=not progress, dynamic_ncols=True)
    for _ in bar:
        batch = sft_batch(tokenizer, rng.sample(problems, min(batch_size, len(problems)))).to(device)
        logp, _ = policy(batch)
        mask = batch.completion_mask.float()
        loss = -(logp * mask).sum() / mask.sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        loss_v, done = float(loss.detach()), done + 1
        recent = (recent + [loss_v])[-TARGET_WINDOW:]
        bar.set_postfix(loss=f"{loss_v:.3f}", refresh=False)
        if watch is not None and done % every == 0:
            watch(done, sum(recent) / len(recent))
        if target_loss is not None:
            reached = len(recent) == TARGET_WINDOW and sum(recent) / TARGET_WINDOW <= target_loss
            if agree(reached) if agree is not None else reached:
                break
    bar.close()
    model.eval()
    mean = sum(recent) / len(recent) if recent else float("nan")
    out = {"sft/steps": done, "sft/final_loss": loss_v, "sft/window_loss": mean, "sft/seconds": time.perf_counter() - t0}
    if target_loss is not None:
        out["sft/reached_target"] = float(len(recent) == TARGET_WINDOW and mean <= target_loss)
    return out
