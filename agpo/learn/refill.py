"""Dropping the train groups that teach nothing and sampling fresh prompts in their place
(``--filter-groups``: DAPO's dynamic sampling, for every algorithm).

A group whose rewards are all equal has advantage 0 on every row: it adds tokens to the
update and no gradient. With ``--filter-groups`` a step samples its ``--prompts-per-step``
prompts (with their probe, for AGPO), keeps the groups whose rewards differ and, while it
has fewer than ``--prompts-per-step`` of them, samples another round of fresh prompts, at
most ``--filter-rounds`` rounds in all. Every generated token counts against
``--token-budget``, the dropped groups' included. As in DAPO every round draws
``--prompts-per-step`` prompts and the surplus informative groups of the last round are
dropped too, so a step trains on ``--prompts-per-step`` groups (fewer when its rounds ran
out; see below for many ranks). (A round sized by
the missing count would waste fewer tokens, but its size would depend on the world size,
through whole blocks per rank, and a run would then sample other prompts on 2 ranks than
on 1.)

The groups of a step are numbered in sampling order over its rounds (round, then prompt):
the controllers see them in that order at any world size. Each rank trains the groups it
sampled, so a rank's groups are not contiguous in that order once a second round runs:
``rank_order`` gives the positions the rank-ordered gathers land at. The update is
collective, so a rank none of whose groups made the cut trains one group anyway: its
first informative one past the cut, else its first one (advantages 0, but its tokens count
in the loss's normaliser). Only then does a run on several ranks train other groups than
on one, up to ``--prompts-per-step`` + ranks - 1 of them: with few prompts per rank (a
second round's informative groups all on other ranks) it can happen often, so give each
rank several prompts per step.

The functions here take and return plain tensors and lists: the trainer's part is
``agpo.learn.phases``.
"""

from __future__ import annotations

from dataclasses import fields, replace

import torch

from agpo.algo.controllers import ProbeStats
from agpo.learn.batches import concat_batches
from agpo.learn.probe import cat_logprobs, rewards_differ
from agpo.rollout import Rollout


def informative(rewards: torch.Tensor, probe_rewards: torch.Tensor | None = None) -> torch.Tensor:
    """Bool ``[S]``: the groups whose rewards ``[S, G]`` (with ``--probe-reuse``, pooled with
    their probe rewards ``[S, Gp]``: one advantage baseline over both) are not all equal."""
    if probe_rewards is not None:
        rewards = torch.cat([rewards, probe_rewards.to(rewards.dtype)], 1)
    return rewards_differ(rewards)


def owners(round_sizes: list[int], world_size: int) -> torch.Tensor:
    """Long ``[S]``: the rank that sampled each group of rounds of ``round_sizes`` prompts
    (each rank takes a contiguous block of each round)."""
    return torch.cat([torch.arange(n) // (n // world_size) for n in round_sizes])


def choose_trained(useful: torch.Tensor, owner: torch.Tensor, limit: int, world_size: int) -> torch.Tensor:
    """Bool ``[S]``: the first ``limit`` groups marked ``useful``, in order; a rank none of
    whose groups is chosen gets its first useful group back, else its first group."""
    chosen = useful & (useful.long().cumsum(0) <= limit)
    for r in range(world_size):
        own = (owner == r).nonzero().view(-1)
        if len(own) and not chosen[own].any():
            spare = own[useful[own]]
            chosen[spare[0] if len(spare) else own[0]] = True
    return chosen


def rank_order(owner: torch.Tensor, world_size: int) -> torch.Tensor:
    """Long ``[n]``: for groups numbered in step order and sampled by ``owner [n]``, the step
    position of each entry of a rank-ordered gather (rank 0's groups in its order, then rank
    1's, ...): ``values[order] = gathered`` puts gathered values in step order."""
    return torch.cat([(owner == r).nonzero().view(-1) for r in range(world_size)])


def in_step_order(gathered: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """A rank-ordered gather ``[n, ...]`` in step order (``rank_order``)."""
    out = torch.empty_like(gathered)
    out[order] = gathered
    return out


def merge_probe_stats(parts: list[ProbeStats]) -> ProbeStats:
    """One step's probe statistics from its rounds', groups in round order."""
    if len(parts) == 1:
        return parts[0]
    return ProbeStats(**{f.name: sum((getattr(p, f.name) for p in parts), ()) for f in fields(ProbeStats)})


def join_rollouts(parts: list[Rollout]) -> Rollout:
    """The rows of rollouts of one group size, one after the other (tokens and times summed;
    log-probs kept only when every part has them)."""
    if len(parts) == 1:
        return parts[0]
    return replace(parts[0], batch=concat_batches([p.batch for p in parts]), texts=[t for p in parts for t in p.texts],
                   logprobs=cat_logprobs(parts), generated_tokens=sum(p.generated_tokens for p in parts),
                   seconds=sum(p.seconds for p in parts), sync_seconds=sum(p.sync_seconds for p in parts))
