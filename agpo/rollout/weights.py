"""The policy's weights as a stream of ``(checkpoint name, full tensor)`` pairs, for an
engine that holds its own copy (vLLM).

Names are those of the Hugging Face checkpoint (``model.layers.0.self_attn.q_proj.weight``),
which is what an engine's ``load_weights`` expects. A tied LM head is sent under both of
its names: vLLM's in-place reload re-materialises every layer on its own, so an engine
started from dummy weights keeps a random head if only the embedding arrives (tested).
The stream is lazy and goes parameter by parameter in module order:

- one device: the parameters themselves (no copy);
- FSDP2 shards: each parameter is all-gathered (``DTensor.full_tensor``) just before it is
  yielded and dropped once the consumer moves on, so a rank never holds more than the
  engine's loader buffers (at most one decoder layer) beyond its shards: never the whole
  model at once. Collective: every rank must consume the whole stream, in order;
- peft LoRA: each adapted projection is sent **merged**, ``W0 + scaling * B @ A`` computed
  in fp32 (one layer at a time), with plain HF names; every other parameter (embeddings,
  norms, LM head: the frozen base) is sent too. See docs/rollout.md for why merged weights
  rather than the engine's LoRA adapters, and why the whole model every time.
"""

from __future__ import annotations

from typing import Iterator

import torch
from torch import nn

from agpo.scale.lora import base_model


def _full(p: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a parameter that may be an FSDP2 shard (collective then)."""
    full = getattr(p, "full_tensor", None)
    return (full() if callable(full) else p).detach()


def _lora_classes() -> tuple[type, ...]:
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:  # peft not installed: no model can hold LoRA layers
        return ()
    return (LoraLayer,)


def _merged(layer: nn.Module, name: str) -> Iterator[tuple[str, torch.Tensor]]:
    """A peft LoRA layer as its merged base projection (weight, and bias if any)."""
    base = layer.base_layer
    w = _full(base.weight)
    active = [a for a in getattr(layer, "active_adapters", []) if a in layer.lora_A]
    if active and not getattr(layer, "disable_adapters", False) and not getattr(layer, "merged", False):
        if getattr(layer, "fan_in_fan_out", False):
            raise NotImplementedError(f"{name}: fan_in_fan_out LoRA layers")
        w = w.float()
        for a in active:
            lora_a, lora_b = _full(layer.lora_A[a].weight).float(), _full(layer.lora_B[a].weight).float()
            w = w + layer.scaling[a] * (lora_b @ lora_a)
    yield f"{name}.weight", w
    if getattr(base, "bias", None) is not None:
        yield f"{name}.bias", _full(base.bias)


@torch.no_grad()
def policy_weights(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """``(HF checkpoint name, full tensor)`` for every parameter of ``model`` (a plain HF
    causal LM or a peft model around one), LoRA merged in, FSDP2 shards gathered one
    parameter at a time (see the module docstring)."""
    base = base_model(model)
    lora = _lora_classes()
    skip: list[str] = []
    for name, module in base.named_modules():
        if skip and (name == skip[-1] or name.startswith(skip[-1] + ".")):
            continue
        if lora and isinstance(module, lora):
            skip.append(name)
            yield from _merged(module, name)
            continue
        for pname, p in module.named_parameters(recurse=False, remove_duplicate=False):
            yield (f"{name}.{pname}" if name else pname), _full(p)
