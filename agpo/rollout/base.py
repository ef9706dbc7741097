"""What every rollout engine returns and the interface the trainer calls.

A ``RolloutEngine`` samples one phase: ``group_size`` completions of each prompt, the
rows of prompt ``p`` at temperature ``tau[p]``, plain temperature sampling (top-k off, no
repetition penalty) optionally restricted to the top-p nucleus, each row's randomness
keyed by (``seed``, ``stream``, global row) (``agpo.rollout.noise.row_keys``). It returns
a ``Rollout``: the token layout the policy scores and trains on, the decoded texts, the
generated-token count the budget charges, the generation time and the engine's own
log-probs of the sampled tokens. The trainer does not know which engine sampled.

``assemble`` is the shared tail of every engine: completion mask (up to and including the
first EOS; with a stop string, up to the first pad), padding, decoded texts cut at the
stop string, the ``SequenceBatch``.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass

import torch

from agpo.learn.batches import SequenceBatch


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
    """Wall time of generation (weight sync excluded: ``sync_seconds``)."""
    logprobs: torch.Tensor | None = None
    """``[R, C]`` float32 log-probs the engine assigned to the sampled tokens under the
    distribution it sampled from (after temperature and top-p), 0 where masked; None if the
    engine does not report them."""
    engine: str = "hf"
    """Which engine sampled (hf, vllm)."""
    sync_seconds: float = 0.0
    """Wall time spent pushing the policy's weights into the engine before this phase."""

    @property
    def lengths(self) -> torch.Tensor:
        return self.batch.completion_mask.sum(1)


class RolloutEngine(abc.ABC):
    """Samples rollouts from the current policy. ``weights_version`` counts the optimiser
    steps the policy has taken; an engine holding its own copy of the weights refreshes
    it when the version it last loaded differs (collective under torchrun)."""

    name: str = "?"
    holds_weights: bool = False
    """The engine samples from its own copy of the weights (a colocated vLLM): the held-out
    evaluation then runs through it (``complete``) instead of gathering the policy for HF
    ``generate``."""

    @abc.abstractmethod
    def sample(self, prompts: list[str], tau: torch.Tensor, *, group_size: int, max_new_tokens: int,
               top_p: float = 1.0, stop: str | None = None, add_special_tokens: bool = True, seed: int = 0,
               stream: int = 0, row_offset: int = 0, weights_version: int = 0) -> Rollout:
        """``group_size`` samples of each prompt, prompt ``p``'s rows at ``tau[p]``; row ``r``
        is global row ``row_offset + r``."""

    def complete(self, prompts: list[str], *, samples: int = 1, temperature: float = 0.0, top_p: float = 1.0,
                 max_new_tokens: int, add_special_tokens: bool = True, stop: str | None = None, seed: int = 0,
                 weights_version: int = 0) -> tuple[list[list[str]], list[list[int]]]:
        """Evaluation completions (texts and generated-token counts per prompt) from an
        engine that ``holds_weights``; the others evaluate through HF ``generate``."""
        raise NotImplementedError(f"the {self.name} engine does not evaluate; use agpo.tasks.evaluate")

    def idle(self) -> None:
        """No rollout follows before the next optimiser step: free what can be freed (a
        colocated engine's KV cache and weights). A no-op by default."""

    def describe(self) -> str:
        """One line for the run log."""
        return self.name

    def close(self) -> None:
        """Free the engine (a no-op where nothing is held)."""


def check_request(prompts: list[str], tau: torch.Tensor, top_p: float) -> torch.Tensor:
    """Checked float32 CPU ``tau`` (one finite temperature > 0 per prompt)."""
    if not isinstance(tau, torch.Tensor) or tau.dim() != 1 or tau.numel() != len(prompts):
        raise ValueError(f"tau: expected a 1-D tensor with one temperature per prompt ({len(prompts)}), "
                         f"got {tuple(tau.shape) if isinstance(tau, torch.Tensor) else tau!r}")
    tau = tau.detach().float().cpu()
    if not bool(torch.isfinite(tau).all()) or not bool((tau > 0).all()):
        raise ValueError(f"tau: expected finite temperatures > 0, got {tau.tolist()}")
    if not 0.0 < float(top_p) <= 1.0:
        raise ValueError(f"top_p: expected a value in (0, 1], got {top_p}")
    return tau


def stop_ids(model, tokenizer) -> tuple[list[int], int | None]:
    """``(eos_ids, pad_id)`` as ``generate`` uses them: the model's generation config,
    else the tokenizer's."""
    own = model.generation_config
    eos = own.eos_token_id if own.eos_token_id is not None else tokenizer.eos_token_id
    eos_ids = [int(e) for e in (eos if isinstance(eos, list) else [eos]) if e is not None]
    pad_id = own.pad_token_id if own.pad_token_id is not None else tokenizer.pad_token_id
    return eos_ids, pad_id


def completion_mask(new: torch.Tensor, eos_ids: list[int], pad_id: int | None, stopped_by_pad: bool) -> torch.Tensor:
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


def assemble(tokenizer, ids: torch.Tensor, mask: torch.Tensor, new: torch.Tensor, row_tau: torch.Tensor, *,
             eos_ids: list[int], pad_id: int | None, stop: str | None, group_size: int, seconds: float,
             logprobs: torch.Tensor | None, engine: str, stopped_by_pad: bool = False,
             lengths: torch.Tensor | None = None) -> Rollout:
    """The ``Rollout`` of prompt ids ``ids``/``mask`` ``[R, P]`` and sampled ids ``new``
    ``[R, C]`` (pad-filled after a row ended); ``logprobs`` ``[R, C]`` or None;
    ``lengths`` ``[R]``: tokens each row really generated, where the engine says so."""
    fill = pad_id if pad_id is not None else 0
    cmask = completion_mask(new, eos_ids, pad_id, stopped_by_pad)
    if lengths is not None:
        cmask = cmask * (torch.arange(new.shape[1]).unsqueeze(0) < lengths.unsqueeze(1)).to(cmask.dtype)
    new = new.masked_fill(cmask == 0, fill)
    if logprobs is not None:
        logprobs = logprobs.float().masked_fill(cmask == 0, 0.0)
    texts = []
    for r in range(new.shape[0]):
        text = tokenizer.decode(new[r, :int(cmask[r].sum())], skip_special_tokens=True)
        if stop and stop in text:
            text = text[:text.index(stop)]
        texts.append(text)
    batch = SequenceBatch(prompt_ids=ids, prompt_mask=mask, completion_ids=new, completion_mask=cmask,
                          temperature=row_tau)
    return Rollout(batch=batch, texts=texts, group_size=group_size, generated_tokens=int(cmask.sum()),
                   seconds=seconds, logprobs=logprobs, engine=engine)
