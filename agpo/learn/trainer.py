"""One AGPO training step (docs/algorithm.md#one-training-step), and the state a checkpoint needs to continue it.

``Trainer.step()``:

1. probe: G samples per prompt at ``tau_base``, rewards, ``controller.probe_step`` -> tau[P]
   (skipped when both controllers are off: plain GRPO samples at ``tau_base``; and with
   ``--clip-from-train``, whose clip reads the train group's own statistics after step 3);
2. train rollouts: G samples per prompt, all groups in one engine call (``--rollout``:
   HF ``generate`` or a colocated vLLM engine, ``agpo.rollout``), row temperature tau[p];
   with ``--filter-groups``, steps 1-2 repeat on fresh prompts until the step has
   ``--prompts-per-step`` groups whose rewards differ (``agpo.learn.refill``);
3. rewards -> group advantages; score old log-probs / entropies (and reference log-probs
   when beta > 0) with the fused forward at each row's temperature, no logits; the
   engine's own log-probs give the mismatch figures and the truncated importance weights
   (``--tis``, ``agpo.rollout.correction``);
4. per-group token-mean entropy -> ``controller.clip_step`` -> eps[P];
5. ``update_epochs`` passes of ``agpo_loss`` with eps[p] for group p's rows, micro-batched
   by a padded-token budget with gradient accumulation; one clipped AdamW step per pass;
6. re-score -> per-group step KL (``kl/step``, for every algorithm) ->
   ``controller.update_step_kl`` (when the clip controller is on); metrics, among them what
   the clip did (``agpo.learn.clipstats``).

Rewards of a phase are scored in one batch (``agpo.tasks.rewards.score_batch``: the math-verify
comparisons go to the worker pool together). Non-finite values never reach the weights or
the controllers (``agpo.runtime.guard``): an optimiser step whose loss or gradient norm is not
finite is skipped (``optim/skipped_steps``); a step whose advantages, scores or probe
statistics are not finite skips its update; the controller is restored to its state at
the start of a step that applied no optimiser step.

Micro-batch losses are scaled so their sum is the loss of the whole step: the
``token-mean`` of micro-batch ``m`` is weighted by its share of tokens, the sequence
aggregations by their share of sequences (Dr. GRPO's normaliser is the completion cap).

``Trainer`` holds the state and runs the step; its parts live where a reader looks for
them: the sampling phases and the probe in ``agpo.learn.phases`` (the refill rounds in
``agpo.learn.refill``), scoring and the update in ``agpo.learn.update``, the token-budget
LR and stop rule in ``agpo.learn.schedule``, the metric helpers in ``agpo.learn.metrics``.
"""

from __future__ import annotations

import time

import torch

from agpo.algo.controllers import AGPOController, step_kl
from agpo.algo.stats import VOTE_KEYS, group_vote_entropy
from agpo.learn.heldout import evaluate_held_out
from agpo.learn.metrics import (TIME_KEYS, VERIFIER_KEYS, clamp_shares, group_rows, group_stats, group_token_mean,
                                verifier_delta)
from agpo.learn.phases import SamplingPhases
from agpo.learn.probe import reuse_advantages, with_probe
from agpo.learn.refill import in_step_order
from agpo.learn.schedule import PromptSampler, TokenBudgetSchedule, lr_lambda
from agpo.learn.update import UpdatePass, scoring_batch
from agpo.rollout import make_engine
from agpo.rollout.correction import resolve_tis
from agpo.runtime import checkpoint as ckpt
from agpo.runtime.guard import StepGuard, finite
from agpo.scale.distributed import DistEnv, all_reduce_sum, gather_objects
from agpo.scale.parallel import prepare_layout
from agpo.tasks.data import Problem, uses_chat_template
from agpo.tasks.rewards import DEFAULT_VERIFIER, load_reward

__all__ = ["TIME_KEYS", "VERIFIER_KEYS", "Trainer", "scoring_batch"]


class Trainer(SamplingPhases, UpdatePass, TokenBudgetSchedule):
    """Holds the policy layout, optimiser, controller and data position; ``step()`` runs one
    step. Under torchrun every rank builds one and calls the same methods in the same order:
    each takes a contiguous block of the step's prompts (groups stay whole on one rank), and
    the controllers run on the gathered, global batch, so every rank holds the same state."""

    def __init__(self, cfg, model, tokenizer, train_problems: list[Problem], *, ref_model=None,
                 env: DistEnv | None = None, compute_dtype: torch.dtype | None = None, weights=None,
                 ref_weights=None):
        self.cfg = cfg
        self.env = env or DistEnv(0, 1, 0, next(model.parameters()).device)
        if cfg.rollout.prompts_per_step % self.env.world_size:
            raise ValueError(f"--prompts-per-step {cfg.rollout.prompts_per_step}: must be a multiple of the world "
                             f"size {self.env.world_size} (each rank takes whole groups)")
        if cfg.loss.beta > 0 and ref_model is None and cfg.model.lora_rank == 0:
            raise ValueError("--beta > 0 needs a reference model")
        self.layout = prepare_layout(cfg, model, self.env, ref_model=ref_model, compute_dtype=compute_dtype,
                                     weights=weights, ref_weights=ref_weights)
        self.model, self.tokenizer = self.layout.model, tokenizer
        self.policy = self.layout.policy
        self.device = self.env.device
        self.controller = AGPOController(cfg.controller)
        self.sampler = PromptSampler(train_problems, cfg.run.seed)
        self.reward_fn = load_reward(cfg.rollout.reward)
        g = cfg.guard
        self.verifier = DEFAULT_VERIFIER.configure(workers=g.verifier_workers, timeout=g.verifier_timeout,
                                                   batch_timeout=g.verifier_batch_timeout)
        self.guard = StepGuard(g.max_skipped_steps)
        self.reward_errors = 0  # rows of this step scored 0 by --reward-errors zero
        self._warned_reward_errors = False
        self.optimizer = torch.optim.AdamW(self.layout.trainable_parameters(), lr=cfg.optim.lr,
                                           weight_decay=cfg.optim.weight_decay,
                                           betas=(cfg.optim.adam_beta1, cfg.optim.adam_beta2))
        total = cfg.run.steps * cfg.optim.update_epochs
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda(total, cfg.optim.warmup_ratio, cfg.optim.schedule, cfg.optim.min_lr_ratio))
        self.step_count = 0
        self.tokens_generated = 0
        self.last_step_tokens = 0
        self.last_groups: list[dict] = []
        """The last step's per-group rows (``--dump-groups``; ``agpo.learn.metrics.group_rows``)."""
        self.budget_lr: float | None = None  # the LR of the last optimiser step under --token-budget
        """Tokens generated (all ranks, probe included) by the last step: the budget's stop
        rule, and the schedule's clock during an update (``budget_lr``)."""
        self.chat = uses_chat_template(tokenizer)
        self.engine = make_engine(cfg, self.layout, tokenizer, dtype=compute_dtype or next(model.parameters()).dtype)
        self.tis = resolve_tis(cfg.loss.tis, self.engine.name, cfg.loss.score_temperature)
        self.weights_version = 0
        """Optimiser steps taken (and checkpoints loaded): an engine with its own copy of the
        weights re-syncs when the version it holds differs."""

    # -- ranks -------------------------------------------------------------------------
    def _block(self, n: int) -> slice:
        """This rank's contiguous share of ``n`` items (``n`` divisible by the world size)."""
        per = n // self.env.world_size
        return slice(self.env.rank * per, (self.env.rank + 1) * per)

    def _gather(self, obj) -> list:
        return gather_objects(obj, self.env)

    def _cat(self, t: torch.Tensor) -> torch.Tensor:
        """Rank blocks of ``t`` (dim 0) joined in rank order: the global tensor."""
        return torch.cat(self._gather(t.cpu())) if self.env.distributed else t

    def _same_count(self, groups: list) -> list:
        """Pad this rank's micro-batch list to the largest count over ranks with ``None``:
        every forward/backward of a sharded model is collective."""
        if not self.env.distributed:
            return groups
        most = max(self._gather(len(groups)))
        return groups + [None] * (most - len(groups))

    def _any_rank(self, flag: bool) -> bool:
        """Whether ``flag`` is set on any rank (one small all-reduce under torchrun)."""
        if self.env.distributed:
            return all_reduce_sum({"flag": float(flag)}, self.env)["flag"] > 0
        return bool(flag)

    # -- the step ----------------------------------------------------------------------
    def step(self) -> dict[str, float]:
        cfg, ctl, G = self.cfg, self.controller, self.cfg.rollout.group_size
        t_step = time.perf_counter()
        self.guard.begin(ctl)
        verified0, self.reward_errors = self.verifier.stats.snapshot(), 0
        m: dict[str, float] = {}
        d = self._draw(m)  # the same prompts on every rank; each samples its block of them
        bad, stats, roll, rewards = d.bad, d.stats, d.roll, d.rewards
        self.engine.idle()  # no rollout before the update: a colocated engine frees its memory
        self.last_step_tokens = int(all_reduce_sum({"t": float(d.probe_tokens + d.train_tokens)}, self.env)["t"])
        trained, n_train = roll, roll.batch.rows  # the rows the update learns from; the train group's first
        if cfg.reuses_probe:
            trained = with_probe(roll, d.probe)
            adv = reuse_advantages(ctl.advantages, rewards, d.probe_rewards)
        else:
            adv = ctl.advantages(rewards).reshape(-1)
        batch = scoring_batch(trained.batch, cfg.loss.score_temperature)

        t0 = time.perf_counter()
        ent_t = 1.0 if cfg.controller.entropy_temperature == "one" else None
        old_logp, ent = self.score(self.policy, batch, entropy_temperature=ent_t)
        ref_logp = None
        if cfg.loss.beta > 0:
            with self.layout.reference() as ref:
                ref_logp = self.score(ref, batch)[0]
        t_score = time.perf_counter() - t0
        on = batch.completion_mask.bool()
        train_mask = batch.completion_mask[:n_train]
        bad = self._any_rank(bad or not finite(adv, old_logp[on], ent[on], None if ref_logp is None else ref_logp[on]))
        groups = d.groups  # the prompts trained this step, in step order
        if bad:
            eps = torch.full((len(groups),), cfg.controller.eps_base)
        else:  # the controller's entropy is the train group's, as in the paper
            ent_groups = in_step_order(self._cat(group_token_mean(ent[:n_train], train_mask, G)), d.order)
            eps = ctl.clip_step(ent_groups, groups=groups.tolist())
        is_weight, mismatch = self._correction(trained, old_logp)
        m.update(mismatch)

        t0 = time.perf_counter()
        if bad:
            m.update(self._skip_update(ref_logp is not None))
        else:
            eps_mine = eps[d.mine]
            eps_rows = eps_mine.repeat_interleave(G)
            if cfg.reuses_probe:
                eps_rows = torch.cat([eps_rows, eps_mine.repeat_interleave(d.probe.group_size)])
            m.update(self.update(batch, adv, eps_rows, old_logp, ref_logp, is_weight))
        t_update = time.perf_counter() - t0
        applied = cfg.optim.update_epochs - m["optim/skipped_steps"]
        kl = float("nan")  # measured for every algorithm; only the clip controller feeds on it
        if applied:
            new_logp, _ = self.score(self.policy, batch)
            kl_groups = in_step_order(self._cat(group_token_mean((old_logp - new_logp)[:n_train], train_mask, G)),
                                      d.order)
            if finite(kl_groups):
                kl = ctl.update_step_kl(kl_groups) if cfg.controller.adaptive_clip else step_kl(kl_groups)
        m["kl/step"] = kl
        if cfg.controller.adaptive_clip:
            m["kl/step_ema"] = ctl.step_kl_ema
        self.guard.end(ctl, applied)  # the controller does not advance on a step that applied nothing

        self.step_count += 1
        mask = train_mask
        local = {"rewards": rewards, "lengths": roll.lengths, "texts": roll.texts,
                 "entropy": float((ent[:n_train] * mask).sum()), "scored": float(mask.sum()),
                 "probe_tokens": d.probe_tokens, "train_tokens": d.train_tokens,
                 "correct": self._correct(d.problems, roll, rewards), "reward_errors": self.reward_errors,
                 "verifier": verifier_delta(self.verifier.stats.snapshot(), verified0)}
        parts = self._gather(local)
        rewards = torch.cat([q["rewards"] for q in parts])
        lengths = torch.cat([q["lengths"] for q in parts]).float()
        texts = [t for q in parts for t in q["texts"]]
        scored = sum(q["scored"] for q in parts)
        probe_tokens = sum(q["probe_tokens"] for q in parts)
        train_tokens = sum(q["train_tokens"] for q in parts)
        gen_tokens = probe_tokens + train_tokens
        self.tokens_generated += gen_tokens
        zero_std = rewards.std(1) < 1e-12
        gen_s = roll.seconds + m.get("time/generate_probe", 0.0)
        local_scored = float(mask.sum())
        m.update({"reward/mean": float(rewards.mean()), "reward/std": float(rewards.std()),
                  "reward/accuracy": sum(q["correct"] for q in parts) / rewards.numel(),
                  "reward/zero_std_frac": float(zero_std.float().mean()),
                  **group_stats("eps", eps), **group_stats("tau", d.tau[d.trained]),
                  **self._clamp_shares(d.tau[d.trained], eps),
                  **ctl.metrics(),
                  "policy/entropy": sum(q["entropy"] for q in parts) / max(scored, 1.0),
                  "response/length": float(lengths.mean()), "response/length_max": float(lengths.max()),
                  "tokens/generated_probe": probe_tokens, "tokens/generated_train": train_tokens,
                  "tokens/generated_total": self.tokens_generated,
                  "time/generate": roll.seconds, "time/weight_sync": d.sync_seconds,
                  "time/score": t_score, "time/update": t_update,
                  "time/step": time.perf_counter() - t_step,
                  # throughput: all ranks' tokens over this rank's (rank 0's, when logged) seconds
                  "perf/generate_tokens_per_s": gen_tokens / max(gen_s, 1e-9),
                  "perf/score_tokens_per_s": scored * (2 if cfg.loss.beta > 0 else 1) / max(t_score, 1e-9),
                  "perf/update_tokens_per_s": scored * cfg.optim.update_epochs / max(t_update, 1e-9)})
        m["perf/tokens_per_s"] = gen_tokens / max(m["time/step"], 1e-9)
        m["reward/errors"] = sum(q["reward_errors"] for q in parts)
        for k in VERIFIER_KEYS:
            m[f"verifier/{k}"] = sum(q["verifier"][k] for q in parts)
        if self.env.distributed:
            m["perf/rank_tokens_scored"] = local_scored
        if not (cfg.controller.needs_probe or cfg.rollout.clip_from_train):
            keys = VOTE_KEYS[cfg.controller.vote_keys]
            groups_texts = [texts[p * G:(p + 1) * G] for p in range(len(texts) // G)]
            m["probe/vote_entropy"] = float(group_vote_entropy(groups_texts, keys).mean())
        if cfg.run.dump_groups:
            self.last_groups = group_rows(self.step_count, d.all_rewards, d.tau, eps, d.keep, d.all_probe_rewards,
                                          stats, trained=d.trained)
        return m

    def _clamp_shares(self, tau: torch.Tensor, eps: torch.Tensor) -> dict[str, float]:
        """Share of the step's groups whose tau / eps sits at a clamp of its controller
        (``agpo.learn.metrics.clamp_shares``)."""
        return clamp_shares(tau, eps, self.cfg.controller)

    def evaluate(self, problems: list[Problem]) -> dict:
        """Greedy held-out accuracy of the current policy (``agpo.learn.heldout``)."""
        return evaluate_held_out(self, problems)

    # -- checkpoint state --------------------------------------------------------------
    def state_dict(self) -> dict:
        """Everything but the weights and optimiser state (those go to the sharded checkpoint)."""
        return {"scheduler": self.scheduler.state_dict(), "controller": self.controller.state_dict(),
                "sampler": self.sampler.state_dict(), "step": self.step_count,
                "tokens_generated": self.tokens_generated, "last_step_tokens": self.last_step_tokens,
                "skipped_in_a_row": self.guard.skipped_in_a_row}

    def load_state_dict(self, state: dict) -> None:
        self.scheduler.load_state_dict(state["scheduler"])
        self.controller.load_state_dict(state["controller"])
        self.sampler.load_state_dict(state["sampler"])
        self.step_count = int(state["step"])
        self.tokens_generated = int(state["tokens_generated"])
        self.last_step_tokens = int(state.get("last_step_tokens", 0))
        self.guard.skipped_in_a_row = int(state.get("skipped_in_a_row", 0))

    def save_checkpoint(self, run_dir, extra: dict, *, keep: int):
        """Checkpoint of this step: sharded weights + optimiser, ``state_dict()`` and ``extra``."""
        return ckpt.save_checkpoint(run_dir, self.step_count, self.policy, self.optimizer,
                                    {"trainer": self.state_dict(), **extra}, keep=keep,
                                    trainable_only=self.layout.lora, env=self.env)

    def load_checkpoint(self, path, state: dict) -> None:
        """Continue from checkpoint ``path`` (its ``trainer_state.pt`` already read into ``state``)."""
        ckpt.load_weights(path, self.policy, self.optimizer, trainable_only=self.layout.lora)
        self.weights_version += 1  # new weights: an engine holding a copy must reload them
        self.load_state_dict(state["trainer"])

    def close(self) -> None:
        """Free the rollout engine."""
        self.engine.close()
