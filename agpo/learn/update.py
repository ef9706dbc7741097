"""The update pass of a step: scoring a rollout batch (old, reference and new log-probs,
entropies) and the ``update_epochs`` optimiser steps of ``agpo_loss`` on it.

Both are micro-batched: ``score`` by twice the padded-token budget (no gradients), ``update``
by ``--micro-batch-tokens`` with gradient accumulation and one clipped AdamW step per epoch.
Micro-batch losses are scaled so their sum is the loss of the whole step: the ``token-mean``
of micro-batch ``m`` is weighted by its share of all ranks' tokens, the sequence
aggregations by their share of sequences (Dr. GRPO's normaliser is the completion cap).
Under torchrun every rank runs the same number of forwards and backwards (padded with
zero-weight passes), since a sharded model's are collective. An epoch whose loss or
gradient norm is not finite on any rank applies nothing (``optim/skipped_steps``).

``UpdatePass`` is a part of ``agpo.learn.trainer.Trainer``: it uses the trainer's config,
ranks and device, layout, policy, optimiser, scheduler, guard, weights version and rank
helpers (``_same_count``, ``_any_rank``), and its LR schedule
(``agpo.learn.schedule.TokenBudgetSchedule``).
"""

from __future__ import annotations

from dataclasses import replace

import torch

from agpo.learn.batches import SequenceBatch
from agpo.learn.clipstats import ClipTally, clip_counts
from agpo.learn.packing import micro_batches, pack, processed_tokens
from agpo.learn.policy import Policy
from agpo.runtime.guard import finite
from agpo.scale.distributed import all_reduce_sum


def scoring_batch(batch: SequenceBatch, score_temperature: str) -> SequenceBatch:
    """The batch the loss and the scoring passes see: the rows at their sampling
    temperatures (``sample``) or all at temperature 1 (``one``, the paper's code)."""
    if score_temperature == "one":
        return replace(batch, temperature=torch.ones_like(batch.temperature))
    return batch


class UpdatePass:
    """Scoring and the optimiser steps of one rollout batch (a ``Trainer`` mixin)."""

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
                            beta=cfg.loss.beta, kl_estimator=cfg.loss.kl_estimator, kl_clamp=cfg.loss.kl_clamp,
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
