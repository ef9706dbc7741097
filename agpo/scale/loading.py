"""Loading a model straight into its FSDP2 shards: no rank ever holds the whole model.

Under torchrun the plain path (``agpo.models.load_model_and_tokenizer`` on every rank, then
sharding) costs every rank a full copy of the weights on the host, twice over with a KL
reference: about 440 GB on one 8-GPU node for Qwen2.5-14B, and minutes of reading. When
the weights are a local safetensors folder (a ``save_pretrained`` folder, the Hugging Face
cache, the converted SmolLM2 preset), the trainer instead

1. builds the model with its parameters on the ``meta`` device (``empty_model``: no
   memory; buffers such as the rotary frequencies are computed for real, they are small);
2. shards it with FSDP2 like any other model (``agpo.scale.parallel``), which keeps the
   parameters on ``meta``;
3. ``materialize``: allocates each rank's shards on its device and reads from the
   safetensors files exactly the rows each rank owns (``torch.distributed.checkpoint``'s
   Hugging Face reader, which slices the memory-mapped files), converting to the shards'
   dtype (fp32 master weights from a bf16 checkpoint) on the way.

A rank's peak host memory while loading is its shards plus the largest slice it reads,
not the model (tests/test_loading.py measures it; docs/scale.md has the 14B numbers). The
reference model is loaded the same way, and so is a LoRA base (``agpo.scale.parallel``
creates the adapters on the empty model and initialises them on the host, the same on every
rank, before sharding; ``materialize`` keeps them). Runs with a supervised warm-up (which
trains a replicated model before sharding) and models that are not safetensors folders (the
tiny preset, a ``.gguf`` file) take the plain path.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from agpo.models import PRESETS, smollm2_dir
from agpo.scale.distributed import _single_process_quiet, checkpoint_name


def weights_dir(name_or_path: str) -> Path | None:
    """The local folder holding ``config.json`` and ``*.safetensors`` for ``--model``, or
    None when there is none on this machine (then the plain loading path applies). The
    SmolLM2 preset's folder is its converted cache, made on first use."""
    name = str(name_or_path).strip()
    preset = PRESETS.get(name)
    if preset is not None and preset.name == "tiny":
        return None
    if preset is not None and preset.name == "smollm2-135m":
        return smollm2_dir()
    path = Path(os.path.expanduser(name))
    if path.is_dir():
        return path if _is_safetensors_folder(path) else None
    if path.exists() or preset is None and (name.startswith((".", "/", "~")) or name.count("/") > 1):
        return None
    try:
        from huggingface_hub import snapshot_download

        folder = Path(snapshot_download(preset.hf_id if preset else name, local_files_only=True))
    except Exception:  # not in the cache (or no huggingface_hub): the plain path reports it
        return None
    return folder if _is_safetensors_folder(folder) else None


def _is_safetensors_folder(path: Path) -> bool:
    return (path / "config.json").is_file() and any(path.glob("*.safetensors"))


def empty_model(folder: Path, *, dtype: torch.dtype, attn: str) -> nn.Module:
    """The model of ``folder`` with its parameters on ``meta`` (no memory) and real buffers,
    in eval mode, with the folder's generation config; tied weights stay tied."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    config = AutoConfig.from_pretrained(str(folder))
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn)
    model.tie_weights()  # tying inside the context registered a copy: tie the one parameter again
    if (folder / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(str(folder))
    return model.eval()


def hf_parameter_names(hf_model: nn.Module) -> dict[str, nn.Parameter]:
    """``hf_model``'s parameters by their checkpoint names (activation-checkpointing wrappers
    stripped; a tied weight once, under its first name, as safetensors files store it). In a
    model with peft LoRA layers the base projections take their plain names
    (``q_proj.base_layer.weight`` -> ``q_proj.weight``) and the adapters, which no
    checkpoint holds, are left out."""
    out = {}
    for n, p in hf_model.named_parameters():
        if ".lora_" in n:
            continue
        out[checkpoint_name(n).replace(".base_layer.", ".")] = p
    return out


def materialize(root: nn.Module, hf_model: nn.Module, folder: Path, device: torch.device) -> None:
    """Allocate ``root``'s (sharded) meta parameters on ``device`` and fill ``hf_model``'s
    (inside ``root``) from the safetensors files of ``folder``, each rank reading only its
    shards. Collective under torchrun; also correct in one process."""
    import torch.distributed.checkpoint as dcp

    buffers = {n: b.detach().to(device, copy=True) for n, b in root.named_buffers()}
    # parameters that are real already (LoRA adapters initialised before sharding) keep
    # their values: to_empty reallocates every parameter
    real = {n: _local(p).detach().to(device, copy=True) for n, p in root.named_parameters() if not _local(p).is_meta}
    root.to_empty(device=device)
    head, embed = hf_model.get_output_embeddings(), hf_model.get_input_embeddings()
    if getattr(hf_model.config, "tie_word_embeddings", False) and head.weight is not embed.weight:
        hf_model.tie_weights()  # unsharded, to_empty gave each module its own copy
    with torch.no_grad():
        for name, b in root.named_buffers():
            b.copy_(buffers[name])
        for name, p in root.named_parameters():
            if name in real:
                _local(p).copy_(real[name])
    state = hf_parameter_names(hf_model)
    with _single_process_quiet():
        dcp.load(state, storage_reader=dcp.HuggingFaceStorageReader(str(folder)))


def _local(p: torch.Tensor) -> torch.Tensor:
    """This rank's shard of an FSDP2 parameter (the tensor itself when not sharded)."""
    return p.to_local() if hasattr(p, "to_local") else p
