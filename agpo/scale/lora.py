"""LoRA fine-tuning through ``peft``: adapters on the attention and MLP projections.

With LoRA the base model (embeddings, norms, LM head, every projection's base weight) is
frozen; only the low-rank ``lora_A`` / ``lora_B`` matrices train. The reference policy
of the KL term is then the same model with its adapters switched off
(:func:`adapters_disabled`), so no second copy of the weights is needed. For export the
adapters are merged into the base weights (:func:`merged_state_for_export`), giving a
plain HF checkpoint of the base architecture.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def base_model(model: nn.Module) -> nn.Module:
    """The transformers model inside a peft wrapper (the model itself when not wrapped)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def apply_lora(model: nn.Module, *, rank: int, alpha: float | None = None, dropout: float = 0.0,
               target_modules=None, adapter_name: str = "default"):
    """Wrap an HF causal LM in a peft ``PeftModel`` with LoRA adapters of ``rank``.

    ``alpha`` defaults to ``rank`` (scaling alpha / rank = 1). ``target_modules`` defaults
    to the q/k/v/o attention and gate/up/down MLP projections. Adapters are created in the
    base weights' dtype by peft; cast them with ``upcast_adapters`` for fp32 adapters on a
    bf16 base. Every non-adapter parameter, the LM head (tied or not) included, is frozen.
    """
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=rank, lora_alpha=alpha if alpha is not None else rank, lora_dropout=dropout,
                        target_modules=list(target_modules or DEFAULT_TARGETS), bias="none",
                        task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, config, adapter_name=adapter_name)
    for name, p in peft_model.named_parameters():
        if ".lora_" not in name:
            p.requires_grad_(False)
    return peft_model


def upcast_adapters(model: nn.Module, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Keep the adapter weights in ``dtype`` (fp32 adapters over a bf16 frozen base)."""
    for name, p in model.named_parameters():
        if ".lora_" in name:
            p.data = p.data.to(dtype)
    return model


def init_meta_adapters(model: nn.Module, *, seed: int, dtype: torch.dtype = torch.float32) -> int:
    """Give the LoRA adapters of a model built on the ``meta`` device (``agpo.scale.loading.
    empty_model``) real host memory and peft's initialisation (``lora_A`` Kaiming-uniform,
    ``lora_B`` zero, so the model starts as its base), drawn from ``seed`` alone: every rank
    of a sharded run gets the same adapters. Returns the number of adapter pairs."""
    n = 0
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for name, layer in sorted(lora_layers(model).items()):
            for a in list(layer.lora_A):
                if not layer.lora_A[a].weight.is_meta and not layer.lora_B[a].weight.is_meta:
                    continue
                layer.lora_A[a].to_empty(device="cpu").to(dtype)
                layer.lora_B[a].to_empty(device="cpu").to(dtype)
                layer.reset_lora_parameters(a, True)
                n += 1
    return n


def lora_layers(model: nn.Module) -> dict[str, nn.Module]:
    """peft's LoRA layers by their name relative to the base HF model."""
    from peft.tuners.lora import LoraLayer

    base = base_model(model)
    return {name: m for name, m in base.named_modules() if isinstance(m, LoraLayer)}


@contextlib.contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """The base model: the reference policy of the KL term (bit-identical to the model
    before LoRA was applied: peft skips the adapter branch entirely)."""
    if not hasattr(model, "disable_adapter"):
        raise TypeError("adapters_disabled needs a peft model (apply_lora)")
    with model.disable_adapter():
        yield model


def merged_state_for_export(model: nn.Module, state_dict: dict[str, torch.Tensor] | None = None,
                            adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """The base model's state dict with the LoRA deltas merged in, without touching ``model``.

    ``state_dict`` is keyed like the base HF model's own (``model.layers.0...``, the peft
    form ``...q_proj.base_layer.weight`` / ``...q_proj.lora_A.default.weight``) -- e.g. what
    ``agpo.scale.distributed.full_state_dict`` gathered from a sharded model; by default the
    model's own. ``W = W0 + scaling * B @ A`` in fp32, cast back to ``W0``'s dtype; the
    result has plain HF keys (``...q_proj.weight``) and no adapter entries.
    """
    layers = lora_layers(model)
    if state_dict is None:
        base = base_model(model)
        state_dict = {k: v.detach() for k, v in base.state_dict().items()}
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if ".lora_" in key:
            continue
        if ".base_layer." not in key:
            out[key] = value
            continue
        mod_name, leaf = key.split(".base_layer.")
        new_key = f"{mod_name}.{leaf}"
        layer = layers.get(mod_name)
        if leaf == "weight" and layer is not None and adapter_name in layer.scaling:
            a = state_dict[f"{mod_name}.lora_A.{adapter_name}.weight"].float()
            b = state_dict[f"{mod_name}.lora_B.{adapter_name}.weight"].float()
            if getattr(layer, "fan_in_fan_out", False):
                raise NotImplementedError("fan_in_fan_out LoRA layers")
            value = (value.float() + layer.scaling[adapter_name] * (b @ a)).to(value.dtype)
        out[new_key] = value
    return out


def trainable_parameter_report(model: nn.Module) -> dict:
    """Counts of trainable and total parameters (shared parameters counted once)."""
    total = trainable = 0
    names = []
    for name, p in model.named_parameters():
        n = p.numel()
        total += n
        if p.requires_grad:
            trainable += n
            names.append(name)
    frac = trainable / total if total else 0.0
    return {"trainable": trainable, "total": total, "fraction": frac, "trainable_names": names,
            "summary": f"trainable {trainable:,} / {total:,} parameters ({100 * frac:.3f}%)"}
