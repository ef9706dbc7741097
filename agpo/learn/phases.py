"""The sampling phases of a step: the prompts, the engine's samples, their rewards, the
probe phase that sets the temperatures (and, with ``--probe-filter``, which prompts get a
train group; with ``--clip-from-train``, the train group's statistics in its place), and
the engine-vs-trainer log-prob correction of the train rollout.

Every phase's noise depends on (seed, step, phase, global row) only, so a run samples the
same rows at any world size. Rewards of a phase are scored in one batch
(``agpo.tasks.rewards.score_batch``: the math-verify comparisons go to the worker pool
together); with ``--reward-errors zero`` a row whose reward raised scores 0 and is counted
(``reward/errors``).

``SamplingPhases`` is a part of ``agpo.learn.trainer.Trainer``: it uses the trainer's
config, engine (and the weights version and step it samples at), tokenizer, controller,
reward function, verifier and rank helpers (``_gather``).
"""

from __future__ import annotations

import math
import warnings

import torch

from agpo.learn.probe import keep_groups
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

    def _probe(self, problems: list[Problem], prompts: list[str], stop, mine: slice, m: dict):
        """The probe phase at ``tau_base``: this rank's probe rollout, all ranks' probe
        rewards ``[P, Gp]``, the temperatures ``[P]`` (NaN when the rewards' statistics are
        not finite) and which prompts get a train group (all, unless ``--probe-filter``)."""
        cfg, ctl = self.cfg, self.controller
        Gp = cfg.rollout.probe_size or cfg.rollout.group_size
        probe = self._sample(prompts, stop, torch.full((len(problems),), cfg.controller.tau_base),
                             phase=0, first_prompt=mine.start, group_size=Gp)
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
        """``--clip-from-train``: the train group's own statistics (all ranks' groups, in
        order) go to ``probe_step`` as a probe's would, for the clip; its temperatures are not
        used. False when they are not finite (the step then skips its update)."""
        pieces = self._gather((rewards, texts))
        rewards = torch.cat([r for r, _ in pieces])
        texts = [t for _, part in pieces for t in part]
        if not finite(rewards.mean(1), rewards.std(1)):
            return False
        G = rewards.shape[1]
        self.controller.probe_step(rewards, [texts[p * G:(p + 1) * G] for p in range(rewards.shape[0])])
        m["probe/vote_entropy"] = self.controller.metrics().get("probe/entropy", math.nan)
        return True

    def _correct(self, problems: list[Problem], roll: Rollout, rewards: torch.Tensor) -> float:
        """Number of correct samples in this rank's rollout."""
        if self.reward_fn is correctness_reward:  # the reward is already 1.0 exactly when correct
            return float(rewards.sum())
        G = roll.group_size
        refs = [problems[i // G].reference for i in range(len(roll.texts))]
        return float(sum(correct_many(roll.texts, refs, verifier=self.verifier)))
