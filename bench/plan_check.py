"""The memory planner's update phase against a measured peak: one update of a scaled-down Qwen2.

    python3 bench/plan_check.py [--device cuda] [--layers 8] [--micro-batch-tokens 4096]
    torchrun --nproc_per_node 1 bench/plan_check.py --device cuda     # FSDP2 on one rank

Builds a random Qwen2 of the Qwen2.5 architecture class (config only, no download), plans it
with ``agpo.scale.memory`` for the same flags (activation checkpointing on, the fused head,
``--micro-batch-tokens``), runs ``Trainer.update`` once (two optimiser steps, so AdamW's states
exist) and prints the plan's update peak beside ``torch.cuda.max_memory_allocated`` (from a
fresh process, so it counts the resident state too). The plan's CUDA-context and engine rows
are not allocations and are left out. Exit 0 when the measured peak lies within
``--tolerance`` of the plan, 1 when not; on a CPU it runs the same step (checking the script)
and reports the plan only (exit 0).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agpo.config import TrainConfig  # noqa: E402
from agpo.learn.batches import SequenceBatch  # noqa: E402
from agpo.learn.launch import resolve_defaults  # noqa: E402
from agpo.learn.trainer import Trainer  # noqa: E402
from agpo.models import build_char_tokenizer  # noqa: E402
from agpo.scale.distributed import init_distributed, shutdown_distributed  # noqa: E402
from agpo.scale.memory import GiB, Knobs, ModelShape, plan_memory  # noqa: E402
from agpo.tasks.data import load_problems  # noqa: E402

NOT_ALLOCATED = ("CUDA context", "vLLM engine")


def qwen2_config(layers: int) -> dict:
    return {"model_type": "qwen2", "hidden_size": 1024, "intermediate_size": 2816, "num_hidden_layers": layers,
            "num_attention_heads": 16, "num_key_value_heads": 4, "vocab_size": 32768, "tie_word_embeddings": False,
            "max_position_embeddings": 4096, "torch_dtype": "bfloat16"}


def batch(rows: int, prompt: int, completion: int, vocab: int) -> SequenceBatch:
    g = torch.Generator().manual_seed(0)
    return SequenceBatch(torch.randint(3, vocab, (rows, prompt), generator=g),
                         torch.ones(rows, prompt, dtype=torch.long),
                         torch.randint(3, vocab, (rows, completion), generator=g),
                         torch.ones(rows, completion, dtype=torch.long), torch.ones(rows))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--micro-batch-tokens", type=int, default=4096)
    ap.add_argument("--rows", type=int, default=16)
    ap.add_argument("--tolerance", type=float, default=0.25)
    ap.add_argument("--json", default=None, help="also write the figures here")
    a = ap.parse_args(argv)
    from transformers import AutoConfig, AutoModelForCausalLM

    env = init_distributed(a.device)
    cuda = env.device.type == "cuda"
    compute = torch.bfloat16 if cuda else torch.float32
    raw = qwen2_config(a.layers)
    config = AutoConfig.for_model(**{k: v for k, v in raw.items() if k != "torch_dtype"})
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).to(compute)
    if not env.distributed:
        model.to(env.device)
    cfg = TrainConfig()
    cfg.model.device, cfg.model.gradient_checkpointing = a.device, True
    cfg.data.dataset = "arith"
    cfg.optim.micro_batch_tokens, cfg.optim.packing, cfg.optim.update_epochs = a.micro_batch_tokens, False, 2
    cfg.rollout.engine = "hf"
    cfg = resolve_defaults(cfg)
    tok = build_char_tokenizer()
    tr = Trainer(cfg, model, tok, load_problems(cfg.data, split="train"), env=env, compute_dtype=compute)
    seq = a.micro_batch_tokens // 4
    b = batch(a.rows, seq // 4, seq - seq // 4, raw["vocab_size"])
    adv = torch.randn(a.rows)
    old = torch.full(b.completion_ids.shape, -2.0)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    tr.update(b, adv, torch.full((a.rows,), 0.2), old, None)
    measured = None
    if cuda:
        torch.cuda.synchronize()
        measured = torch.cuda.max_memory_allocated()
    k = Knobs(world=env.world_size, nproc_per_node=env.world_size, sharded=env.distributed,
              compute_bytes=compute.itemsize, checkpointing=True, micro_batch_tokens=a.micro_batch_tokens,
              engine="hf")
    plan = plan_memory(ModelShape.from_config(raw), k)
    allocated = plan.update.peak - sum(i.bytes for i in plan.update.items if i.name.startswith(NOT_ALLOCATED))
    out = {"device": str(env.device), "sharded": env.distributed, "parameters": ModelShape.from_config(raw).parameters(),
           "micro_batch_tokens": a.micro_batch_tokens, "planned_gib": allocated / GiB,
           "measured_gib": None if measured is None else measured / GiB}
    ok = True
    if measured is not None:
        out["ratio"] = measured / allocated
        ok = abs(out["ratio"] - 1) <= a.tolerance
    if env.is_main:
        print(json.dumps(out))
        print("plan_check: " + ("no CUDA: the plan only" if measured is None else
                                f"measured {measured / GiB:.2f} GiB vs planned {allocated / GiB:.2f} GiB "
                                f"({out['ratio']:.2f}x): {'within' if ok else 'OUTSIDE'} {a.tolerance:.0%}"))
        if a.json:
            Path(a.json).write_text(json.dumps(out, indent=2) + "\n")
    shutdown_distributed()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
