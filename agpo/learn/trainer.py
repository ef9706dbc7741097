"""One AGPO training step (docs/algorithm.md#one-training-step), and the state a checkpoint needs to continue it.

``Trainer.step()``:

1. probe: G samples per prompt at ``tau_base``, rewards, ``controller.probe_step`` -> tau[P]
   (skipped when both controllers are off: plain GRPO samples at ``tau_base``);
2. train rollouts: G samples per prompt, all groups in one engine call (``--rollout``:
   HF ``generate`` or a colocated vLLM engine, ``agpo.rollout``), row temperature tau[p];
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
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import replace

import torch

from agpo.algo.controllers import AGPOController, step_kl
from agpo.algo.stats import VOTE_KEYS, group_vote_entropy
from agpo.learn.batches import SequenceBatch
from agpo.learn.clipstats import ClipTally, clip_counts
from agpo.learn.heldout import evaluate_held_out
from agpo.learn.packing import micro_batches, pack, processed_tokens
from agpo.learn.policy import Policy
from agpo.learn.probe import keep_groups, reuse_advantages, select_groups, with_probe
from agpo.learn.schedule import PromptSampler, budget_allows, budget_lr, lr_lambda
from agpo.rollout import Rollout, make_engine
from agpo.rollout.correction import (
    importance_weights,
    mismatch_metrics,
    mismatch_sums,
    resolve_tis,
)
from agpo.runtime import checkpoint as ckpt
from agpo.runtime.guard import StepGuard, finite
from agpo.scale.distributed import DistEnv, all_reduce_sum, gather_objects
from agpo.scale.parallel import prepare_layout
from agpo.tasks.data import Problem, format_prompt, uses_chat_template
from agpo.tasks.evaluate import PLAIN_STOP
from agpo.tasks.rewards import (
    DEFAULT_VERIFIER,
    correct_many,
    correctness_reward,
    load_reward,
    score_batch,
)

TIME_KEYS = ("time/", "perf/")
"""Metric prefixes that depend on the machine's speed (left out of reproducibility checks)."""
VERIFIER_KEYS = ("calls", "timeouts", "errors", "oversized", "unavailable")
"""math-verify counters logged per step as ``verifier/<key>`` (summed over ranks)."""


def _delta(after: dict, before: dict) -> dict:
    return {k: after[k] - before[k] for k in VERIFIER_KEYS}


def scoring_batch(batch: SequenceBatch, score_temperature: str) -> SequenceBatch:
    """The batch the loss and the scoring passes see: the rows at their sampling
    temperatures (``sample``) or all at temperature 1 (``one``, the paper's code)."""
    if score_temperature == "one":
        return replace(batch, temperature=torch.ones_like(batch.temperature))
    return batch


def _group_token_mean(values: torch.Tensor, mask: torch.Tensor, group_size: int) -> torch.Tensor:
    """Token-mean of ``values [R, C]`` over each group's masked tokens -> ``[R // G]``."""
    m = mask.float()
    num = (values * m).sum(1).view(-1, group_size).sum(1)
    den = m.sum(1).view(-1, group_size).sum(1).clamp(min=1)
    return num / den


def _stats(prefix: str, t: torch.Tensor) -> dict[str, float]:
    """Mean, spread and range of a per-group controller output over the step's groups."""
    t = t.double()
    sd = float(t.std()) if t.numel() > 1 else 0.0
    return {f"{prefix}/mean": float(t.mean()), f"{prefix}/sd": sd, f"{prefix}/min": float(t.min()),
            f"{prefix}/max": float(t.max())}


class Trainer:
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

    # -- phases ------------------------------------------------------------------------
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

    def _any_rank(self, flag: bool) -> bool:
        """Whether ``flag`` is set on any rank (one small all-reduce under torchrun)."""
        if self.env.distributed:
            return all_reduce_sum({"flag": float(flag)}, self.env)["flag"] > 0
        return bool(flag)

    @torch.no_grad()
    def score(self, policy: Policy, batch: SequenceBatch, *,
              entropy_temperature: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token ``(logp, entropy)`` ``[R, C]`` of a rollout batch, micro-batched; the
        entropy at ``entropy_temperature`` when given, else at the batch's temperatures."""
        logp = torch.zeros(batch.completion_ids.shape, dtype=torch.float32)
        ent = torch.zeros_like(logp)
        groups = micro_batches(batch, 2 * self.cfg.optim.micro_batch_tokens, packed=self.cfg.optim.packing)
        for idx in self._same_count(groups):
            inp, _ = self._micro(batch, groups[0] if idx is None else idx)
            lp, h = policy(inp, entropy_temperature=entropy_temperature)
            if idx is not None:
                C = lp.shape[1]
                logp[idx, :C], ent[idx, :C] = lp.float().cpu(), h.float().cpu()
        self.layout.release()
        return logp, ent

    def _micro(self, batch: SequenceBatch, idx: torch.Tensor, **per_token):
        """Micro-batch ``idx`` as the policy takes it (packed padding-free, or padded rows
        trimmed to their widths) on the device, and the given per-token ``[R, C]`` tensors
        (None stays None) in the same layout."""
        mb = batch.select(idx)
        if self.cfg.optim.packing:
            inp = pack(mb)
            layout = lambda t: inp.flat(t[idx])
        else:
            inp, C = mb, mb.completion_ids.shape[1]
            layout = lambda t: t[idx][:, :C]
        return inp.to(self.device), {k: None if t is None else layout(t).to(self.device) for k, t in per_token.items()}

    def _share(self, batch: SequenceBatch, idx: torch.Tensor, total: dict[str, float]) -> float:
        """Micro-batch ``idx``'s weight in the global loss: its share of all ranks' tokens
        (token-mean) or sequences (the sequence aggregations)."""
        if self.cfg.loss.loss_agg == "token-mean":
            return float(batch.completion_mask[idx].sum()) / max(1.0, total["tokens"])
        return len(idx) / total["rows"]

    def update(self, batch: SequenceBatch, adv: torch.Tensor, eps: torch.Tensor, old_logp: torch.Tensor,
               ref_logp: torch.Tensor | None, is_weight: torch.Tensor | None = None) -> dict[str, float]:
        """``update_epochs`` optimiser steps on one rollout batch; per-row ``adv``, ``eps``;
        per-token truncated importance weights ``is_weight`` (None: 1)."""
        cfg, world = self.cfg, self.env.world_size
        self.policy.train()
        groups = micro_batches(batch, cfg.optim.micro_batch_tokens, packed=cfg.optim.packing)
        n_real, n_processed = processed_tokens(batch, groups, packed=cfg.optim.packing)
        total = all_reduce_sum({"tokens": float(batch.completion_mask.sum()), "rows": float(batch.rows),
                                "real": float(n_real), "processed": float(n_processed)}, self.env)
        sums = {"kl_mean": 0.0}
        tally = ClipTally(cfg.optim.update_epochs)
        c = cfg.controller
        base = dict(base_low=c.eps_base, base_high=c.eps_base + cfg.loss.eps_high_offset, dual_clip=cfg.loss.dual_clip)
        C = batch.completion_ids.shape[1]
        per_tok = lambda t: t.float()[:, None].expand(-1, C)
        losses, norms, skipped = [], [], 0
        for epoch in range(cfg.optim.update_epochs):
            self.optimizer.zero_grad(set_to_none=True)
            epoch_loss = 0.0
            for idx in self._same_count(groups):
                real = idx is not None
                idx = idx if real else groups[0]  # a zero-weight pass keeps the ranks' collectives paired
                inp, tok = self._micro(batch, idx, old_logp=old_logp, ref_logp=ref_logp, is_weight=is_weight,
                                       adv=per_tok(adv), eps=per_tok(eps), mask=batch.completion_mask)
                args = dict(advantages=adv[idx].to(self.device), old_logp=tok["old_logp"],
                            eps_low=eps[idx].to(self.device), eps_high=(eps[idx] + cfg.loss.eps_high_offset).to(self.device),
                            beta=cfg.loss.beta, kl_estimator=cfg.loss.kl_estimator,
                            entropy_coef=cfg.loss.entropy_coef, dual_clip=cfg.loss.dual_clip,
                            loss_agg=cfg.loss.loss_agg, max_len=cfg.rollout.max_new_tokens)
                if tok["ref_logp"] is not None:
                    args["ref_logp"] = tok["ref_logp"]
                if tok["is_weight"] is not None:
                    args["is_weight"] = tok["is_weight"]
                loss, m = self.policy(inp, args)
                w = self._share(batch, idx, total) if real else 0.0
                (loss * (w * world)).backward()  # FSDP averages gradients over ranks
                if real:
                    epoch_loss += float(loss.detach()) * w
                    share = float(batch.completion_mask[idx].sum()) / max(1.0, total["tokens"]) / cfg.optim.update_epochs
                    sums["kl_mean"] += float(m["kl_mean"]) * share
                    eps_t = tok["eps"]
                    tally.add(epoch, clip_counts(m["logp"], tok["old_logp"], tok["adv"], eps_t,
                                                 eps_t + cfg.loss.eps_high_offset, tok["mask"], **base))
            clip = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else float("inf")
            norm = torch.nn.utils.clip_grad_norm_([p for p in self.optimizer.param_groups[0]["params"]
                                                   if p.grad is not None], clip)
            norms.append(float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm))
            applied = not self._any_rank(not finite(epoch_loss, norms[-1]))  # the loss is this rank's
            if applied:
                if cfg.run.token_budget:  # the schedule's clock is the budget (agpo.learn.schedule.budget_lr)
                    self._set_budget_lr(epoch)
                self.optimizer.step()
                self.weights_version += 1
                self.scheduler.step()  # under a budget only its count matters (resume without one)
            else:  # a non-finite step: nothing of it is applied (nor counted by the LR schedule)
                skipped += 1
                tally.drop(epoch)
                self.optimizer.zero_grad(set_to_none=True)
            self.guard.record(applied)
            losses.append(epoch_loss)
        self.optimizer.zero_grad(set_to_none=True)
        self.policy.eval()
        sums = all_reduce_sum({**sums, **tally.flat(), **{f"loss{i}": v for i, v in enumerate(losses)}}, self.env)
        tally.load_flat(sums)
        losses = [sums[f"loss{i}"] for i in range(len(losses))]
        out = {"loss/policy": losses[0], "loss/policy_last": losses[-1], **tally.summary(),
               "optim/grad_norm": sum(norms) / len(norms),
               "update/real_tokens": total["real"] * cfg.optim.update_epochs,
               "update/processed_tokens": total["processed"] * cfg.optim.update_epochs,
               "optim/lr": self._lr(), "optim/skipped_steps": skipped}
        if ref_logp is not None:
            out["kl/ref"] = sums["kl_mean"]
        return out

    def _lr(self) -> float:
        """The learning rate of the last optimiser step (under a token budget) or of the next."""
        if self.cfg.run.token_budget and self.budget_lr is not None:
            return self.budget_lr
        return self.scheduler.get_last_lr()[0]

    def _set_budget_lr(self, epoch: int) -> None:
        """Each parameter group's LR for optimiser step ``epoch`` of this step, from the share
        of ``--token-budget`` generated when it starts (this step's tokens spread evenly over
        its epochs)."""
        o, budget, E = self.cfg.optim, self.cfg.run.token_budget, self.cfg.optim.update_epochs
        share = self.last_step_tokens / E / budget
        spent = self.tokens_generated / budget + epoch * share
        mult = budget_lr(spent, share, o.warmup_ratio, o.schedule, o.min_lr_ratio)
        for g in self.optimizer.param_groups:
            g["lr"] = g["initial_lr"] * mult
        self.budget_lr = self.optimizer.param_groups[0]["lr"]

    def budget_allows_step(self) -> bool:
        """Whether ``--token-budget`` (if any) leaves room for another step (``budget_allows``)."""
        budget = self.cfg.run.token_budget
        return not budget or budget_allows(self.tokens_generated, self.last_step_tokens, budget)

    def _skip_update(self, with_ref: bool) -> dict[str, float]:
        """``update``'s metrics for a step whose inputs were not finite: every optimiser
        step of it is skipped."""
        for _ in range(self.cfg.optim.update_epochs):
            self.guard.record(False)
        nan = float("nan")
        out = {"loss/policy": nan, "loss/policy_last": nan, **dict.fromkeys(ClipTally(1).summary(), nan),
               "optim/grad_norm": nan, "optim/lr": self._lr(),
               "optim/skipped_steps": self.cfg.optim.update_epochs}
        if with_ref:
            out["kl/ref"] = nan
        return out

    # -- the step ----------------------------------------------------------------------
    def step(self) -> dict[str, float]:
        cfg, ctl, G = self.cfg, self.controller, self.cfg.rollout.group_size
        t_step = time.perf_counter()
        self.guard.begin(ctl)
        verified0, self.reward_errors = self.verifier.stats.snapshot(), 0
        problems = self.sampler.next(cfg.rollout.prompts_per_step)  # the same list on every rank
        P = len(problems)
        mine = self._block(P)
        problems = problems[mine]
        prompts, stop = self._prompts(problems)
        m: dict[str, float] = {}
        probe, probe_rewards, sync_s = None, None, 0.0
        keep = torch.ones(P, dtype=torch.bool)
        if cfg.controller.needs_probe:
            probe, probe_rewards, tau, keep = self._probe(problems, prompts, stop, mine, m)
            sync_s += probe.sync_seconds
        else:
            tau = torch.full((P,), cfg.controller.tau_base)
        bad = not finite(tau)  # no usable probe statistics: no update this step
        if bad:
            tau = torch.full((P,), cfg.controller.tau_base)
        kept = keep[mine].nonzero().view(-1)  # this rank's prompts that get a train group
        train_problems = [problems[i] for i in kept.tolist()]
        train_prompts = [prompts[i] for i in kept.tolist()]
        # the train groups are numbered among the step's trained prompts: the same rows at any world size
        roll = self._sample(train_prompts, stop, tau[mine][kept], phase=1, first_prompt=int(keep[:mine.start].sum()))
        self.engine.idle()  # no rollout before the update: a colocated engine frees its memory
        probe_tokens = probe.generated_tokens if probe is not None else 0
        self.last_step_tokens = int(all_reduce_sum({"t": float(probe_tokens + roll.generated_tokens)}, self.env)["t"])
        rewards = self._rewards(train_problems, train_prompts, roll)
        trained, n_train = roll, roll.batch.rows  # the rows the update learns from; the train group's first
        if cfg.rollout.probe_reuse:
            from_probe = select_groups(probe, kept)
            trained = with_probe(roll, from_probe)
            adv = reuse_advantages(ctl.advantages, rewards, probe_rewards[mine][kept])
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
        groups = keep.nonzero().view(-1)  # the global prompts trained this step
        if bad:
            eps = torch.full((len(groups),), cfg.controller.eps_base)
        else:  # the controller's entropy is the train group's, as in the paper
            eps = ctl.clip_step(self._cat(_group_token_mean(ent[:n_train], train_mask, G)), groups=groups.tolist())
        is_weight, mismatch = self._correction(trained, old_logp)
        m.update(mismatch)

        t0 = time.perf_counter()
        if bad:
            m.update(self._skip_update(ref_logp is not None))
        else:
            first = int(keep[:mine.start].sum())  # this rank's groups start there among the trained ones
            eps_mine = eps[first:first + len(kept)]
            eps_rows = eps_mine.repeat_interleave(G)
            if cfg.rollout.probe_reuse:
                eps_rows = torch.cat([eps_rows, eps_mine.repeat_interleave(probe.group_size)])
            m.update(self.update(batch, adv, eps_rows, old_logp, ref_logp, is_weight))
        t_update = time.perf_counter() - t0
        applied = cfg.optim.update_epochs - m["optim/skipped_steps"]
        kl = float("nan")  # measured for every algorithm; only the clip controller feeds on it
        if applied:
            new_logp, _ = self.score(self.policy, batch)
            kl_groups = self._cat(_group_token_mean((old_logp - new_logp)[:n_train], train_mask, G))
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
                 "probe_tokens": probe_tokens, "train_tokens": roll.generated_tokens,
                 "correct": self._correct(train_problems, roll, rewards), "reward_errors": self.reward_errors,
                 "verifier": _delta(self.verifier.stats.snapshot(), verified0)}
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
                  **_stats("eps", eps), **_stats("tau", tau[keep]), **self._clamp_shares(tau[keep], eps),
                  **ctl.metrics(),
                  "policy/entropy": sum(q["entropy"] for q in parts) / max(scored, 1.0),
                  "response/length": float(lengths.mean()), "response/length_max": float(lengths.max()),
                  "tokens/generated_probe": probe_tokens, "tokens/generated_train": train_tokens,
                  "tokens/generated_total": self.tokens_generated,
                  "time/generate": roll.seconds, "time/weight_sync": sync_s + roll.sync_seconds,
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
        if not cfg.controller.needs_probe:
            keys = VOTE_KEYS[cfg.controller.vote_keys]
            m["probe/vote_entropy"] = float(group_vote_entropy([texts[p * G:(p + 1) * G] for p in range(P)], keys).mean())
        return m

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

    def _clamp_shares(self, tau: torch.Tensor, eps: torch.Tensor) -> dict[str, float]:
        """Share of the step's groups whose tau / eps sits at a clamp of its controller (a
        controller pinned at a clamp has stopped responding)."""
        c = self.cfg.controller
        at = lambda t, v: float((t.double() - v).abs().le(1e-6 * max(1.0, abs(v))).double().mean())
        return {"tau/at_max": at(tau, c.tau_max), "tau/at_min": at(tau, c.tau_min),
                "eps/at_max": at(eps, c.eps_max), "eps/at_min": at(eps, c.eps_min)}

    def _correct(self, problems: list[Problem], roll: Rollout, rewards: torch.Tensor) -> float:
        """Number of correct samples in this rank's rollout."""
        if self.reward_fn is correctness_reward:  # the reward is already 1.0 exactly when correct
            return float(rewards.sum())
        G = roll.group_size
        refs = [problems[i // G].reference for i in range(len(roll.texts))]
        return float(sum(correct_many(roll.texts, refs, verifier=self.verifier)))

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
