"""How the policy is laid out for training: one device or FSDP2 shards over torchrun
ranks; full fine-tuning or LoRA; and which policy the KL term's reference is.

``prepare_layout`` turns the loaded Hugging Face model (and, for full fine-tuning with
``beta > 0``, a frozen copy for the reference) into a ``Layout``:

- ``policy``: the ``agpo.learn.policy.Policy`` root (decoder + fused LM head + loss). Under
  torchrun (any world size, one rank included) every decoder layer is ``fully_shard``-ed,
  then the root, so the root's pre-forward all-gathers the embeddings, final norm and LM
  head exactly when the fused kernel reads the head weight. Activation checkpointing wraps each layer first
  when ``--gradient-checkpointing`` is on.
- mixed precision: on GPUs, full fine-tuning keeps fp32 weights and AdamW state (sharded)
  and computes in ``--dtype`` with fp32 gradient reduction (``--fp32-master``). LoRA keeps
  the frozen base in ``--dtype`` and the adapters in fp32, stored and computed (no FSDP
  mixed-precision policy: it would cast the adapters too; tests/test_weight_sync.py).
- the reference: LoRA -> the same model with its adapters switched off (no second copy);
  full fine-tuning -> a frozen ``Policy`` over the copy, sharded the same way, forward only.
- ``generation()``: the context under which rollouts and evaluation call ``generate``;
  sharded, it all-gathers the model once for the whole phase (``distributed.unsharded``).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
import torch.distributed as dist
from torch import nn

from agpo.learn.policy import Policy, decoder_and_head
from agpo.scale.distributed import (
    DistEnv,
    apply_activation_checkpointing,
    device_mesh,
    reshard_all,
    shard_model,
    unsharded,
)
from agpo.scale.loading import materialize
from agpo.scale.lora import (
    adapters_disabled,
    apply_lora,
    init_meta_adapters,
    upcast_adapters,
)


@dataclass
class Layout:
    """The trainable policy, its reference and how they are spread over ranks."""

    env: DistEnv
    """This process's rank, world size and device."""
    model: nn.Module
    """The model ``generate`` runs on (a peft model with LoRA); its weights are the policy's."""
    policy: Policy
    """Root module the trainer calls: scoring (no loss options) or the loss."""
    ref_policy: Policy | None
    """Frozen reference for the KL term (full fine-tuning with beta > 0), else None."""
    lora: bool
    """Adapters train, the base is frozen; the reference is the base (adapters off)."""

    @property
    def sharded(self) -> bool:
        return self.env.distributed

    def describe(self) -> str:
        """One line for the run log: how the policy is laid out."""
        how = "LoRA adapters" if self.lora else "full fine-tuning"
        if not self.sharded:
            return f"{how} on {self.env.device}"
        p = next(self.policy.parameters())
        return (f"{how}, FSDP2 over {self.env.world_size} rank(s) ({dist.get_backend()}), "
                f"{str(p.dtype).replace('torch.', '')} shards on {self.env.device.type}")

    def trainable_parameters(self) -> list[nn.Parameter]:
        """What the optimiser updates (DTensor shards when sharded)."""
        return [p for p in self.policy.parameters() if p.requires_grad]

    @contextlib.contextmanager
    def generation(self) -> Iterator[nn.Module]:
        """``model`` ready for ``generate`` (gathered once when sharded); collective."""
        with unsharded(self.policy):
            yield self.model

    @contextlib.contextmanager
    def reference(self) -> Iterator[Policy]:
        """The policy to score reference log-probs with."""
        if self.lora:
            with adapters_disabled(self.model):
                yield self.policy
        elif self.ref_policy is None:
            raise ValueError("--beta > 0 needs a reference model")
        else:
            yield self.ref_policy

    def release(self) -> None:
        """Drop gathered parameters a no-grad forward left behind (the root is not resharded
        after forward; backward would do it). A no-op on one device."""
        if self.sharded:
            reshard_all(self.policy)
            if self.ref_policy is not None:
                reshard_all(self.ref_policy)


def _shard(policy: Policy, base: nn.Module, mesh, *, param_dtype: torch.dtype | None,
           checkpointing: bool, master_dtype: torch.dtype | None = None) -> None:
    layers = decoder_and_head(base)[0].layers
    if checkpointing:
        apply_activation_checkpointing(layers)
    shard_model(policy, list(layers), param_dtype=param_dtype, master_dtype=master_dtype, mesh=mesh)


def prepare_layout(cfg, model: nn.Module, env: DistEnv, *, ref_model: nn.Module | None = None,
                   compute_dtype: torch.dtype | None = None, weights: Path | None = None,
                   ref_weights: Path | None = None) -> Layout:
    """Apply LoRA and/or FSDP2 as ``cfg.model`` says; returns the ``Layout``.

    ``model`` (and ``ref_model``) hold the weights to start from, on ``env.device`` for
    one device, on the CPU or the device under torchrun (FSDP moves each shard to the
    device); or, under torchrun, they are empty (``agpo.scale.loading.empty_model``) and
    ``weights`` (``ref_weights``) names the safetensors folder each rank reads its shards
    from once sharded. ``compute_dtype``: the dtype sharded forwards compute in (None: the
    model's).
    """
    m = cfg.model
    lora = m.lora_rank > 0
    if lora:
        model = apply_lora(model, rank=m.lora_rank, alpha=m.lora_alpha, dropout=m.lora_dropout)
        upcast_adapters(model, torch.float32)
        if weights is not None:  # an empty base: peft put the adapters on meta too
            init_meta_adapters(model, seed=cfg.run.seed)
        base = model.get_base_model()
        ref_model = None
    else:
        base = model
    impl, budget = cfg.loss.impl, cfg.loss.memory_budget
    policy = Policy(base, impl=impl, memory_budget=budget)
    ref_policy = Policy(ref_model, impl=impl, memory_budget=budget) if ref_model is not None else None
    if env.distributed:
        # full fine-tuning on GPUs: fp32 master shards (upcast while sharding), compute in
        # compute_dtype. LoRA: no mixed-precision policy at all (it would cast every
        # parameter of a unit, the fp32 adapters included, to one param_dtype): the frozen
        # base is stored in compute_dtype and gathered as it is, the adapters stay fp32 and
        # peft computes their branch in fp32 (FSDP2 gathers a unit of mixed dtypes as bytes;
        # only the trainable parameters, all fp32, need one dtype for the gradient reduction)
        master = torch.float32 if (m.fp32_master and not lora and env.device.type == "cuda") else None
        loaded = next(p for n, p in base.named_parameters() if ".lora_" not in n).dtype
        stored = master or loaded
        want = compute_dtype or loaded
        mixed = want if (want != stored and not lora) else None
        if lora and want != loaded:
            for n, p in base.named_parameters():
                if ".lora_" not in n and p.is_floating_point():
                    p.data = p.data.to(want)
        mesh = device_mesh(env)
        _shard(policy, base, mesh, param_dtype=mixed, checkpointing=m.gradient_checkpointing, master_dtype=master)
        if weights is not None:
            materialize(policy, base, weights, env.device)
        if ref_policy is not None:
            ref_policy.requires_grad_(False)
            _shard(ref_policy, ref_model, mesh, param_dtype=None, checkpointing=False)
            if ref_weights is not None:
                materialize(ref_policy, ref_model, ref_weights, env.device)
    elif m.gradient_checkpointing:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return Layout(env=env, model=model, policy=policy, ref_policy=ref_policy, lora=lora)
