"""TRL integration: ``GRPOTrainer`` with the policy loss computed by ``agpo_loss``.

``AGPOGRPOTrainer`` is a drop-in subclass of ``trl.GRPOTrainer`` (verified with trl 1.16):
the policy runs only its backbone, and the clipped surrogate, k3 KL to the reference and
the aggregation are computed by ``agpo_loss`` from the last hidden states and the LM-head
weight, so no ``[tokens x vocab]`` logits are built. For the same config the loss and its
gradients equal TRL's own (``_compute_loss``):

    TRL ``loss_type``  ->  agpo ``loss_agg`` (then TRL's scaling)
    "bnpo"            ->  "token-mean", / gradient_accumulation_steps
    "dapo"            ->  "token-mean" * tokens / (num_items_in_batch-based normaliser)
    "grpo"            ->  "seq-mean-token-mean" (count_empty_seqs=True, as TRL's mean)
    "dr_grpo"         ->  "seq-mean-token-sum-norm", max_len = max_completion_length

TRL's static entropy bonus (``entropy_coef``) is a token mean whatever the loss type:
``entropy_agg="token-mean"``.

``delta`` (two-sided clipping: the ratio capped at ``delta`` in the unclipped branch)
-> ``dual_clip=delta``, which it equals whenever ``delta > 1 + epsilon_high`` (both cap
the loss of a negative-advantage token at ``-delta A`` with no gradient there, and leave
every other token alone). ``epsilon``/``epsilon_high`` -> ``eps_low``/``eps_high``,
``beta`` -> ``beta`` with ``kl_estimator="k3"``, ``temperature`` -> ``temperature``,
vLLM's importance-sampling correction (``importance_sampling_ratio``) -> ``is_weight``.
Per-sequence ``eps_low``,
``eps_high`` and ``temperature`` tensors ``[B]`` in the inputs dict override them (they
travel through TRL's shuffle/split with the rest of the batch); old and reference
log-probs in the batch must be at the same per-sequence temperature. Configurations the
fused loss does not express (other loss types, sequence-level importance sampling,
``delta <= 1 + epsilon_high``, off-policy masks, entropy masks, the adaptive entropy
bonus, MoE aux loss, multimodal inputs, logit scaling/softcapping) fall back to TRL's own
loss, with a warning at construction.

The loss runs inside the model's own forward (``add_hidden_forward``), where FSDP and
ZeRO-3 have the LM head gathered, under the trainer's autocast: on-policy batches (no old
log-probs) need no scoring pass (``old_logp=None``), and fp32 master weights with bf16
autocast run a bf16 head with an fp32 weight gradient. ``agpo_loss`` forms the gradients
during that forward (``backward="forward"``).

``AGPOClipCallback`` adds AGPO's adaptive clip controller, and only that: after each
generation batch it computes the group statistics (``num_generations`` completions per
prompt: reward dispersion and skewness, vote entropy of the answers, the policy's
per-group entropy) and writes per-sequence ``eps_low = eps_high`` into the batch; the step
KL of the previous batch is measured once its update is done. It is **not** AGPO: TRL's
own generation samples a whole batch at one ``temperature``, so there is no temperature
controller and no probe group; the statistics come from the train group itself. What
runs is GRPO with AGPO's adaptive clip (the ``--algo grpo --adaptive-clip`` ablation of
``python -m agpo.train``, docs/algorithm.md). The full algorithm in TRL (probe group,
per-prompt temperature through TRL's ``rollout_func``) is ``agpo.integrations.trl.AGPOTrainer``,
on the ``agpo`` side (it needs agpo's sampler).
``AGPOControllerCallback`` is the old name, kept as a deprecated alias.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import types
import warnings

import torch
from transformers import TrainerCallback
from trl import GRPOTrainer

from agpo_kernels.agpo_loss import agpo_loss
from agpo_kernels.linear_logprobs import linear_logprobs

__all__ = ["AGPOGRPOTrainer", "AGPOClipCallback", "AGPOControllerCallback", "LOSS_AGG"]

LOSS_AGG = {"bnpo": "token-mean", "dapo": "token-mean", "grpo": "seq-mean-token-mean",
            "dr_grpo": "seq-mean-token-sum-norm"}
"""TRL ``loss_type`` -> ``agpo_loss`` ``loss_agg``."""

_HEAD_FN = "agpo_head_fn"
_MULTIMODAL = ("pixel_values", "image_grid_thw", "num_images", "pixel_attention_mask", "spatial_shapes",
               "num_tiles", "image_sizes", "token_type_ids", "mm_token_type_ids", "image_position_ids")


def full_head(model):
    """``(weight, bias)`` of the LM head, whole: FSDP2 DTensors are gathered
    (``full_tensor``, whose backward reduce-scatters the gradient); under DeepSpeed ZeRO-3
    the caller wraps the use in ``gathered_head``."""
    head = model.get_output_embeddings()
    weight, bias = head.weight, head.bias
    if hasattr(weight, "full_tensor"):
        weight = weight.full_tensor()
        bias = bias.full_tensor() if bias is not None and hasattr(bias, "full_tensor") else bias
    return weight, bias


def gathered_head(weight, bias):
    """ZeRO-3 gathers a parameter only inside its own module's forward, which the fused
    head never calls; TRL's context gathers it for the call (a no-op otherwise)."""
    try:
        from trl.trainer.utils import maybe_gather_lm_head_ctx
    except ImportError:  # a TRL without it: nothing to gather outside ZeRO-3 anyway
        return contextlib.nullcontext()
    return maybe_gather_lm_head_ctx(*(t for t in (weight, bias) if t is not None))


def add_hidden_forward(model) -> None:
    """Lets ``model(..., agpo_head_fn=fn)`` return ``fn(hidden, weight, bias)``: the
    backbone's last hidden state and the whole LM head, inside the model's own forward.

    Going through ``model(...)`` (not the backbone directly) keeps DDP/FSDP wrappers in the
    loop, and reading the head there means its weight is gathered when ``fn`` reads it
    (FSDP/ZeRO-3): ``agpo_loss`` forms its gradients during that forward, so nothing of the
    gathered weight is needed afterwards. Without the keyword the forward is unchanged
    (generation, TRL's scoring).
    """
    inner = model.forward

    @functools.wraps(type(model).forward)
    def forward(self, *args, agpo_head_fn=None, **kwargs):
        if agpo_head_fn is None:
            return inner(*args, **kwargs)
        kwargs["use_cache"] = False
        hidden = self.base_model(*args, **kwargs).last_hidden_state
        weight, bias = full_head(self)
        with gathered_head(weight, bias):
            return agpo_head_fn(hidden, weight, bias)

    model.forward = types.MethodType(forward, model)


def _per_seq(inputs, key, default):
    value = inputs.get(key)
    return default if value is None else value.float()


class AGPOGRPOTrainer(GRPOTrainer):
    """``trl.GRPOTrainer`` whose policy loss is ``agpo_loss`` on hidden states (see module doc).

    Extra keyword ``agpo_impl`` picks the kernel ("auto": Triton on CUDA, else torch).
    """

    def __init__(self, *args, agpo_impl: str = "auto", **kwargs):
        super().__init__(*args, **kwargs)
        self.agpo_impl = agpo_impl
        self._agpo_rewards = None
        base = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        add_hidden_forward(base)
        self.agpo_fallback = self._unsupported()
        if self.agpo_fallback:
            warnings.warn(f"AGPOGRPOTrainer: {self.agpo_fallback}; using TRL's own loss", stacklevel=2)

    def _unsupported(self) -> str | None:
        """Why this config cannot use the fused loss (None: it can)."""
        args, cfg = self.args, self.model.config.get_text_config()
        checks = [
            (self.loss_type not in LOSS_AGG, f"loss_type={self.loss_type!r}"),
            (self.importance_sampling_level != "token", "importance_sampling_level='sequence'"),
            (getattr(args, "delta", None) is not None and not args.delta > 1 + self.epsilon_high,
             "delta <= 1 + epsilon_high (two-sided clipping that is not a dual clip)"),
            (self.off_policy_mask_threshold is not None, "off_policy_mask_threshold"),
            (self.top_entropy_quantile < 1.0, "top_entropy_quantile < 1"),
            (getattr(self, "use_adaptive_entropy", False), "adaptive entropy bonus"),
            (self.loss_type == "vespo", "loss_type='vespo'"),
            (self.aux_loss_enabled, "MoE router aux loss"),
            (getattr(cfg, "final_logit_softcapping", None) is not None, "final_logit_softcapping"),
            (any(getattr(cfg, k, None) not in (None, 1.0) for k in
                 ("logit_scale", "output_multiplier", "lm_head_multiplier", "logits_scaling")), "logit scaling"),
        ]
        reasons = [why for bad, why in checks if bad]
        return ", ".join(reasons) or None

    # --- loss -------------------------------------------------------------------------
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if return_outputs:
            raise ValueError("AGPOGRPOTrainer does not support returning outputs")
        if self.agpo_fallback or any(inputs.get(k) is not None for k in _MULTIMODAL):
            return self._compute_loss(model, inputs)
        return self.agpo_compute_loss(model, inputs)

    def _run_head(self, model, inputs, fn):
        """``fn(hidden [B, C, D], weight, bias)`` inside the model's forward, under autocast:
        the completion-position hidden states and the whole LM head. No dtype is forced:
        ``agpo_loss`` computes in autocast's (or the activations') dtype, so fp32 master
        weights with bf16 autocast run a bf16 head."""
        prompt_ids, completion_ids = inputs["prompt_ids"], inputs["completion_ids"]
        input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
        attention_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
        P, C = prompt_ids.size(1), completion_ids.size(1)

        def head(hidden, weight, bias):
            return fn(hidden[:, P - 1:P + C - 1], weight, bias)  # position t predicts token t + 1

        with self.accelerator.autocast():
            return model(input_ids=input_ids, attention_mask=attention_mask, **{_HEAD_FN: head})

    def agpo_compute_loss(self, model, inputs):
        """TRL's GRPO loss for this batch, computed by ``agpo_loss`` (no logits)."""
        mode = "train" if self.model.training else "eval"
        mask = inputs["completion_mask"]
        if inputs.get("tool_mask") is not None:
            mask = mask * inputs["tool_mask"]
        targets = inputs["completion_ids"]
        temperature = _per_seq(inputs, "temperature", self.temperature)
        # On-policy batches carry no old log-probs: agpo_loss then uses the current ones,
        # detached (ratio 1), from the same forward; no scoring pass.
        old = inputs.get("old_per_token_logps")
        eps_low = _per_seq(inputs, "eps_low", self.epsilon_low)
        eps_high = _per_seq(inputs, "eps_high", self.epsilon_high)
        ref = inputs.get("ref_per_token_logps") if self.beta != 0.0 else None
        dual = getattr(self.args, "delta", None)  # TRL's two-sided clipping, a dual clip when delta > 1 + eps_high
        if dual is not None and torch.is_tensor(eps_high) and bool((eps_high >= dual - 1).any()):
            raise ValueError(f"eps_high: a per-sequence value reaches delta - 1 = {dual - 1:g} (max "
                             f"{float(eps_high.max()):g}); TRL's delta then differs from a dual clip: raise --delta "
                             "or lower the clip controller's eps_max")
        isw = None  # vLLM rollouts: truncated importance weights on the surrogate term, as TRL
        if self.use_vllm and self.vllm_importance_sampling_correction:
            isw = inputs["importance_sampling_ratio"].float().expand_as(mask)  # [B, 1] for sequence modes

        scale = self._scale(inputs, mask, mode)
        # TRL's entropy bonus is a token mean over the micro-batch, / accumulation steps,
        # whatever the loss type: entropy_agg="token-mean", its weight undoing `scale`.
        accum = self.current_gradient_accumulation_steps if mode == "train" else 1.0
        ent_coef = self.entropy_coef / (accum * scale) if self._entropy_bonus() and scale > 0 else 0.0

        def loss_fn(hidden, weight, bias):
            return agpo_loss(
                hidden, weight, targets, inputs["advantages"].reshape(-1).float(), old, mask=mask, bias=bias,
                eps_low=eps_low, eps_high=eps_high, temperature=temperature, ref_logp=ref, beta=self.beta,
                kl_estimator="k3", kl_ratio_weight=self._kl_bias_correction(), loss_agg=LOSS_AGG[self.loss_type],
                count_empty_seqs=True, max_len=self.max_completion_length, is_weight=isw, dual_clip=dual,
                entropy_coef=ent_coef, entropy_agg="token-mean", impl=self.agpo_impl, backward="forward")

        loss, metrics = self._run_head(model, inputs, loss_fn)
        loss = loss * scale
        self._log_agpo_metrics(metrics, old, ref, mask, inputs["advantages"], eps_low, eps_high, mode)
        if self._entropy_bonus():  # what TRL logs with a bonus: the loss without it, and the coefficient
            m = mask.float()
            bonus = self.entropy_coef * (metrics["entropy"] * m).sum() / m.sum().clamp(min=1.0) / accum
            policy = (loss.detach() + bonus) * (1.0 if self.loss_type == "dapo" else accum)
            self._metrics[mode]["policy_loss"].append(self.accelerator.gather(policy).nanmean().item())
            if mode == "train" and self.accelerator.sync_gradients:
                self._metrics[mode]["entropy_coef"].append(self.entropy_coef)
        return loss

    def _entropy_bonus(self) -> bool:
        """TRL's static entropy bonus (``entropy_coef != 0``; the adaptive one falls back)."""
        return bool(getattr(self, "_entropy_bonus_enabled", False))

    def _kl_bias_correction(self) -> bool:
        """TRL's ``use_bias_correction_kl``: the k3 KL weighted by the importance ratio."""
        return bool(getattr(self.args, "use_bias_correction_kl", False))

    def _scale(self, inputs, mask, mode) -> float:
        """TRL's normalisation on top of the agpo aggregation (empty sequences counted in
        the sequence means, as TRL's ``grpo`` and ``dr_grpo`` do): a float."""
        accum = self.current_gradient_accumulation_steps if mode == "train" else 1.0
        if self.loss_type == "dapo":
            normaliser = inputs["num_items_in_batch"].clamp(min=1.0) / self.accelerator.num_processes
            if mode == "train":
                normaliser = normaliser * self.current_gradient_accumulation_steps / self.args.steps_per_generation
            return float(mask.sum() / normaliser)
        return 1.0 / accum

    def _log_agpo_metrics(self, metrics, old, ref, mask, advantages, eps_low, eps_high, mode):
        """The metrics TRL logs for the clipped losses: entropy, kl, clip ratios."""
        mask = mask.float()
        logp = metrics["logp"]
        old = logp if old is None else old  # on-policy: the ratio is 1

        def masked_mean(x):
            totals = self.accelerator.reduce(torch.stack([(x * mask).sum(), mask.sum()]), reduction="sum")
            return (totals[0] / totals[1].clamp(min=1.0)).item()

        def col(x):
            return x.view(-1, 1) if torch.is_tensor(x) else x

        with torch.no_grad():
            ratio = torch.exp(logp - old) * mask
            adv = advantages.view(-1, 1)
            low = ((ratio < 1 - col(eps_low)) & (adv < 0)).float()
            high = ((ratio > 1 + col(eps_high)) & (adv > 0)).float()
            m = self._metrics[mode]
            if ref is not None:
                d = ref - logp
                kl = torch.exp(d) - d - 1
                m["kl"].append(masked_mean(kl * torch.exp(logp - old) if self._kl_bias_correction() else kl))
            m["entropy"].append(masked_mean(metrics["entropy"]))
            m["clip_ratio/low_mean"].append(masked_mean(low))
            m["clip_ratio/high_mean"].append(masked_mean(high))
            m["clip_ratio/region_mean"].append(masked_mean(torch.maximum(low, high)))
            if torch.is_tensor(eps_low):
                m["agpo/eps_mean"].append(self.accelerator.gather(eps_low).mean().item())

    # --- hooks for the controllers -------------------------------------------------------
    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        rewards_per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        rewards = (rewards_per_func * self.reward_weights.to(rewards_per_func.device)).nansum(dim=1)
        n, rank = len(prompts), self.accelerator.process_index
        self._agpo_rewards = (rewards[rank * n:(rank + 1) * n].detach().cpu(), list(completions))
        return rewards_per_func

    def _generate_and_score_completions(self, inputs):
        batch = super()._generate_and_score_completions(inputs)
        if self.model.training and self._agpo_rewards is not None:
            rewards, completions = self._agpo_rewards
            for cb in self.callback_handler.callbacks:
                if isinstance(cb, AGPOClipCallback):
                    cb.on_batch(self, batch, rewards, completions)
        self._agpo_rewards = None
        return batch

    @torch.no_grad()
    def policy_token_stats(self, batch, temperature=None):
        """Per-token ``(logp, entropy)`` ``[B, C]`` of the current policy on a batch (no grad)."""
        temperature = self.temperature if temperature is None else temperature
        return self._run_head(self.model, batch, lambda h, w, b: linear_logprobs(
            h, w, batch["completion_ids"], bias=b, temperature=temperature, impl=self.agpo_impl))


def _completion_text(c) -> str:
    """TRL completions are strings, or lists of chat messages for conversational data."""
    if isinstance(c, str):
        return c
    return "".join(m.get("content", "") if isinstance(m, dict) else str(m) for m in c)


class AGPOClipCallback(TrainerCallback):
    """AGPO's adaptive per-group clip range for ``AGPOGRPOTrainer``; no temperature control.

    Per generation batch with ``P`` groups of ``G = num_generations``: the group statistics
    of the batch's rewards and completion texts (``probe_step``, on the train group itself:
    TRL has no probe group), ``clip_step`` on the policy's per-group token-mean entropy, and
    ``eps.repeat_interleave(G)`` into ``batch["eps_low"]`` and ``batch["eps_high"]``. At the
    next batch, ``update_step_kl`` with the previous batch's per-group token-mean
    ``logp_old - logp_new``. Assumes whole groups on each process (the local generation
    batch a multiple of ``num_generations``).

    The sampling temperature stays TRL's ``temperature`` for every row: the controller runs
    with ``adaptive_temp=False`` (a config or controller with it on is switched off, with a
    warning), so GRPO plus this callback is the "adaptive clip alone" ablation, not AGPO.
    """

    def __init__(self, config=None, controller=None, extract="default"):
        try:  # imported here: agpo.algo.controllers pulls in agpo.tasks.rewards
            from agpo.algo.controllers import AGPOController, ControllerConfig
        except ImportError as exc:
            raise ImportError(f"{type(self).__name__} needs agpo.algo.controllers ({exc})") from exc
        if controller is None:
            controller = AGPOController(config if config is not None else ControllerConfig(adaptive_temp=False))
        if controller.config.adaptive_temp:
            warnings.warn(f"{type(self).__name__}: adaptive_temp is ignored and switched off: TRL samples a "
                          "batch at one temperature, so only the adaptive clip runs (agpo.integrations.trl."
                          "AGPOTrainer runs the temperature controller and the probe group)", UserWarning, stacklevel=2)
            controller.config = dataclasses.replace(controller.config, adaptive_temp=False)
        if not controller.config.adaptive_clip:
            warnings.warn(f"{type(self).__name__}: adaptive_clip is off, so every eps is eps_base "
                          "(plain GRPO)", UserWarning, stacklevel=2)
        self.controller = controller
        self.extract = extract
        self._pending = None  # (batch, old logp) of the last batch, for the step KL
        self.last = {}

    def on_batch(self, trainer, batch, rewards, completions):
        G = trainer.num_generations
        n = rewards.numel()
        if n % G:
            raise ValueError(f"{type(self).__name__}: {n} completions are not whole groups of {G}")
        ctl, P = self.controller, n // G
        if self._pending is not None:
            prev, prev_old = self._pending
            new, _ = trainer.policy_token_stats(prev)
            ctl.update_step_kl(_group_mean(prev_old - new, prev["completion_mask"], G).tolist())
        texts = [_completion_text(c) for c in completions]
        groups = [texts[p * G:(p + 1) * G] for p in range(P)]
        kwargs = {} if self.extract == "default" else {"extract": self.extract}
        ctl.probe_step(rewards.view(P, G).float(), groups, **kwargs)  # statistics; tau stays TRL's
        logp, entropy = trainer.policy_token_stats(batch)
        eps = ctl.clip_step(_group_mean(entropy, batch["completion_mask"], G).tolist())
        eps_seq = eps.repeat_interleave(G).to(batch["completion_ids"].device)
        batch["eps_low"], batch["eps_high"] = eps_seq, eps_seq.clone()
        self._pending = ({k: batch[k] for k in ("prompt_ids", "prompt_mask", "completion_ids",
                                                "completion_mask")}, logp)
        # The group statistics the clip used; the uncertainty, baseline and tau only drive the
        # temperature controller, which does not run here, and there is no probe group.
        stats = ctl.metrics()
        self.last = {"agpo/eps_mean": eps.mean().item(), "agpo/step_kl_ema": stats["controller/step_kl_ema"],
                     "agpo/h_ref": stats["controller/h_ref"], "agpo/reward_dispersion": stats["probe/sigma"],
                     "agpo/reward_skew": stats["probe/skew"], "agpo/vote_entropy": stats["probe/entropy"]}

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is not None and self.last:
            logs.update(self.last)


class AGPOControllerCallback(AGPOClipCallback):
    """Deprecated alias of ``AGPOClipCallback`` (the old name promised the temperature
    controller too, which TRL's generation path cannot apply)."""

    def __init__(self, *args, **kwargs):
        warnings.warn("AGPOControllerCallback is deprecated: use AGPOClipCallback (it is the adaptive clip "
                      "alone; TRL's sampling temperature is not controlled)", DeprecationWarning, stacklevel=2)
        super().__init__(*args, **kwargs)


def _group_mean(x, mask, G):
    """Token-mean of ``x`` ``[B, C]`` over each group's unmasked tokens -> ``[B // G]``."""
    mask = mask.float()
    tot = (x.float() * mask).sum(-1).view(-1, G).sum(-1)
    return (tot / mask.sum(-1).view(-1, G).sum(-1).clamp(min=1.0)).cpu()
