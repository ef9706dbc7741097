"""agpo's fused head inside verl's real FSDP2 engine (``impl_backend=agpo``), on CPU
processes through a test-only CPU platform (tests/verl_cpu.py), at 1 and 2 gloo ranks
(tests/verl_engine_check.py does the distributed part). In .venv-verl; skipped where verl is
not installed. For packed and padded batches, fixed and dynamic micro-batches:

- the log-probs and entropy at each row's temperature equal verl's own non-fused engine
  given the same per-row temperatures, and a float64 eager forward of the checkpoint;
- one training step gives verl's engine's gradients (a loss on log-probs and entropy);
- ``lm_head`` never returns the logits: every output it gives is ``[..., 2]`` (log-prob, entropy);
- each row's ``agpo_eps`` reaches the loss in every micro-batch;
- what needs the whole logits (``calculate_sum_pi_squared``) is refused by name, and so is
  a model whose forward transforms the logits after the head (soft-capping, logit scales).
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("verl", reason="verl is not installed here; .ci/run runs this file in .venv-verl")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

VOCAB = 97


def make_batch(seed: int, rows: int = 4, prompt: int = 5, response: int = 6) -> dict:
    """Left-padded prompts, right-padded responses of uneven lengths (one response of 1)."""
    g = torch.Generator().manual_seed(seed)
    plen = torch.randint(1, prompt + 1, (rows,), generator=g)
    rlen = torch.randint(1, response + 1, (rows,), generator=g)
    plen[0], rlen[0], rlen[-1] = prompt, response, 1
    ids = torch.randint(2, VOCAB, (rows, prompt + response), generator=g)
    attention = torch.zeros(rows, prompt + response, dtype=torch.long)
    mask = torch.zeros(rows, response, dtype=torch.long)
    for i in range(rows):
        attention[i, prompt - plen[i]:prompt + rlen[i]] = 1
        mask[i, :rlen[i]] = 1
    return {"input_ids": ids, "attention_mask": attention, "response_mask": mask,
            "position_ids": (attention.cumsum(1) - 1).clamp(min=0), "row": torch.arange(rows),
            "temperature": 0.5 + torch.rand(rows, generator=g), "coef": torch.randn(rows, generator=g),
            "agpo_eps": 0.1 + 0.2 * torch.rand(rows, generator=g)}


def eager_oracle(folder: str, batch: dict, rows: list[int]):
    """float64 eager log-probs of each row's next tokens (its last position predicts past
    the sequence: verl labels it with whatever its micro-batch packs next, so it is left
    out) and entropy of every position, at the rows' temperatures."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float64, attn_implementation="eager").eval()
    seqs = [batch["input_ids"][r][batch["attention_mask"][r].bool()] for r in rows]
    out = []
    with torch.no_grad():
        for r, s in zip(rows, seqs):
            z = model(s[None]).logits[0] / batch["temperature"][r].double()
            logp = torch.log_softmax(z, -1)
            out.append((logp[:-1].gather(-1, s[1:, None])[:, 0], -(logp.exp() * logp).sum(-1)))
    return out


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from verl_cpu import tiny_qwen2

    return tiny_qwen2(tmp_path_factory.mktemp("tiny_qwen2"), vocab=VOCAB, seed=3)


def launch(model_dir, tmp_path, world: int, batch: dict) -> list[dict]:
    torch.save(batch, tmp_path / "batch.pt")
    out = tmp_path / f"out{world}"
    out.mkdir()
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(world),
           str(ROOT / "tests" / "verl_engine_check.py"), model_dir, str(tmp_path / "batch.pt"), str(out)]
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-6000:]
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(world)]


@pytest.mark.parametrize("world", [1, 2])
def test_agpo_head_in_verls_engine_matches_verl_and_eager(model_dir, tmp_path, world):
    batch = make_batch(seed=world)
    ranks = launch(model_dir, tmp_path, world, batch)
    for res in ranks:
        oracle = eager_oracle(model_dir, batch, res["rows"])
        for layout in ("packed", "packed_dynamic", "padded"):
            verl, agpo = res[layout]["verl"], res[layout]["agpo"]
            assert verl["engine"] == "FSDPEngineWithLMHead" and agpo["engine"] == "AGPOFSDPEngineWithLMHead"
            for i, (ref_lp, ref_h) in enumerate(oracle):
                for got in (verl, agpo):
                    torch.testing.assert_close(got["logp"][i][:-1].double(), ref_lp, rtol=0, atol=2e-5)
                    torch.testing.assert_close(got["entropy"][i].double(), ref_h, rtol=0, atol=2e-5)
                torch.testing.assert_close(agpo["logp"][i], verl["logp"][i], rtol=0, atol=5e-6)
                torch.testing.assert_close(agpo["entropy"][i], verl["entropy"][i], rtol=0, atol=5e-6)
            assert agpo["grads"].keys() == verl["grads"].keys() and "lm_head.weight" in agpo["grads"]
            for name, g in verl["grads"].items():
                torch.testing.assert_close(agpo["grads"][name], g, rtol=1e-4, atol=1e-6, msg=f"{layout} {name}")
            assert agpo["head_shapes"] and all(s[-1] == 2 for s in agpo["head_shapes"])
            assert all(s[-1] == VOCAB for s in verl["head_shapes"])
            assert agpo["refused"].startswith("calculate_sum_pi_squared=True with fused_kernel_options.impl_backend=agpo")
            for got in (verl, agpo):  # every micro-batch's loss saw its rows' own eps
                seen = torch.cat([rows for rows, _ in got["eps_seen"]])
                assert sorted(seen.tolist()) == sorted(res["rows"])
                for rows, eps in got["eps_seen"]:
                    torch.testing.assert_close(eps, batch["agpo_eps"][rows], rtol=0, atol=0)
    if world == 2:
        assert ranks[0]["rows"] != ranks[1]["rows"]


def test_the_rows_temperatures_matter_here(model_dir):
    """The comparisons above would see a temperature dropped: at 1.0 the rows score otherwise.
    (That verl's V1 trainer never sends its scalar over the rows' temperatures is
    tests/test_verl_trainer.py's.)"""
    batch = make_batch(seed=5)
    rows = list(range(batch["row"].shape[0]))
    at_rows = eager_oracle(model_dir, batch, rows)
    at_one = eager_oracle(model_dir, {**batch, "temperature": torch.ones(len(rows))}, rows)
    assert max((a[0] - b[0]).abs().max().item() for a, b in zip(at_rows, at_one)) > 1e-2


@pytest.mark.parametrize("attr, value", [("final_logit_softcapping", 30.0), ("logit_scale", 0.0625),
                                         ("logits_scaling", 8.0)])
def test_a_model_that_transforms_the_logits_is_refused(attr, value):
    from transformers import Qwen2Config

    from agpo_kernels.integrations.verl.engine import check_head_model

    check_head_model(Qwen2Config())  # a plain head: fine
    check_head_model(Qwen2Config(**{attr: None if attr == "final_logit_softcapping" else 1.0}))
    with pytest.raises(NotImplementedError, match=rf"^impl_backend=agpo: .* \({attr}={value}\); set use_fused"):
        check_head_model(Qwen2Config(**{attr: value}))

