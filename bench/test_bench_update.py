"""The update side of a step on a real model: padded vs packed micro-batches.

``pytest bench/test_bench_update.py --benchmark-only``: the smollm2-135m preset (on a GPU
also with Liger's decoder kernels, ``--liger``, against without), at a small size by
default and at the size bench/results/ quotes with ``--bench-long``.

- ``update``: one update pass (``update_epochs=1``) of ``Trainer.update`` over a rollout
  batch with a realistic length spread: prompts of 40-120 tokens, completions drawn
  log-normally around 60 tokens and cut at a cap (long: 32 rows, the preset's cap of 256,
  GSM8K/MATH-like: tens to hundreds of tokens in one group; small: 4 rows, cap 32).
  Padded and packed run the same rows with the same micro-batch budget.
- ``step``: one full AGPO step (probe, rollouts, scoring, update, step KL) on chain_sum
  (long: 4 prompts x G=4, 64 new tokens; small: 2 prompts x G=2, 8 new tokens).

``extra_info`` carries the real and processed token counts, tokens/s and the peak memory
of one call (CUDA: ``max_memory_allocated`` growth; CPU: VmHWM growth, reset first).
"""

import copy
import statistics

import pytest
import torch
from peak_rss import status_mib

from agpo.config import TrainConfig
from agpo.learn.batches import SequenceBatch
from agpo.learn.launch import resolve_defaults
from agpo.learn.trainer import Trainer
from agpo.models import ModelNotFoundError, load_model_and_tokenizer
from agpo.tasks.data import load_problems

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
LIGER = [False, True] if DEVICE == "cuda" else [False]
SIZES = ["small", pytest.param("long", marks=pytest.mark.bench_long)]
UPDATE_SIZES = {"small": dict(rows=4, cap=32), "long": dict(rows=32, cap=256)}
STEP_SIZES = {"small": dict(prompts_per_step=2, group_size=2, max_new_tokens=8),
              "long": dict(prompts_per_step=4, group_size=4, max_new_tokens=64)}


def _label(size: str) -> str:
    return "smollm2-135m" + ("" if size == "long" else " (small)")


def _peak_reset() -> float:
    if DEVICE == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated() / 2**20
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return status_mib("VmRSS")


def _peak_growth(base: float) -> float:
    if DEVICE == "cuda":
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() / 2**20 - base
    return status_mib("VmHWM") - base


def realistic_batch(vocab: int, rows: int = 32, cap: int = 256, seed: int = 0) -> SequenceBatch:
    g = torch.Generator().manual_seed(seed)
    plens = torch.randint(40, 121, (rows,), generator=g)
    clens = (60 * torch.exp(0.8 * torch.randn(rows, generator=g))).round().clamp(8, cap).long()
    P, C = int(plens.max()), int(clens.max())
    batch = SequenceBatch(torch.zeros(rows, P, dtype=torch.long), torch.zeros(rows, P, dtype=torch.long),
                          torch.zeros(rows, C, dtype=torch.long), torch.zeros(rows, C, dtype=torch.long),
                          torch.ones(rows))
    for r, (p, c) in enumerate(zip(plens.tolist(), clens.tolist())):
        batch.prompt_ids[r, P - p:] = torch.randint(3, vocab, (p,), generator=g)
        batch.prompt_mask[r, P - p:] = 1
        batch.completion_ids[r, :c] = torch.randint(3, vocab, (c,), generator=g)
        batch.completion_mask[r, :c] = 1
    return batch


@pytest.fixture(scope="module")
def smollm2():
    try:
        return load_model_and_tokenizer("smollm2-135m", device=DEVICE)
    except ModelNotFoundError as e:
        pytest.skip(str(e))


def _trainer(model, tok, packing: bool, liger: bool = False, **over) -> Trainer:
    cfg = TrainConfig()
    cfg.model.model, cfg.model.device = "smollm2-135m", DEVICE
    cfg.data.dataset = "chain_sum"
    cfg.optim.update_epochs, cfg.optim.packing = 1, packing
    cfg.optim.micro_batch_tokens = 2048
    for k, v in over.items():
        for section in (cfg.rollout, cfg.optim, cfg.run, cfg.model):
            if hasattr(section, k):
                setattr(section, k, v)
    model = copy.deepcopy(model)
    if liger:
        from agpo.scale.liger import apply_liger
        apply_liger(model, DEVICE)
    return Trainer(resolve_defaults(cfg), model, tok, load_problems(cfg.data, split="train"))


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("liger", LIGER)
@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_update_pass(benchmark, smollm2, layout, liger, size):
    model, tok = smollm2
    tr = _trainer(model, tok, packing=layout == "packed", liger=liger)
    batch = realistic_batch(model.config.vocab_size, **UPDATE_SIZES[size])
    g = torch.Generator().manual_seed(1)
    adv = torch.randn(batch.rows, generator=g)
    old = -2.0 + 0.1 * torch.randn(batch.completion_ids.shape, generator=g)
    eps = torch.full((batch.rows,), 0.2)
    tr.update(batch, adv, eps, old, None)  # warm-up
    seen = []
    base = _peak_reset()
    benchmark.pedantic(lambda: seen.append(tr.update(batch, adv, eps, old, None)), rounds=3, iterations=1)
    m = seen[-1]
    benchmark.extra_info.update(bench="update", model=_label(size) + (" +liger" if liger else ""), layout=layout,
                                device=DEVICE,
                                rows=batch.rows, real_tokens=m["update/real_tokens"],
                                processed_tokens=m["update/processed_tokens"], peak_mib=_peak_growth(base))


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_full_step(benchmark, smollm2, layout, size):
    model, tok = smollm2
    tr = _trainer(model, tok, packing=layout == "packed", update_epochs=2, **STEP_SIZES[size])
    tr.step()
    seen = []
    base = _peak_reset()
    benchmark.pedantic(lambda: seen.append(tr.step()), rounds=3 if size == "long" else 2, iterations=1)
    benchmark.extra_info.update(
        bench="step", model=_label(size), layout=layout, device=DEVICE,
        real_tokens=statistics.median(m["update/real_tokens"] for m in seen),
        processed_tokens=statistics.median(m["update/processed_tokens"] for m in seen),
        update_s=statistics.median(m["time/update"] for m in seen),
        generate_s=statistics.median(m["time/generate"] + m.get("time/generate_probe", 0.0) for m in seen),
        peak_mib=_peak_growth(base))
