"""One AGPO training step (SPEC section 1), and the state a checkpoint needs to continue it.

``Trainer.step()``:

1. probe: G samples per prompt at ``tau_base``, rewards, ``controller.probe_step`` -> tau[P]
   (skipped when both controllers are off: plain GRPO samples at ``tau_base``);
2. train rollouts: G samples per prompt, all groups in one ``generate`` call, row
   temperature tau[p];
3. rewards -> group advantages; score old log-probs / entropies (and reference log-probs
   when beta > 0) with the fused forward at each row's temperature, no logits;
4. per-group token-mean entropy -> ``controller.clip_step`` -> eps[P];
5. ``update_epochs`` passes of ``agpo_loss`` with eps[p] for group p's rows, micro-batched
   by a padded-token budget with gradient accumulation; one clipped AdamW step per pass;
6. re-score -> per-group step KL -> ``controller.update_step_kl`` (when the clip
   controller is on); metrics.

Micro-batch losses are scaled so their sum is the loss of the whole step: the
``token-mean`` of micro-batch ``m`` is weighted by its share of tokens, the sequence
aggregations by their share of sequences (Dr. GRPO's normaliser is the completion cap).
"""

from __future__ import annotations

import math
import random
import time

import torch

from agpo.controllers import AGPOController
from agpo.data import Problem, format_prompt, uses_chat_template
from agpo.eval import PLAIN_STOP
from agpo.policy import Policy, SequenceBatch
from agpo.rewards import correctness_reward, is_correct, load_reward, score
from agpo.rollout import Rollout, sample_groups
from agpo.stats import group_vote_entropy

TIME_KEYS = ("time/", "perf/")
"""Metric prefixes that depend on the machine's speed (left out of reproducibility checks)."""


class PromptSampler:
    """Shuffled passes over the train problems; its position is checkpointed."""

    def __init__(self, problems: list[Problem], seed: int):
        if not problems:
            raise ValueError("train problems: empty")
        self.problems, self.seed, self.epoch, self.pos = problems, seed, 0, 0
        self._order = self._permutation()

    def _permutation(self) -> list[int]:
        order = list(range(len(self.problems)))
        random.Random(f"agpo-prompts-{self.seed}-{self.epoch}").shuffle(order)
        return order

    def next(self, n: int) -> list[Problem]:
        out = []
        while len(out) < n:
            if self.pos == len(self._order):
                self.epoch, self.pos = self.epoch + 1, 0
                self._order = self._permutation()
            out.append(self.problems[self._order[self.pos]])
            self.pos += 1
        return out

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.pos = int(state["epoch"]), int(state["pos"])
        self._order = self._permutation()


def lr_lambda(total: int, warmup_ratio: float, schedule: str, min_ratio: float):
    """LR multiplier per optimiser step: linear warm-up, then constant / linear / cosine."""
    warm = int(round(total * warmup_ratio))

    def f(i: int) -> float:
        if i < warm:
            return (i + 1) / warm
        if schedule == "constant":
            return 1.0
        frac = min(1.0, (i - warm) / max(1, total - warm))
        if schedule == "linear":
            return 1.0 - (1.0 - min_ratio) * frac
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * frac))
    return f


def micro_batches(batch: SequenceBatch, max_tokens: int) -> list[torch.Tensor]:
    """Row-index groups whose padded size ``rows x (prompt + completion width)`` stays within
    ``max_tokens`` (a single longer row gets a micro-batch of its own); rows are sorted by
    length so padding stays small."""
    plen = batch.prompt_mask.sum(1)
    clen = batch.completion_mask.sum(1)
    order = torch.argsort(plen + clen, descending=True, stable=True).tolist()
    groups, cur, wp, wc = [], [], 0, 0
    for i in order:
        np_, nc = max(wp, int(plen[i])), max(wc, int(clen[i]))
        if cur and (len(cur) + 1) * (np_ + nc) > max_tokens:
            groups.append(torch.tensor(cur))
            cur, np_, nc = [], int(plen[i]), int(clen[i])
        cur.append(i)
        wp, wc = np_, nc
    if cur:
        groups.append(torch.tensor(cur))
    return groups


def _cols(t: torch.Tensor, width: int) -> torch.Tensor:
    return t[:, :width]


def _group_token_mean(values: torch.Tensor, mask: torch.Tensor, group_size: int) -> torch.Tensor:
    """Token-mean of ``values [R, C]`` over each group's masked tokens -> ``[R // G]``."""
    m = mask.float()
    num = (values * m).sum(1).view(-1, group_size).sum(1)
    den = m.sum(1).view(-1, group_size).sum(1).clamp(min=1)
    return num / den


def _stats(prefix: str, t: torch.Tensor) -> dict[str, float]:
    t = t.float()
    return {f"{prefix}/mean": float(t.mean()), f"{prefix}/min": float(t.min()), f"{prefix}/max": float(t.max())}


class Trainer:
    """Holds model, optimiser, controller and data position; ``step()`` runs one step."""

    def __init__(self, cfg, model, tokenizer, train_problems: list[Problem], *, ref_model=None):
        self.cfg = cfg
        self.model, self.tokenizer, self.ref_model = model, tokenizer, ref_model
        self.device = next(model.parameters()).device
        self.policy = Policy(model, impl=cfg.loss.impl, memory_budget=cfg.loss.memory_budget)
        self.ref_policy = Policy(ref_model, impl=cfg.loss.impl, memory_budget=cfg.loss.memory_budget) \
            if ref_model is not None else None
        if cfg.loss.beta > 0 and ref_model is None:
            raise ValueError("--beta > 0 needs a reference model")
        self.controller = AGPOController(cfg.controller)
        self.sampler = PromptSampler(train_problems, cfg.run.seed)
        self.reward_fn = load_reward(cfg.rollout.reward)
        params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay,
                                           betas=(cfg.optim.adam_beta1, cfg.optim.adam_beta2))
        total = cfg.run.steps * cfg.optim.update_epochs
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda(total, cfg.optim.warmup_ratio, cfg.optim.schedule, cfg.optim.min_lr_ratio))
        self.step_count = 0
        self.tokens_generated = 0
        self.chat = uses_chat_template(tokenizer)

    # -- phases ------------------------------------------------------------------------
    def _prompts(self, problems: list[Problem]) -> tuple[list[str], str | None]:
        prompts = [format_prompt(p, self.tokenizer) for p in problems]
        plain = not self.chat and not all(p.verbatim for p in problems)
        return prompts, (PLAIN_STOP if plain else None)

    def _sample(self, prompts, stop, tau) -> Rollout:
        r = self.cfg.rollout
        return sample_groups(self.model, self.tokenizer, prompts, tau, group_size=r.group_size,
                             max_new_tokens=r.max_new_tokens, top_p=r.top_p, batch_rows=r.generation_batch_size,
                             add_special_tokens=not self.chat, stop=stop)

    def _rewards(self, problems: list[Problem], prompts: list[str], roll: Rollout) -> torch.Tensor:
        G = roll.group_size
        rew = score(self.reward_fn, [p for p in prompts for _ in range(G)], roll.texts,
                    [q.reference for q in problems for _ in range(G)])
        return torch.tensor(rew, dtype=torch.float64).view(len(problems), G)

    @torch.no_grad()
    def score(self, policy: Policy, batch: SequenceBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token ``(logp, entropy)`` ``[R, C]`` of a rollout batch, micro-batched."""
        logp = torch.zeros(batch.completion_ids.shape, dtype=torch.float32)
        ent = torch.zeros_like(logp)
        for idx in micro_batches(batch, 2 * self.cfg.optim.micro_batch_tokens):
            mb = batch.select(idx)
            lp, h = policy(mb.to(self.device))
            C = mb.completion_ids.shape[1]
            logp[idx, :C], ent[idx, :C] = lp.float().cpu(), h.float().cpu()
        return logp, ent

    def _scale(self, batch: SequenceBatch, idx: torch.Tensor) -> float:
        if self.cfg.loss.loss_agg == "token-mean":
            return float(batch.completion_mask[idx].sum()) / max(1.0, float(batch.completion_mask.sum()))
        return len(idx) / batch.rows

    def update(self, batch: SequenceBatch, adv: torch.Tensor, eps: torch.Tensor, old_logp: torch.Tensor,
               ref_logp: torch.Tensor | None) -> dict[str, float]:
        """``update_epochs`` optimiser steps on one rollout batch; per-row ``adv``, ``eps``."""
        cfg = self.cfg
        self.model.train()
        groups = micro_batches(batch, cfg.optim.micro_batch_tokens)
        tok = float(batch.completion_mask.sum())
        sums = {"clip_frac": 0.0, "ratio_mean": 0.0, "kl_mean": 0.0}
        losses, norms = [], []
        for _ in range(cfg.optim.update_epochs):
            self.optimizer.zero_grad(set_to_none=True)
            epoch_loss = 0.0
            for idx in groups:
                mb = batch.select(idx)
                C = mb.completion_ids.shape[1]
                args = dict(advantages=adv[idx].to(self.device), old_logp=_cols(old_logp[idx], C).to(self.device),
                            eps_low=eps[idx].to(self.device), eps_high=(eps[idx] + cfg.loss.eps_high_offset).to(self.device),
                            beta=cfg.loss.beta, kl_estimator=cfg.loss.kl_estimator,
                            entropy_coef=cfg.loss.entropy_coef, dual_clip=cfg.loss.dual_clip,
                            loss_agg=cfg.loss.loss_agg, max_len=cfg.rollout.max_new_tokens)
                if ref_logp is not None:
                    args["ref_logp"] = _cols(ref_logp[idx], C).to(self.device)
                loss, m = self.policy(mb.to(self.device), args)
                w = self._scale(batch, idx)
                (loss * w).backward()
                epoch_loss += float(loss.detach()) * w
                share = float(mb.completion_mask.sum()) / tok / cfg.optim.update_epochs
                for k in sums:
                    sums[k] += float(m[k]) * share
            params = [p for p in self.model.parameters() if p.grad is not None]
            clip = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else float("inf")
            norms.append(float(torch.nn.utils.clip_grad_norm_(params, clip)))
            self.optimizer.step()
            self.scheduler.step()
            losses.append(epoch_loss)
        self.optimizer.zero_grad(set_to_none=True)
        self.model.eval()
        out = {"loss/policy": losses[0], "loss/policy_last": losses[-1], "loss/clip_frac": sums["clip_frac"],
               "loss/ratio_mean": sums["ratio_mean"], "optim/grad_norm": sum(norms) / len(norms),
               "optim/lr": self.scheduler.get_last_lr()[0]}
        if ref_logp is not None:
            out["kl/ref"] = sums["kl_mean"]
        return out

    # -- the step ----------------------------------------------------------------------
    def step(self) -> dict[str, float]:
        cfg, ctl, G = self.cfg, self.controller, self.cfg.rollout.group_size
        t_step = time.perf_counter()
        problems = self.sampler.next(cfg.rollout.prompts_per_step)
        prompts, stop = self._prompts(problems)
        P = len(problems)
        m: dict[str, float] = {}
        probe_tokens = 0
        if cfg.controller.needs_probe:
            probe = self._sample(prompts, stop, torch.full((P,), cfg.controller.tau_base))
            probe_rewards = self._rewards(problems, prompts, probe)
            tau = ctl.probe_step(probe_rewards, [probe.texts[p * G:(p + 1) * G] for p in range(P)])
            probe_tokens = probe.generated_tokens
            m.update({"probe/reward_mean": float(probe_rewards.mean()), "time/generate_probe": probe.seconds,
                      "probe/vote_entropy": ctl.metrics()["probe/entropy"]})
        else:
            tau = torch.full((P,), cfg.controller.tau_base)
        roll = self._sample(prompts, stop, tau)
        rewards = self._rewards(problems, prompts, roll)
        adv = ctl.advantages(rewards).reshape(-1)
        batch = roll.batch

        t0 = time.perf_counter()
        old_logp, ent = self.score(self.policy, batch)
        ref_logp = self.score(self.ref_policy, batch)[0] if cfg.loss.beta > 0 else None
        t_score = time.perf_counter() - t0
        H = _group_token_mean(ent, batch.completion_mask, G)
        eps = ctl.clip_step(H)

        t0 = time.perf_counter()
        m.update(self.update(batch, adv, eps.repeat_interleave(G), old_logp, ref_logp))
        t_update = time.perf_counter() - t0
        if cfg.controller.adaptive_clip:
            new_logp, _ = self.score(self.policy, batch)
            kl_g = _group_token_mean(old_logp - new_logp, batch.completion_mask, G)
            m["kl/step"] = ctl.update_step_kl(kl_g)
            m["kl/step_ema"] = ctl.step_kl_ema

        self.step_count += 1
        gen_tokens = probe_tokens + roll.generated_tokens
        self.tokens_generated += gen_tokens
        acc = self._accuracy(problems, roll, rewards)
        zero_std = (rewards.std(1) if G > 1 else torch.zeros(P)) < 1e-12
        scored = float(batch.completion_mask.sum())
        gen_s = roll.seconds + m.get("time/generate_probe", 0.0)
        m.update({"reward/mean": float(rewards.mean()), "reward/std": float(rewards.std()),
                  "reward/accuracy": acc, "reward/zero_std_frac": float(zero_std.float().mean()),
                  **_stats("eps", eps), **_stats("tau", tau),
                  "policy/entropy": float((ent * batch.completion_mask).sum() / max(scored, 1.0)),
                  "response/length": float(roll.lengths.float().mean()),
                  "response/length_max": float(roll.lengths.max()),
                  "tokens/generated_probe": probe_tokens, "tokens/generated_train": roll.generated_tokens,
                  "tokens/generated_total": self.tokens_generated,
                  "time/generate": roll.seconds, "time/score": t_score, "time/update": t_update,
                  "time/step": time.perf_counter() - t_step,
                  "perf/generate_tokens_per_s": gen_tokens / max(gen_s, 1e-9),
                  "perf/score_tokens_per_s": scored * (2 if cfg.loss.beta > 0 else 1) / max(t_score, 1e-9),
                  "perf/update_tokens_per_s": scored * cfg.optim.update_epochs / max(t_update, 1e-9)})
        m["perf/tokens_per_s"] = gen_tokens / max(m["time/step"], 1e-9)
        if not cfg.controller.needs_probe:
            m["probe/vote_entropy"] = float(group_vote_entropy(
                [roll.texts[p * G:(p + 1) * G] for p in range(P)]).mean())
        return m

    def _accuracy(self, problems: list[Problem], roll: Rollout, rewards: torch.Tensor) -> float:
        if self.reward_fn is correctness_reward:  # the reward is already 1.0 exactly when correct
            return float(rewards.mean())
        G = roll.group_size
        ok = [is_correct(roll.texts[i], problems[i // G].reference) for i in range(len(roll.texts))]
        return sum(ok) / len(ok)

    # -- checkpoint state --------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "controller": self.controller.state_dict(), "sampler": self.sampler.state_dict(),
                "step": self.step_count, "tokens_generated": self.tokens_generated}

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.controller.load_state_dict(state["controller"])
        self.sampler.load_state_dict(state["sampler"])
        self.step_count = int(state["step"])
        self.tokens_generated = int(state["tokens_generated"])
