"""The sampling phases of a step: the prompts, the engine's samples, their rewards, the
probe phase that sets the temperatures (and, with ``--probe-filter``, which prompts get a
train group; with ``--clip-from-train``, the train group's statistics in its place), the
rounds of fresh prompts that replace all-equal groups (``--filter-groups``,
``agpo.learn.refill``), and the engine-vs-trainer log-prob correction of the train rollout.

Every phase's noise depends on (seed, step, phase, global row) only, so a run samples the
same rows at any world size. Rewards of a phase are scored in one batch
(``agpo.tasks.rewards.score_batch``: the math-verify comparisons go to the worker pool
together); with ``--reward-errors zero`` a row whose reward raised scores 0 and is counted
(``reward/errors``).

``SamplingPhases`` is a part of ``agpo.learn.trainer.Trainer``: it uses the trainer's
config, engine (and the weights version and step it samples at), tokenizer, controller,
reward function, verifier, prompt sampler and rank helpers (``_block``, ``_gather``).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch

from agpo.algo.controllers import ProbeStats
from agpo.learn.probe import keep_groups, select_groups
from agpo.learn.refill import choose_trained, informative, join_rollouts, merge_probe_stats, owners, rank_order
from agpo.rollout import Rollout
from agpo.rollout.correction import importance_weights, mismatch_metrics, mismatch_sums
from agpo.runtime.guard import finite
from agpo.scale.distributed import all_reduce_sum
from agpo.tasks.data import Problem, format_prompt
from agpo.tasks.evaluate import PLAIN_STOP
from agpo.tasks.rewards import correct_many, correctness_reward, score_batch


class SamplingPhases:
    """Prompts, samples, rewards and the probe of one step (a ``Trainer`` mixin)."""

    def _prompts(self, problems: list[Problem]) -> tuple[list[str], str | None]:
        prompts = [format_prompt(p, self.tokenizer) for p in problems]
        plain = not self.chat and not all(p.verbatim for p in problems)
        return prompts, (PLAIN_STOP if plain else None)

    def _sample(self, prompts, stop, tau, *, phase: int, first_prompt: int, group_size: int | None = None) -> Rollout:
        """One phase's samples; the noise depends on (seed, step, phase, global row) only."""
        r = self.cfg.rollout
        G = group_size or r.group_size
        return self.engine.sample(prompts, tau, group_size=G, max_new_tokens=r.max_new_tokens,
                                  top_p=r.top_p, add_special_tokens=not self.chat, stop=stop, seed=self.cfg.run.seed,
                                  stream=2 * self.step_count + phase, row_offset=first_prompt * G,
                                  weights_version=self.weights_version)

    def _correction(self, roll: Rollout, old_logp: torch.Tensor) -> tuple[torch.Tensor | None, dict[str, float]]:
        """Truncated importance weights ``[R, C]`` (None: off) and the engine-vs-trainer
        mismatch metrics over all ranks' tokens (none when the engine reports no log-probs, or
        when the trainer scores at temperature 1: its log-probs are then of another policy than
        the tempered one the engine sampled from, and ``resolve_defaults`` keeps TIS off)."""
        if roll.logprobs is None:
            if self.tis != "off":
                raise ValueError(f"--tis {self.tis}: the {roll.engine} engine reports no log-probs; pass --tis off")
            return None, {}
        if self.cfg.loss.score_temperature == "one":  # resolve_tis keeps TIS off here
            return None, {}
        mask = roll.batch.completion_mask
        w = importance_weights(old_logp, roll.logprobs, mask, mode=self.tis, cap=self.cfg.loss.tis_cap)
        sums = all_reduce_sum(mismatch_sums(old_logp, roll.logprobs, mask, w, self.cfg.loss.tis_cap), self.env)
        return w, mismatch_metrics(sums)

    def _rewards(self, problems: list[Problem], prompts: list[str], roll: Rollout) -> torch.Tensor:
        G = roll.group_size
        res = score_batch(self.reward_fn, [p for p in prompts for _ in range(G)], roll.texts,
                          [q.reference for q in problems for _ in range(G)], on_error=self.cfg.guard.reward_errors,
                          verifier=self.verifier)
        if res.errors and not self._warned_reward_errors:  # once; reward/errors counts them every step
            self._warned_reward_errors = True
            warnings.warn(f"--reward-errors zero: {len(res.errors)} row(s) scored 0, e.g. {res.errors[0]}")
        self.reward_errors += len(res.errors)
        return torch.tensor(res.values, dtype=torch.float64).view(len(problems), G)

    def _probe(self, problems: list[Problem], prompts: list[str], stop, first: int, m: dict):
        """The probe phase at ``tau_base``: this rank's probe rollout (its first prompt is the
        step's prompt ``first``), all ranks' probe rewards ``[P, Gp]``, the temperatures
        ``[P]`` (NaN when the rewards' statistics are not finite) and which prompts get a
        train group (all, unless ``--probe-filter``)."""
        cfg, ctl = self.cfg, self.controller
        Gp = cfg.rollout.probe_size or cfg.rollout.group_size
        probe = self._sample(prompts, stop, torch.full((len(problems),), cfg.controller.tau_base),
                             phase=0, first_prompt=first, group_size=Gp)
        pieces = self._gather((self._rewards(problems, prompts, probe), probe.texts))
        rewards = torch.cat([r for r, _ in pieces])
        texts = [t for _, part in pieces for t in part]
        P = rewards.shape[0]
        tau = torch.full((P,), math.nan)
        if finite(rewards.mean(1), rewards.std(1)):  # else (rewards of 1e308) the statistics overflow
            tau = ctl.probe_step(rewards, [texts[p * Gp:(p + 1) * Gp] for p in range(P)])
        keep = keep_groups(rewards, self.env.world_size) if cfg.rollout.probe_filter else torch.ones(P, dtype=torch.bool)
        m.update({"probe/reward_mean": float(rewards.mean()), "time/generate_probe": probe.seconds,
                  "probe/vote_entropy": ctl.metrics().get("probe/entropy", math.nan),
                  "probe/zero_std_frac": float((rewards.std(1) < 1e-12).double().mean()),
                  "probe/skipped_frac": float((~keep).double().mean())})
        return probe, rewards, tau, keep

    def _train_statistics(self, rewards: torch.Tensor, texts: list[str], m: dict) -> bool:
        """``--clip-from-train``: the train group's own statistics (all ranks' rewards
        ``[P, G]`` and texts, in order) go to ``probe_step`` as a probe's would, for the clip;
        its temperatures are not used. False when they are not finite (the step then skips
        its update)."""
        if not finite(rewards.mean(1), rewards.std(1)):
            return False
        G = rewards.shape[1]
        self.controller.probe_step(rewards, [texts[p * G:(p + 1) * G] for p in range(rewards.shape[0])])
        m["probe/vote_entropy"] = self.controller.metrics().get("probe/entropy", math.nan)
        return True

    def _round(self, problems: list[Problem], offset: int) -> "Round":
        """One round of sampling: ``problems`` (all ranks') are the step's prompts ``offset``
        on; this rank samples its block (the probe, then the train groups)."""
        cfg, ctl = self.cfg, self.controller
        n = len(problems)
        mine = self._block(n)
        problems = problems[mine]
        prompts, stop = self._prompts(problems)
        m: dict[str, float] = {}
        probe = probe_rewards = None
        keep = torch.ones(n, dtype=torch.bool)
        probing = cfg.draws_probe
        if probing:
            probe, probe_rewards, tau, keep = self._probe(problems, prompts, stop, offset + mine.start, m)
        else:
            tau = torch.full((n,), cfg.controller.tau_base)
        bad = not finite(tau)  # no usable probe statistics: no update this step
        if bad:
            tau = torch.full((n,), cfg.controller.tau_base)
        kept = keep[mine].nonzero().view(-1)  # this rank's prompts that get a train group
        train_problems = [problems[i] for i in kept.tolist()]
        train_prompts = [prompts[i] for i in kept.tolist()]
        # the train groups are numbered among the step's trained prompts: the same rows at any world size
        roll = self._sample(train_prompts, stop, tau[mine][kept], phase=1,
                            first_prompt=offset + int(keep[:mine.start].sum()))
        rewards = self._rewards(train_problems, train_prompts, roll)
        pieces = self._gather((rewards, roll.texts if cfg.rollout.clip_from_train else None))
        all_rewards = torch.cat([r for r, _ in pieces])
        if cfg.rollout.clip_from_train:  # the clip's statistics: the train group's own
            bad = not self._train_statistics(all_rewards, [t for _, part in pieces for t in part], m)
        # the statistics the controllers read (the next round's probe_step replaces ctl.probe)
        stats = ctl.probe if (probing or cfg.rollout.clip_from_train) and not bad else None
        return Round(n, train_problems, kept, probe, probe_rewards, tau, keep, roll, rewards, all_rewards, stats,
                     bad, m)

    def _draw(self, m: dict) -> "Draw":
        """The groups this step trains on: one round of ``--prompts-per-step`` prompts, or with
        ``--filter-groups`` rounds of fresh prompts until that many groups have rewards that
        differ (at most ``--filter-rounds``; ``agpo.learn.refill``). Sets the controller's
        probe statistics to the step's (all rounds', in order)."""
        r, W = self.cfg.rollout, self.env.world_size
        P, reuse = r.prompts_per_step, self.cfg.reuses_probe
        rounds: list[Round] = []
        useful = torch.zeros(0, dtype=torch.bool)
        while True:
            rnd = self._round(self.sampler.next(P), P * len(rounds))
            rounds.append(rnd)
            if not r.filter_groups:
                break
            useful = torch.cat([useful, informative(rnd.all_rewards, rnd.probe_rewards if reuse else None)])
            if rnd.bad or int(useful.sum()) >= P or len(rounds) >= r.filter_rounds:
                break
        owner = owners([x.size for x in rounds], W)
        keep = torch.cat([x.keep for x in rounds])
        trained = choose_trained(useful, owner, P, W) if r.filter_groups else keep
        bad = any(x.bad for x in rounds)
        parts, rewards, probes, probe_rewards, problems = [], [], [], [], []
        start = 0
        for x in rounds:
            mine = self._block(x.size)
            mask = trained[start + mine.start + x.kept]  # which of this rank's train groups are trained
            sel = mask.nonzero().view(-1)
            parts.append(x.roll if bool(mask.all()) else select_groups(x.roll, sel))
            rewards.append(x.rewards[sel])
            problems += [x.problems[i] for i in sel.tolist()]
            if reuse:
                probes.append(select_groups(x.probe, x.kept[sel]))
                probe_rewards.append(x.probe_rewards[mine][x.kept[sel]])
            start += x.size
        groups = trained.nonzero().view(-1)
        order = rank_order(owner[groups], W)
        stats = None if bad or rounds[0].stats is None else merge_probe_stats([x.stats for x in rounds])
        if stats is not None:
            self.controller.probe, self.controller.probe_used = stats, False
        m.update(_round_metrics(rounds))
        if r.filter_groups:
            m.update({"filter/rounds": len(rounds), "filter/groups": len(groups),
                      "filter/informative_frac": float(useful.double().mean())})
        return Draw(problems=problems, roll=join_rollouts(parts), rewards=torch.cat(rewards),
                    probe=join_rollouts(probes) if reuse else None,
                    probe_rewards=torch.cat(probe_rewards) if reuse else None,
                    tau=torch.cat([x.tau for x in rounds]), keep=keep, trained=trained,
                    all_rewards=torch.cat([x.all_rewards for x in rounds]),
                    all_probe_rewards=None if rounds[0].probe_rewards is None else
                    torch.cat([x.probe_rewards for x in rounds]),
                    groups=groups, order=order, mine=(owner[groups] == self.env.rank).nonzero().view(-1),
                    probe_tokens=sum(x.probe.generated_tokens for x in rounds if x.probe is not None),
                    train_tokens=sum(x.roll.generated_tokens for x in rounds),
                    sync_seconds=sum(x.roll.sync_seconds + (x.probe.sync_seconds if x.probe else 0.0) for x in rounds),
                    bad=bad, stats=stats)

    def _correct(self, problems: list[Problem], roll: Rollout, rewards: torch.Tensor) -> float:
        """Number of correct samples in this rank's rollout."""
        if self.reward_fn is correctness_reward:  # the reward is already 1.0 exactly when correct
            return float(rewards.sum())
        G = roll.group_size
        refs = [problems[i // G].reference for i in range(len(roll.texts))]
        return float(sum(correct_many(roll.texts, refs, verifier=self.verifier)))


def _round_metrics(rounds: list["Round"]) -> dict[str, float]:
    """The sampling metrics of a step's rounds: times summed, the rest averaged over the
    prompts of the rounds that have them."""
    if len(rounds) == 1:
        return rounds[0].metrics
    out = {}
    for k in {k: None for x in rounds for k in x.metrics}:
        vals = [(x.size, x.metrics[k]) for x in rounds if k in x.metrics]
        out[k] = sum(v for _, v in vals) if k.startswith("time/") else sum(n * v for n, v in vals) / sum(
            n for n, _ in vals)
    return out


@dataclass
class Round:
    """One round of a step's sampling (``SamplingPhases._round``)."""

    size: int
    """Prompts of the round, all ranks'."""
    problems: list[Problem]
    """This rank's prompts that got a train group."""
    kept: torch.Tensor
    """Long: their indices in this rank's block of the round."""
    probe: Rollout | None
    """This rank's probe rows (every prompt of its block), when the round probed."""
    probe_rewards: torch.Tensor | None
    """``[size, Gp]`` all ranks' probe rewards."""
    tau: torch.Tensor
    """``[size]`` each prompt's train temperature."""
    keep: torch.Tensor
    """Bool ``[size]``: the prompts that got a train group (all, unless ``--probe-filter``)."""
    roll: Rollout
    """This rank's train rows."""
    rewards: torch.Tensor
    """``[len(problems), G]`` their rewards."""
    all_rewards: torch.Tensor
    """``[keep.sum(), G]`` all ranks' train rewards, in order."""
    stats: ProbeStats | None
    """The statistics the controllers read (None: no probe, or not finite)."""
    bad: bool
    """The round's statistics were not finite: the step skips its update."""
    metrics: dict
    """The probe phase's metrics."""


@dataclass(kw_only=True)
class Draw:
    """The groups a step trains on (``SamplingPhases._draw``). "Step order" numbers every
    prompt the step sampled, round after round; tensors over it are all ranks'."""

    problems: list[Problem]
    """This rank's trained prompts."""
    roll: Rollout
    """Their train rows (all rounds)."""
    rewards: torch.Tensor
    """``[len(problems), G]`` their rewards."""
    probe: Rollout | None
    """With ``--probe-reuse``: their probe rows."""
    probe_rewards: torch.Tensor | None
    """With ``--probe-reuse``: ``[len(problems), Gp]`` their probe rewards."""
    tau: torch.Tensor
    """``[S]`` train temperature per sampled prompt, in step order."""
    keep: torch.Tensor
    """Bool ``[S]``: got a train group."""
    trained: torch.Tensor
    """Bool ``[S]``: its train group is learned from (of ``keep``)."""
    all_rewards: torch.Tensor
    """``[keep.sum(), G]`` every train group's rewards, in step order."""
    all_probe_rewards: torch.Tensor | None
    """``[S, Gp]`` probe rewards, in step order (None: no probe)."""
    groups: torch.Tensor
    """Long: the step positions of the trained groups (the probe statistics' indices)."""
    order: torch.Tensor
    """``rank_order`` of the trained groups: where a rank-ordered gather's entries go."""
    mine: torch.Tensor
    """This rank's trained groups' positions among all trained groups, in its order."""
    probe_tokens: int
    """Tokens this rank generated in probes (every round)."""
    train_tokens: int
    """Tokens this rank generated in train groups (every round, dropped groups included)."""
    sync_seconds: float
    """Weight-sync time of the rounds' phases."""
    bad: bool
    """No usable statistics: the step skips its update."""
    stats: ProbeStats | None
    """The statistics the controllers read (all rounds', in step order)."""
