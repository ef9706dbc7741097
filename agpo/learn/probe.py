"""Making AGPO's probe group pay for itself: a probe that filters prompts, and probe samples
trained on (neither is in the paper; both are off in ``--recipe paper``; reuse is on by
default wherever there is a probe: ``TrainConfig.reuses_probe``).

The paper draws a separate group per prompt at ``tau_base`` only to set the controllers,
and never trains on it: at an equal budget of generated tokens an AGPO step then costs
twice a GRPO step of the same group size. Two switches recover that cost:

- ``--probe-filter`` (``keep_groups``): a prompt whose probe rewards are all equal will most
  likely give an all-equal train group, whose advantages are 0 and whose gradient is
  nothing; its train group is not generated (at no extra cost: the probe was drawn
  anyway). Every rank keeps at least one prompt, so the update stays collective. It judges
  the prompt by its probe, so it also skips train groups that would have differed; DAPO's
  filter of the train groups themselves is ``--filter-groups`` (``agpo.learn.refill``).
- ``--probe-reuse`` (``with_probe``): the probe samples are on-policy samples of the same
  policy at ``tau_base``. Each row is scored at the temperature it was sampled at (or all at
  1 with ``--score-temperature one``, the same treatment as the train rows), so no
  importance weight beyond the engine's own correction (``--tis``) is needed: they join
  the update with the train group, one advantage baseline over the prompt's
  ``G + probe-size`` rewards, and the prompt's eps.

``--probe-size`` draws fewer probe samples than ``--group-size`` (at least 2, for a
reward spread).
"""

from __future__ import annotations

from dataclasses import replace

import torch

from agpo.learn.batches import concat_batches
from agpo.rollout import Rollout


def rewards_differ(rewards: torch.Tensor) -> torch.Tensor:
    """Bool ``[P]``: the groups whose rewards ``[P, G]`` are not all equal (NaN: False)."""
    return (rewards.max(1).values - rewards.min(1).values).abs() > 1e-12


def cat_logprobs(parts: list[Rollout]) -> torch.Tensor | None:
    """The engine log-probs of rollouts' rows, one after the other, right-padded with 0 to
    the widest (None unless every part has them)."""
    if any(p.logprobs is None for p in parts):
        return None
    C = max(p.logprobs.shape[1] for p in parts)
    return torch.cat([torch.nn.functional.pad(p.logprobs, (0, C - p.logprobs.shape[1])) for p in parts])


def keep_groups(probe_rewards: torch.Tensor, world_size: int = 1) -> torch.Tensor:
    """Bool ``[P]``: the prompts whose probe rewards ``[P, Gp]`` are not all equal; in each
    rank's contiguous block of ``P / world_size`` prompts at least the first is kept when
    the filter would skip all of them."""
    keep = rewards_differ(probe_rewards)
    per = probe_rewards.shape[0] // world_size
    for r in range(world_size):
        if not keep[r * per:(r + 1) * per].any():
            keep[r * per] = True
    return keep


def select_groups(roll: Rollout, groups: torch.Tensor) -> Rollout:
    """The rows of ``roll``'s groups ``groups`` (indices into its prompts), in that order."""
    G = roll.group_size
    rows = (groups[:, None] * G + torch.arange(G)).reshape(-1)
    batch = roll.batch.select(rows)
    return replace(roll, batch=batch, texts=[roll.texts[i] for i in rows.tolist()],
                   logprobs=None if roll.logprobs is None else roll.logprobs[rows][:, :batch.completion_ids.shape[1]])


def with_probe(train: Rollout, probe: Rollout) -> Rollout:
    """``train``'s rows, then ``probe``'s (the same prompts, in the same order): the batch an
    update with ``--probe-reuse`` trains on. Log-probs are kept only when both have them."""
    return replace(train, batch=concat_batches([train.batch, probe.batch]), texts=train.texts + probe.texts,
                   logprobs=cat_logprobs([train, probe]),
                   generated_tokens=train.generated_tokens + probe.generated_tokens)


def reuse_advantages(advantages, rewards: torch.Tensor, probe_rewards: torch.Tensor) -> torch.Tensor:
    """Per-row advantages ``[P*G + P*Gp]`` in ``with_probe``'s row order: ``advantages``
    (the controller's group-relative function) over each prompt's pooled ``[G + Gp]``
    train and probe rewards."""
    G = rewards.shape[1]
    pooled = advantages(torch.cat([rewards, probe_rewards], 1))
    return torch.cat([pooled[:, :G].reshape(-1), pooled[:, G:].reshape(-1)])
