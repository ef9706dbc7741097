"""The weight sync to a rollout engine (``agpo.rollout.weights.policy_weights``) on the
layout ``agpo.train`` uses at scale: activation checkpointing and FSDP2 over 2 gloo ranks,
weights read into the shards, a scaled-down Qwen2 checkpoint written here (config.json +
safetensors). The engine must receive exactly the checkpoint's names (no
``_checkpoint_wrapped_module.``), exactly its values in the engine's dtype, with one
all-gather per FSDP unit (decoder layers + the root), not one per parameter; LoRA adapters
must stay fp32 where they compute under FSDP, and arrive merged."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from small_qwen import write_small_qwen  # noqa: E402

from agpo.rollout.weights import SyncStats, policy_weights  # noqa: E402
from agpo.scale.distributed import apply_activation_checkpointing, checkpoint_name  # noqa: E402

HAVE_PEFT = __import__("importlib").util.find_spec("peft") is not None
LAYERS = 3


def checkpoint(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file
    return load_file(str(folder / "model.safetensors"))


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    base = tmp_path_factory.mktemp("sync")
    folder = write_small_qwen(base / "model", layers=LAYERS)
    out = base / "out"
    out.mkdir()
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "tests" / "weight_sync_check.py"), str(folder), str(out)]
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-5000:]
    ranks = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    return folder, ranks


def test_checkpoint_name_is_the_one_helper():
    assert checkpoint_name("model.layers.3._checkpoint_wrapped_module.mlp.up_proj.weight") == \
        "model.layers.3.mlp.up_proj.weight"
    assert checkpoint_name("lm_head.weight") == "lm_head.weight"


def test_names_under_activation_checkpointing_one_process(tmp_path):
    """Checkpointing wraps each layer (as under torchrun): the stream still carries the
    HF state_dict's names and values."""
    from transformers import AutoModelForCausalLM

    folder = write_small_qwen(tmp_path / "m", layers=2)
    model = AutoModelForCausalLM.from_pretrained(str(folder))
    want = copy.deepcopy(model).state_dict()
    apply_activation_checkpointing(model.model.layers)
    assert any("_checkpoint_wrapped_module" in n for n, _ in model.named_parameters())
    got = dict(policy_weights(model, dtype=torch.bfloat16))
    assert set(got) == set(want)
    for k, v in want.items():
        assert got[k].dtype == torch.bfloat16 and torch.equal(got[k], v.to(torch.bfloat16)), k


@pytest.mark.timeout(300)
def test_fsdp_checkpointing_names_are_the_checkpoints(two_ranks):
    folder, ranks = two_ranks
    want = checkpoint(folder)
    for res in ranks:
        assert any("_checkpoint_wrapped_module" in n for n in res["full"]["module_names"])  # the case at hand
        for key in ("bf16", "fp32"):
            assert set(res["full"][key]["weights"]) == set(want), set(res["full"][key]["weights"]) ^ set(want)


@pytest.mark.timeout(300)
def test_fsdp_sync_is_the_checkpoint_in_the_engine_dtype(two_ranks):
    """Every rank receives the whole model, equal to the checkpoint cast to the engine's
    dtype (bit for bit: the cast happens once, before the transfer)."""
    folder, ranks = two_ranks
    want = checkpoint(folder)
    for res in ranks:
        for key, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32), ("bf16_buckets", torch.bfloat16)):
            got = res["full"][key]["weights"]
            for k, v in want.items():
                assert got[k].dtype == dtype and got[k].shape == v.shape, (key, k)
                assert torch.equal(got[k], v.to(dtype)), (key, k)


@pytest.mark.timeout(300)
def test_fsdp_sync_gathers_once_per_unit_in_the_engine_dtype(two_ranks):
    """One all-gather per FSDP unit (LAYERS decoder layers + the root's embeddings, norm
    and head), whatever the number of parameters (12 per Qwen2 layer); the bytes moved are
    the model in the engine's dtype (bf16: half of fp32), plus FSDP's dim-0 padding."""
    folder, ranks = two_ranks
    want = checkpoint(folder)
    n_params = sum(v.numel() for v in want.values())
    assert len(want) == 12 * LAYERS + 3
    for res in ranks:
        bf16, fp32 = res["full"]["bf16"]["stats"], res["full"]["fp32"]["stats"]
        assert bf16["collectives"] == fp32["collectives"] == LAYERS + 1
        assert bf16["tensors"] == len(want)
        assert 2 * n_params <= bf16["bytes"] <= 2 * n_params * 1.15
        assert 4 * n_params <= fp32["bytes"] <= 4 * n_params * 1.15
        assert bf16["sent_bytes"] == 2 * n_params
        # units above the bucket size (4 KiB here) are gathered in several pieces, same values
        assert LAYERS + 1 < res["full"]["bf16_buckets"]["stats"]["collectives"] < len(want)


@pytest.mark.skipif(not HAVE_PEFT, reason="pip install peft")
@pytest.mark.timeout(300)
def test_lora_adapters_compute_in_fp32_under_fsdp_and_sync_merged(two_ranks):
    """LoRA on a bf16 base under FSDP2: the adapters are stored *and computed* in fp32 (an
    FSDP mixed-precision policy would cast them to bf16 at the all-gather); the stream is
    the base with ``W0 + s * B @ A`` merged in fp32, cast once to the engine's bf16."""
    folder, ranks = two_ranks
    want = checkpoint(folder)
    for res in ranks:
        lora = res["lora"]
        assert lora["adapter_compute"] and set(lora["adapter_compute"].values()) == {
            ("torch.float32", "torch.float32", "torch.float32")}
        assert {dt for _, dt in lora["adapters"].values()} == {"torch.float32"}
        got = lora["weights"]
        assert set(got) == set(want)
        assert lora["stats"]["collectives"] == LAYERS + 1
        for k, v in want.items():
            base = v.to(torch.bfloat16)
            mod = k.removesuffix(".weight")
            a_key = next((n for n in lora["adapters"] if checkpoint_name(n).endswith(f"{mod}.lora_A.default.weight")),
                         None)
            if a_key is None:
                assert torch.equal(got[k], base), k
                continue
            a = lora["adapters"][a_key][0]
            b = lora["adapters"][a_key.replace("lora_A", "lora_B")][0]
            merged = (base.float() + 2.0 * (b @ a)).to(torch.bfloat16)  # alpha 8 / rank 4
            assert got[k].dtype == torch.bfloat16
            torch.testing.assert_close(got[k].float(), merged.float(), rtol=0, atol=2 ** -7 * merged.abs().max().item())
            assert not torch.equal(got[k], base), k
    for k in ranks[0]["lora"]["weights"]:
        assert torch.equal(ranks[0]["lora"]["weights"][k], ranks[1]["lora"]["weights"][k]), k


def test_sync_stats_on_one_device_count_no_collectives(tmp_path):
    from transformers import AutoModelForCausalLM

    folder = write_small_qwen(tmp_path / "m", layers=1, tie=True)
    model = AutoModelForCausalLM.from_pretrained(str(folder))
    stats = SyncStats()
    got = dict(policy_weights(model, stats=stats))
    assert stats.collectives == 0 and stats.bytes == 0
    assert got["lm_head.weight"].data_ptr() == got["model.embed_tokens.weight"].data_ptr()  # tied: both names, no copy


@pytest.mark.skipif(not HAVE_PEFT, reason="pip install peft")
@pytest.mark.timeout(300)
def test_lora_under_torchrun_streams_the_base_into_shards(two_ranks):
    """LoRA under torchrun no longer loads a whole model per rank: the base is built empty
    (meta), the adapters are created on it and initialised from the seed (the same on both
    ranks: one adapter, not two halves of different ones), the shards are read from the
    safetensors files; the base arrives bf16 as stored, the adapters fp32, lora_B = 0 so
    the synced model is the checkpoint."""
    folder, ranks = two_ranks
    want = checkpoint(folder)
    for res in ranks:
        st = res["lora_streamed"]
        assert st["on_meta"] and st["base_dtypes"] == {"torch.bfloat16"}
        assert {dt for _, dt in st["adapters"].values()} == {"torch.float32"}
        for n, (t, _) in st["adapters"].items():
            assert torch.isfinite(t).all(), n
            assert (t == 0).all() if ".lora_B" in n else t.abs().sum() > 0, n
        assert set(st["weights"]) == set(want)
        for k, v in want.items():
            assert torch.equal(st["weights"][k], v.to(torch.bfloat16)), k
    a0, a1 = ranks[0]["lora_streamed"]["adapters"], ranks[1]["lora_streamed"]["adapters"]
    for n in a0:
        assert torch.equal(a0[n][0], a1[n][0]), n


@pytest.mark.parametrize("world", [2, 3, 6])
def test_unpacking_a_gather_cuts_each_ranks_padding(world):
    """Each rank sends its torch.chunk of rows padded to 16 bytes; the full tensor is the
    ranks' rows end to end without the padding, whatever the world size (3 ranks with 5
    rows of a bf16 [5, 3] leave 4 bytes of padding on every piece)."""
    from agpo.rollout.weights import unpack_gathered

    g = torch.Generator().manual_seed(world)
    tensors = [torch.randn(5, 3, generator=g).bfloat16(), torch.randn(7, generator=g), torch.randn(1, 4, generator=g)]
    pieces, layout = [[] for _ in range(world)], []
    for t in tensors:
        d0, rest, size = t.shape[0], t.numel() // t.shape[0], t.element_size()
        chunk = -(-d0 // world)
        numel = -(-chunk * rest * size // 16) * 16 // size
        for r in range(world):
            rows = t.reshape(d0, rest)[r * chunk:(r + 1) * chunk].reshape(-1)
            pad = torch.zeros(numel, dtype=t.dtype)
            pad[:rows.numel()] = rows
            pieces[r].append(pad.view(torch.uint8))
        layout.append((numel * size, chunk * rest * size, t.dtype, tuple(t.shape)))
    per_rank = torch.stack([torch.cat(p) for p in pieces])
    for got, want in zip(unpack_gathered(per_rank, layout), tensors):
        assert torch.equal(got, want)
