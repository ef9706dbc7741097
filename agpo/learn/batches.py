"""The batch types of the learner: a rollout batch, and its rows packed without padding.

``SequenceBatch`` is what a rollout engine returns and the trainer scores; ``PackedBatch``
is a micro-batch of its rows laid end to end (``agpo.learn.packing`` builds it, the
policy's forward reads it). Imports nothing of the package.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch


@dataclass
class SequenceBatch:
    """Prompt + completion rows, with per-row sampling temperature."""

    prompt_ids: torch.Tensor
    """[B, P] left-padded prompt ids."""
    prompt_mask: torch.Tensor
    """[B, P] 1 on real prompt tokens."""
    completion_ids: torch.Tensor
    """[B, C] right-padded sampled ids (EOS included when it was sampled)."""
    completion_mask: torch.Tensor
    """[B, C] 1 on the tokens that count (up to and including EOS)."""
    temperature: torch.Tensor
    """[B] float32 temperature each row was sampled at."""

    @property
    def rows(self) -> int:
        return self.prompt_ids.shape[0]

    def select(self, index) -> "SequenceBatch":
        """Rows ``index`` (a slice or an index tensor), with all-padding columns trimmed."""
        sub = SequenceBatch(*(t[index] for t in (self.prompt_ids, self.prompt_mask, self.completion_ids,
                                                 self.completion_mask, self.temperature)))
        keep_p = int(sub.prompt_mask.sum(1).max()) if sub.rows else 0
        keep_c = int(sub.completion_mask.sum(1).max()) if sub.rows else 0
        P = sub.prompt_ids.shape[1]
        return replace(sub, prompt_ids=sub.prompt_ids[:, P - keep_p:], prompt_mask=sub.prompt_mask[:, P - keep_p:],
                       completion_ids=sub.completion_ids[:, :max(keep_c, 1)],
                       completion_mask=sub.completion_mask[:, :max(keep_c, 1)])

    def to(self, device) -> "SequenceBatch":
        return SequenceBatch(*(t.to(device) for t in (self.prompt_ids, self.prompt_mask, self.completion_ids,
                                                      self.completion_mask, self.temperature)))

    def padded_tokens(self) -> int:
        return self.rows * (self.prompt_ids.shape[1] + self.completion_ids.shape[1])


def concat_batches(parts: list[SequenceBatch]) -> SequenceBatch:
    """The rows of ``parts`` one after the other, prompts left-padded and completions
    right-padded (with 0, masked) to the widest."""
    P = max(b.prompt_ids.shape[1] for b in parts)
    C = max(b.completion_ids.shape[1] for b in parts)

    def left(t, w):
        return torch.cat([t.new_zeros(t.shape[0], w - t.shape[1]), t], 1)

    def right(t, w):
        return torch.cat([t, t.new_zeros(t.shape[0], w - t.shape[1])], 1)
    return SequenceBatch(prompt_ids=torch.cat([left(b.prompt_ids, P) for b in parts]),
                         prompt_mask=torch.cat([left(b.prompt_mask, P) for b in parts]),
                         completion_ids=torch.cat([right(b.completion_ids, C) for b in parts]),
                         completion_mask=torch.cat([right(b.completion_mask, C) for b in parts]),
                         temperature=torch.cat([b.temperature for b in parts]))


@dataclass
class PackedBatch:
    """Rows of a ``SequenceBatch`` packed into one sequence of real tokens."""

    input_ids: torch.Tensor
    """[1, L] the rows' prompt and completion tokens, end to end."""
    position_ids: torch.Tensor
    """[1, L] positions restarting at 0 at each row's first token."""
    predict: torch.Tensor
    """[N] positions in L whose hidden state predicts a completion token."""
    targets: torch.Tensor
    """[N] the completion tokens, row after row."""
    cu_seqlens: torch.Tensor
    """[S+1] int32 completion-token boundaries of the S rows (empty rows included)."""
    temperature: torch.Tensor
    """[S] float32 temperature of each row."""
    token_mask: torch.Tensor
    """[S, C] bool: where the rows' completion tokens sit in the batch's ``[R, C]`` layout
    (row-major order matches ``targets``)."""

    @property
    def rows(self) -> int:
        return self.temperature.shape[0]

    @property
    def tokens(self) -> int:
        return self.input_ids.shape[1]

    def flat(self, per_token: torch.Tensor) -> torch.Tensor:
        """A ``[S, C]`` per-token tensor of these rows (e.g. old log-probs) in packed order ``[N]``."""
        return per_token[:, :self.token_mask.shape[1]][self.token_mask]

    def to(self, device) -> "PackedBatch":
        return PackedBatch(*(t.to(device) for t in (self.input_ids, self.position_ids, self.predict, self.targets,
                                                    self.cu_seqlens, self.temperature, self.token_mask)))
