"""Rollouts: all groups of a phase sampled in one ``generate`` call, each row at its own
temperature.

``RowTemperature`` is a logits processor that divides row ``i``'s scores by ``tau[i]``, so
the probe (every row at ``tau_base``) and the train groups (group ``p``'s rows at
``tau[p]``) are single batched calls with left padding, KV cache and EOS stops, instead
of one call per group. Sampling is plain temperature sampling (``top_k=0``, no repetition
penalty), optionally with top-p: exactly the distribution the loss's ``softmax(z / T)``
scores.

``sample_groups`` returns a ``Rollout``: the ``SequenceBatch`` the policy scores and
trains on, the decoded texts (cut at EOS, and at the stop string for plain-text prompts)
and the generated-token count that the token budget charges.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from agpo.policy import SequenceBatch


class RowTemperature:
    """Logits processor: ``scores[i] / tau[i]`` (a ``transformers`` LogitsProcessor by
    interface: ``__call__(input_ids, scores) -> scores``)."""

    def __init__(self, tau: torch.Tensor):
        if tau.dim() != 1 or not bool((tau > 0).all()) or not bool(torch.isfinite(tau).all()):
            raise ValueError(f"tau: expected a 1-D tensor of finite temperatures > 0, got {tau}")
        self.tau = tau

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if scores.shape[0] != self.tau.shape[0]:
            raise ValueError(f"RowTemperature: {self.tau.shape[0]} temperatures for {scores.shape[0]} rows")
        return scores / self.tau.to(device=scores.device, dtype=scores.dtype).unsqueeze(1)


@dataclass
class Rollout:
    """Samples of one phase: ``groups`` prompts x ``group_size`` rows, group-major."""

    batch: SequenceBatch
    """Token layout for scoring and training (on the CPU)."""
    texts: list[str]
    """Decoded completions, one per row."""
    group_size: int
    """Rows per prompt."""
    generated_tokens: int
    """Tokens the model generated (EOS included): what the token budget counts."""
    seconds: float
    """Wall time of generation."""

    @property
    def lengths(self) -> torch.Tensor:
        return self.batch.completion_mask.sum(1)


def _completion_mask(new: torch.Tensor, eos_ids: list[int], pad_id: int | None, stopped_by_pad: bool) -> torch.Tensor:
    """1 up to and including the first EOS; with stop strings also up to the first pad."""
    C = new.shape[1]
    end = torch.full((new.shape[0],), C, dtype=torch.long)
    if eos_ids:
        is_eos = torch.isin(new, torch.tensor(eos_ids))
        end = torch.where(is_eos.any(1), is_eos.int().argmax(1) + 1, end)
    if stopped_by_pad and pad_id is not None and pad_id not in eos_ids:
        is_pad = new == pad_id
        end = torch.minimum(end, torch.where(is_pad.any(1), is_pad.int().argmax(1), end))
    return (torch.arange(C).unsqueeze(0) < end.unsqueeze(1)).to(torch.long)


@torch.no_grad()
def sample_groups(model, tokenizer, prompts: list[str], tau: torch.Tensor, *, group_size: int, max_new_tokens: int,
                  top_p: float = 1.0, batch_rows: int = 0, add_special_tokens: bool = True,
                  stop: str | None = None) -> Rollout:
    """``group_size`` samples of each prompt, prompt ``p``'s rows at temperature ``tau[p]``."""
    from transformers import GenerationConfig, LogitsProcessorList

    if len(prompts) != tau.numel():
        raise ValueError(f"tau: {tau.numel()} temperatures for {len(prompts)} prompts")
    device = next(model.parameters()).device
    own = model.generation_config
    eos = own.eos_token_id if own.eos_token_id is not None else tokenizer.eos_token_id
    eos_ids = [e for e in (eos if isinstance(eos, list) else [eos]) if e is not None]
    pad_id = own.pad_token_id if own.pad_token_id is not None else tokenizer.pad_token_id
    gen_cfg = GenerationConfig(do_sample=True, temperature=1.0, top_k=0, top_p=top_p, max_new_tokens=max_new_tokens,
                               eos_token_id=eos_ids or None, pad_token_id=pad_id, repetition_penalty=1.0,
                               stop_strings=[stop] if stop else None)
    enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=add_special_tokens)
    ids = enc["input_ids"].repeat_interleave(group_size, 0)
    mask = enc["attention_mask"].repeat_interleave(group_size, 0)
    row_tau = tau.detach().float().cpu().repeat_interleave(group_size)
    rows = ids.shape[0]
    step = batch_rows if batch_rows > 0 else rows
    was_training = model.training
    model.eval()
    t0 = time.perf_counter()
    pieces = []
    try:
        for s in range(0, rows, step):
            sl = slice(s, min(s + step, rows))
            kw = dict(tokenizer=tokenizer) if stop else {}
            out = model.generate(input_ids=ids[sl].to(device), attention_mask=mask[sl].to(device),
                                 generation_config=gen_cfg,
                                 logits_processor=LogitsProcessorList([RowTemperature(row_tau[sl])]), **kw)
            pieces.append(out[:, ids.shape[1]:].cpu())
    finally:
        model.train(was_training)
    seconds = time.perf_counter() - t0
    width = max(p.shape[1] for p in pieces)
    fill = pad_id if pad_id is not None else 0
    new = torch.cat([torch.nn.functional.pad(p, (0, width - p.shape[1]), value=fill) for p in pieces])
    cmask = _completion_mask(new, eos_ids, pad_id, stopped_by_pad=bool(stop))
    new = new.masked_fill(cmask == 0, fill)
    texts = []
    for r in range(rows):
        text = tokenizer.decode(new[r, :int(cmask[r].sum())], skip_special_tokens=True)
        if stop and stop in text:
            text = text[:text.index(stop)]
        texts.append(text)
    batch = SequenceBatch(prompt_ids=ids, prompt_mask=mask, completion_ids=new, completion_mask=cmask,
                          temperature=row_tau)
    return Rollout(batch=batch, texts=texts, group_size=group_size, generated_tokens=int(cmask.sum()),
                   seconds=seconds)
