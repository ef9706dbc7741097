"""One training step of the tiny preset, end to end: tokens/s per phase (generate, score,
update), so a regression anywhere in the loop shows, not only in the kernels.

``pytest bench/test_bench_train.py --benchmark-only``: the tiny preset after a short
supervised warm-up (so rewards and advantages are not all zero), for AGPO (probe + train
rollouts) and GRPO (train rollouts only): 8 prompts x G=8 over 3 steps by default, the
default run's 16 prompts x G=8 over 5 steps with ``--bench-long``. ``extra_info`` holds the
median per-phase seconds and tokens/s over the measured steps; the table is printed at
the end (bench/report.py ``train_table``).
"""

import statistics

import pytest
import torch

from agpo.config import TrainConfig
from agpo.learn.launch import resolve_defaults
from agpo.learn.policy import Policy
from agpo.learn.sft import supervised_warmup
from agpo.learn.trainer import Trainer
from agpo.models import load_model_and_tokenizer
from agpo.tasks.data import load_problems

PHASES = {"generate": ("time/generate", "time/generate_probe"), "score": ("time/score",), "update": ("time/update",)}
RATES = {"generate": "perf/generate_tokens_per_s", "score": "perf/score_tokens_per_s",
         "update": "perf/update_tokens_per_s", "step": "perf/tokens_per_s"}


@pytest.fixture(scope="module")
def warm_model():
    torch.manual_seed(0)
    model, tok = load_model_and_tokenizer("tiny", seed=0)
    train = load_problems(dataset="arith", split="train")
    supervised_warmup(Policy(model), tok, train, steps=150, batch_size=64, lr=1e-3, progress=False)
    return model, tok, train


SIZES = {"small": (8, 3), "long": (16, 5)}
"""Size -> (prompts per step, measured steps)."""


@pytest.mark.parametrize("size", ["small", pytest.param("long", marks=pytest.mark.bench_long)])
@pytest.mark.parametrize("algo", ["agpo", "grpo"])
def test_train_step(benchmark, warm_model, algo, size):
    prompts, rounds = SIZES[size]
    import copy

    model, tok, train = warm_model
    cfg = TrainConfig()
    cfg.run.algo = algo
    cfg.rollout.prompts_per_step = prompts
    if algo == "grpo":
        cfg.controller.adaptive_clip = cfg.controller.adaptive_temp = False
    cfg = resolve_defaults(cfg)
    torch.manual_seed(0)
    trainer = Trainer(cfg, copy.deepcopy(model), tok, train)
    trainer.step()  # warm-up: first-call allocations
    seen = []
    benchmark.pedantic(lambda: seen.append(trainer.step()), rounds=rounds, iterations=1)
    info = {"bench": "train_step", "preset": "tiny" + ("" if size == "long" else " (small)"), "algo": algo,
            "device": str(trainer.device),
            "prompts": cfg.rollout.prompts_per_step, "group_size": cfg.rollout.group_size,
            "update_epochs": cfg.optim.update_epochs}
    for phase, keys in PHASES.items():
        info[f"{phase}_s"] = statistics.median(sum(m.get(k, 0.0) for k in keys) for m in seen)
    for phase, key in RATES.items():
        info[f"{phase}_tokens_per_s"] = statistics.median(m[key] for m in seen)
    info["generated_tokens"] = statistics.median(m["tokens/generated_probe"] + m["tokens/generated_train"]
                                                 for m in seen)
    benchmark.extra_info.update(info)
