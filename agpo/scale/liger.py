"""Liger-Kernel's fused decoder kernels (RMSNorm, RoPE, SwiGLU) on the policy, never its loss.

``apply_liger(model)`` patches a Hugging Face decoder in place with Liger's Triton kernels
for the families Liger supports (Qwen2, Llama, Mistral, Gemma, ...): fused RMSNorm,
rotary embedding and SwiGLU MLP. Liger's cross-entropy and fused-linear-cross-entropy are
never applied: the policy never runs the model's LM head, the fused AGPO head
(``agpo_kernels``) is ours. Call it before sharding (``agpo.scale.parallel``); the parameters
are untouched, so FSDP2, checkpoints and the HF export see the same state dict.

Liger patches some module-level functions of the family (the RoPE function of, e.g.,
``transformers.models.qwen2.modeling_qwen2``), so every model of that family created in
the process afterwards uses Liger's RoPE too; the reference model gets the same patch.

``--liger/--no-liger`` (default: on when the run is on CUDA, liger-kernel imports and it
knows the model's family; ``wants_liger``).
Liger's kernels are Triton kernels for GPUs; on a CPU they run only in Triton's
interpreter (tests/test_liger.py).
"""

from __future__ import annotations

import importlib.util
import inspect
import os

from torch import nn

from agpo.errors import LigerError
from agpo.scale.lora import base_model

PATCHES = dict(rope=True, rms_norm=True, swiglu=True, cross_entropy=False, fused_linear_cross_entropy=False)
"""What is asked of Liger's ``apply_liger_kernel_to_<family>``: the decoder, not the loss."""



def liger_available() -> bool:
    return importlib.util.find_spec("liger_kernel") is not None


def supported_family(model: nn.Module) -> str | None:
    """The model's ``model_type`` when Liger has kernels for it, else None."""
    if not liger_available():
        return None
    from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN

    model_type = getattr(getattr(model, "config", None), "model_type", None)
    return model_type if model_type in MODEL_TYPE_TO_APPLY_LIGER_FN else None


def wants_liger(model: nn.Module, device: str) -> bool:
    """The default of ``--liger``: the run is on CUDA and Liger has kernels for the model."""
    return str(device).startswith("cuda") and supported_family(base_model(model)) is not None


def apply_liger(model: nn.Module, device: str = "cuda") -> str:
    """Patch ``model`` (a ``*ForCausalLM``, or a peft model around one) with Liger's RMSNorm,
    RoPE and SwiGLU for a run on ``device``; returns the family patched. Raises
    ``LigerError`` when liger-kernel is missing, does not know the family, or the run is
    not on CUDA (outside Triton's CPU interpreter)."""
    if not str(device).startswith("cuda") and os.environ.get("TRITON_INTERPRET") != "1":
        raise LigerError(f"--liger: Liger-Kernel's Triton kernels need a CUDA device, the run is on {device}; "
                         "pass --no-liger")
    if not liger_available():
        raise LigerError("--liger: liger-kernel is not installed (pip install liger-kernel), or pass --no-liger")
    base = base_model(model)
    family = supported_family(base)
    if family is None:
        raise LigerError(f"--liger: Liger-Kernel has no kernels for model type "
                         f"{getattr(getattr(base, 'config', None), 'model_type', None)!r}; pass --no-liger")
    from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN

    fn = MODEL_TYPE_TO_APPLY_LIGER_FN[family]
    params = inspect.signature(fn).parameters
    fn(model=base, **{k: v for k, v in PATCHES.items() if k in params})
    return family
