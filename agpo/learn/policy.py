"""The policy as the trainer sees it: a Hugging Face causal LM whose logits are never formed.

``Policy`` wraps the model and runs only its decoder (backbone) for hidden states; the
LM-head weight goes to the fused ops of ``agpo_kernels``: ``linear_logprobs`` to score
rollouts, ``agpo_loss`` to train. Both run inside ``Policy.forward``, so a sharded root
module (FSDP2, issue 7) has the head weight gathered when the kernel reads it.

A batch (``SequenceBatch``) is the rollout layout: the prompt left-padded to width ``P``,
the completion right-padded to width ``C``; the hidden state at position ``P - 1 + t``
predicts completion token ``t``.
"""

from __future__ import annotations

import torch
from torch import nn

from agpo.learn.batches import PackedBatch, SequenceBatch
from agpo.scale.lora import base_model
from agpo_kernels import agpo_loss, linear_logprobs


class UnsupportedModelError(ValueError):
    """The model's head does something the fused ops do not compute."""


def decoder_and_head(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """``(decoder, lm_head)`` of a causal LM (also through a peft wrapper)."""
    base = base_model(model)
    head = base.get_output_embeddings()
    decoder = base.get_decoder() if hasattr(base, "get_decoder") else getattr(base, base.base_model_prefix)
    if head is None or decoder is None or decoder is base:
        raise UnsupportedModelError(f"{type(base).__name__}: cannot find the decoder and the LM head "
                                    "(expected a *ForCausalLM model)")
    return decoder, head


def check_fused_head(model: nn.Module) -> None:
    """Refuse heads whose logits are not ``h W^T + b``; Gemma-2's final soft-capping is
    switched off (with a note) so sampling and training use the same, uncapped policy."""
    cfg = getattr(model, "config", None)
    if getattr(cfg, "final_logit_softcapping", None):
        print(f"agpo: {type(model).__name__} soft-caps its final logits at {cfg.final_logit_softcapping}; the fused "
              "head computes plain logits, so soft-capping is switched off for generation and training alike")
        cfg.final_logit_softcapping = None
    for name in ("logit_scale", "logits_scaling", "output_multiplier_scale"):
        value = getattr(cfg, name, None)
        if value not in (None, 1, 1.0):
            raise UnsupportedModelError(f"{type(model).__name__} scales its logits ({name}={value}); the fused "
                                        "head does not, so this model family is not supported yet")


class Policy(nn.Module):
    """Decoder + fused LM head; ``forward`` scores (no loss options) or returns the loss."""

    def __init__(self, model: nn.Module, *, impl: str = "auto", memory_budget: int | None = None):
        super().__init__()
        check_fused_head(model)
        self.model = model
        self.impl = impl
        self.memory_budget = memory_budget

    def head(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        _, head = decoder_and_head(self.model)
        return head.weight, getattr(head, "bias", None)

    def packed_hidden(self, packed: PackedBatch) -> torch.Tensor:
        """Final hidden states that predict the packed completion tokens, ``[N, D]``."""
        decoder, _ = decoder_and_head(self.model)
        out = decoder(input_ids=packed.input_ids, position_ids=packed.position_ids, attention_mask=None,
                      use_cache=False)
        return out.last_hidden_state[0].index_select(0, packed.predict)

    def completion_hidden(self, batch: SequenceBatch) -> torch.Tensor:
        """Final hidden states that predict the completion tokens, ``[B, C, D]``."""
        decoder, _ = decoder_and_head(self.model)
        ids = torch.cat([batch.prompt_ids, batch.completion_ids], 1)
        attn = torch.cat([batch.prompt_mask, batch.completion_mask], 1).long()
        pos = (attn.cumsum(1) - 1).clamp(min=0)
        out = decoder(input_ids=ids, attention_mask=attn, position_ids=pos, use_cache=False)
        P, C = batch.prompt_ids.shape[1], batch.completion_ids.shape[1]
        return out.last_hidden_state[:, P - 1:P - 1 + C]

    def forward(self, batch: SequenceBatch | PackedBatch, loss_args: dict | None = None, *,
                entropy_temperature: float | None = None):
        """``loss_args`` None: ``(logp, entropy)`` ``[B, C]`` (0 on masked tokens), both at the
        batch's temperatures, or the entropy at ``entropy_temperature`` when given (one more
        pass of the head, no second pass of the decoder). Else the ``agpo_loss`` keyword
        arguments besides the batch's own: returns ``(loss, metrics)``.

        A ``PackedBatch`` (``agpo.learn.packing``) runs the decoder on its real tokens only; its
        per-token loss arguments (``old_logp``, ...) and results are in packed order ``[N]``,
        except scoring, which returns ``[S, C]`` like a padded batch."""
        if isinstance(batch, PackedBatch):
            return self._forward_packed(batch, loss_args, entropy_temperature)
        hidden = self.completion_hidden(batch)
        weight, bias = self.head()
        if hidden.dtype != weight.dtype:
            hidden = hidden.to(weight.dtype)
        mask = batch.completion_mask.bool()
        if loss_args is None:
            temp = batch.temperature.to(hidden.device).view(-1, 1).expand_as(batch.completion_ids)
            logp = hidden.new_zeros(mask.shape, dtype=torch.float32)
            ent = torch.zeros_like(logp)
            if mask.any():  # only the tokens that count are projected
                logp[mask], ent[mask] = self._score(hidden[mask], weight, bias, batch.completion_ids[mask],
                                                    temp[mask], entropy_temperature)
            return logp, ent
        return agpo_loss(hidden, weight, batch.completion_ids, mask=mask, temperature=batch.temperature,
                         bias=bias, impl=self.impl, memory_budget=self.memory_budget, **loss_args)

    def _forward_packed(self, packed: PackedBatch, loss_args: dict | None, entropy_temperature: float | None):
        hidden = self.packed_hidden(packed)
        weight, bias = self.head()
        if hidden.dtype != weight.dtype:
            hidden = hidden.to(weight.dtype)
        kw = dict(bias=bias, impl=self.impl, memory_budget=self.memory_budget)
        if loss_args is not None:
            return agpo_loss(hidden, weight, packed.targets, cu_seqlens=packed.cu_seqlens,
                             temperature=packed.temperature, **kw, **loss_args)
        lens = (packed.cu_seqlens[1:] - packed.cu_seqlens[:-1]).long()
        temp = packed.temperature.to(hidden.device).repeat_interleave(lens.to(hidden.device))
        logp = hidden.new_zeros(packed.token_mask.shape, dtype=torch.float32)
        ent = torch.zeros_like(logp)
        if packed.targets.numel():
            logp[packed.token_mask], ent[packed.token_mask] = self._score(
                hidden, weight, bias, packed.targets, temp, entropy_temperature)
        return logp, ent

    def _score(self, hidden, weight, bias, targets, temp, entropy_temperature):
        """``(logp, entropy)`` of ``[N]`` tokens at their temperatures ``temp [N]``; the entropy
        at ``entropy_temperature`` instead when given (one more pass of the head if it differs)."""
        kw = dict(bias=bias, impl=self.impl, memory_budget=self.memory_budget)
        logp, ent = linear_logprobs(hidden, weight, targets, temperature=temp, **kw)
        if entropy_temperature is not None and not bool((temp == entropy_temperature).all()):
            ent = linear_logprobs(hidden, weight, targets, temperature=entropy_temperature, **kw)[1]
        return logp, ent
