"""Evaluation on a task: batched generation and answer checking (``evaluate``).

Metrics: ``pass@1`` with one sample (greedy unless ``temperature`` > 0); with K > 1
samples (temperature 1.0 unless given): ``mean@K`` (mean accuracy over the K samples, the
pass@1 estimate at that temperature), ``maj@K`` (the most frequent final answer among the
samples that give one, ties to the earliest) and ``pass@K`` (any sample correct).
``accuracy`` is pass@1 or mean@K: the number the training loop logs as held-out accuracy.

Generation is HF ``generate`` with left padding, KV cache and EOS stops, prompts sorted by
length into batches (or a rollout engine's own, ``generate=``: the trainer evaluates through
its colocated vLLM engine); sampling is plain temperature (+ top-p) sampling whatever the model's
own generation defaults say (no top-k, no repetition penalty). ``python -m agpo.eval`` is
the command around it.
"""

from __future__ import annotations

import math
import time
from collections import Counter

import torch

from agpo.models import CHAR_VOCAB, PRESETS
from agpo.tasks.data import Problem, format_prompt, uses_chat_template
from agpo.tasks.rewards import (
    DEFAULT_VERIFIER,
    answer_key,
    correct_many,
    extract_answer,
)

PLAIN_STOP = "\nQuestion:"  # a base model that goes on to invent the next question


def default_max_new_tokens(model_name: str | None, tokenizer) -> int:
    """The preset's completion cap; the tiny one for a char-vocabulary checkpoint; else 512."""
    if model_name in PRESETS:
        return PRESETS[model_name].max_new_tokens
    if len(tokenizer) == len(CHAR_VOCAB) and tokenizer.convert_ids_to_tokens(0) == CHAR_VOCAB[0]:
        return PRESETS["tiny"].max_new_tokens
    return 512


def _generation_config(model, tokenizer, *, samples, temperature, top_p, max_new_tokens):
    from transformers import GenerationConfig

    own = model.generation_config
    eos = own.eos_token_id if own.eos_token_id is not None else tokenizer.eos_token_id
    sampling = temperature > 0
    kw = dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=0) if sampling else dict(do_sample=False)
    return GenerationConfig(max_new_tokens=max_new_tokens, num_return_sequences=samples, eos_token_id=eos,
                            pad_token_id=own.pad_token_id if own.pad_token_id is not None else tokenizer.pad_token_id,
                            repetition_penalty=1.0, **kw)


@torch.no_grad()
def generate_completions(model, tokenizer, prompts: list[str], *, samples: int = 1, temperature: float = 0.0,
                         top_p: float = 1.0, max_new_tokens: int = 512, batch_size: int = 16, seed: int = 0,
                         progress: bool = True, add_special_tokens: bool = True,
                         stop: str | None = None) -> tuple[list[list[str]], list[list[int]]]:
    """``samples`` completions per prompt (text, cut at EOS and at ``stop``) and their
    generated-token counts; prompts are batched by length and the result is in input order."""
    from tqdm.auto import tqdm

    gen_cfg = _generation_config(model, tokenizer, samples=samples, temperature=temperature, top_p=top_p,
                                 max_new_tokens=max_new_tokens)
    eos_ids = gen_cfg.eos_token_id if isinstance(gen_cfg.eos_token_id, list) else [gen_cfg.eos_token_id]
    eos_ids = torch.tensor([e for e in eos_ids if e is not None], dtype=torch.long)
    lengths = [len(tokenizer(p, add_special_tokens=add_special_tokens)["input_ids"]) for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: -lengths[i])
    texts: list[list[str]] = [[] for _ in prompts]
    counts: list[list[int]] = [[] for _ in prompts]
    device = next(model.parameters()).device
    bar = tqdm(total=len(prompts), unit="problem", desc="eval", disable=not progress, dynamic_ncols=True)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            enc = tokenizer([prompts[i] for i in idx], return_tensors="pt", padding=True,
                            add_special_tokens=add_special_tokens).to(device)
            # synced_gpus=False: under FSDP the model is gathered (agpo.scale.parallel), so ranks may
            # make different numbers of calls; transformers would otherwise sync every token
            out = model.generate(**enc, generation_config=gen_cfg, synced_gpus=False)
            new = out[:, enc["input_ids"].shape[1]:].cpu()
            is_eos = torch.isin(new, eos_ids) if len(eos_ids) else torch.zeros_like(new, dtype=torch.bool)
            ends = torch.where(is_eos.any(1), is_eos.int().argmax(1) + 1, torch.full((new.shape[0],), new.shape[1]))
            for row in range(new.shape[0]):
                n = int(ends[row])
                text = tokenizer.decode(new[row, :n], skip_special_tokens=True)
                if stop and stop in text:
                    text = text[:text.index(stop)]
                texts[idx[row // samples]].append(text)
                counts[idx[row // samples]].append(n)
            bar.update(len(idx))
    bar.close()
    return texts, counts


def majority(keys: list[str], has_answer: list[bool]) -> int | None:
    """Index of the first sample carrying the most frequent key among samples with an answer."""
    votes = Counter(k for k, ok in zip(keys, has_answer) if ok)
    if not votes:
        return None
    top = max(votes.values())
    return next(i for i, (k, ok) in enumerate(zip(keys, has_answer)) if ok and votes[k] == top)


def evaluate(model, tokenizer, problems: list[Problem], *, samples: int = 1, temperature: float | None = None,
             top_p: float = 1.0, max_new_tokens: int | None = None, batch_size: int = 16, seed: int = 0,
             progress: bool = True, verifier=None, generate=None) -> dict:
    """Generate and check; returns ``{"summary": {...}, "records": [...]}`` (see the module
    docstring for the metrics). The model's train/eval mode is restored afterwards.

    ``generate``: where the completions come from instead of HF ``generate`` on ``model``
    (then unused, may be None): a callable taking the prompts and ``samples``,
    ``temperature``, ``top_p``, ``max_new_tokens``, ``add_special_tokens``, ``stop``,
    ``seed`` as keywords and returning ``(texts, token counts)`` per prompt, like
    ``generate_completions`` (a rollout engine's ``complete``)."""
    if not problems:
        raise ValueError("evaluate: no problems")
    if samples < 1 or batch_size < 1:
        raise ValueError(f"evaluate: samples and batch_size must be >= 1 (got {samples}, {batch_size})")
    if temperature is None:
        temperature = 0.0 if samples == 1 else 1.0
    if temperature < 0 or not math.isfinite(temperature):
        raise ValueError(f"--temperature {temperature}: must be >= 0")
    if samples > 1 and temperature == 0:
        raise ValueError("--samples > 1 needs --temperature > 0 (greedy samples are all the same)")
    max_new_tokens = max_new_tokens or default_max_new_tokens(None, tokenizer)
    verifier = verifier or DEFAULT_VERIFIER
    chat = uses_chat_template(tokenizer)
    prompts = [format_prompt(p, tokenizer) for p in problems]
    plain = not chat and not all(p.verbatim for p in problems)
    before = verifier.stats.snapshot()
    t0 = time.perf_counter()
    kw = dict(samples=samples, temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens, seed=seed,
              add_special_tokens=not chat, stop=PLAIN_STOP if plain else None)
    if generate is not None:
        texts, counts = generate(prompts, **kw)
    else:
        was_training = model.training
        model.eval()
        try:
            texts, counts = generate_completions(model, tokenizer, prompts, batch_size=batch_size, progress=progress,
                                                 **kw)
        finally:
            model.train(was_training)
    gen_s = time.perf_counter() - t0

    records, mean_acc, maj_ok, any_ok, no_answer = [], 0.0, 0, 0, 0
    flat = iter(correct_many([t for outs in texts for t in outs], [p.reference for p, outs in zip(problems, texts)
                                                                   for _ in outs], verifier=verifier))  # one batch
    for prob, prompt, outs, ns in zip(problems, prompts, texts, counts):
        answers = [extract_answer(t) for t in outs]
        correct = [next(flat) for _ in outs]
        rec = {"id": prob.id, "source": prob.source, "question": prob.prompt, "prompt": prompt,
               "reference": prob.reference, "completion": outs[0], "answer": answers[0],
               "correct": correct[0], "tokens": ns[0]}
        mean_acc += sum(correct) / samples
        any_ok += any(correct)
        no_answer += sum(a is None for a in answers)
        if samples > 1:
            keys = [answer_key(t) for t in outs]
            m = majority(keys, [a is not None for a in answers])
            rec["samples"] = [{"completion": t, "answer": a, "correct": c, "tokens": n}
                              for t, a, c, n in zip(outs, answers, correct, ns)]
            rec["maj_answer"] = None if m is None else answers[m]
            rec["maj_correct"] = m is not None and correct[m]
            maj_ok += rec["maj_correct"]
        records.append(rec)

    n = len(problems)
    after = verifier.stats.snapshot()
    all_tokens = [c for ns in counts for c in ns]
    summary = {"n": n, "samples": samples, "temperature": temperature, "top_p": top_p,
               "max_new_tokens": max_new_tokens, "accuracy": mean_acc / n}
    if samples == 1:
        summary["pass@1"] = mean_acc / n
    else:
        summary.update({f"mean@{samples}": mean_acc / n, f"maj@{samples}": maj_ok / n,
                        f"pass@{samples}": any_ok / n})
    summary.update({"no_answer_rate": no_answer / (n * samples),
                    "mean_completion_tokens": sum(all_tokens) / len(all_tokens),
                    "generated_tokens": sum(all_tokens), "generation_s": round(gen_s, 3),
                    "verifier": {k: after[k] - before[k] for k in after}})
    return {"summary": summary, "records": records}
