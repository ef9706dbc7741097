"""Run by tests/test_vllm_rollout.py under ``torchrun --nproc_per_node 2`` (gloo, CPU):
an FSDP2-sharded tiny policy with colocated vLLM (external_launcher): one engine per rank,
or with AGPO_TEST_TP=2 one tensor-parallel engine over both ranks (each rank's prompts
sampled by the pair, each rank keeping its own rows); with AGPO_TEST_CKPT=1 the layers are
wrapped for activation checkpointing as ``--gradient-checkpointing`` wraps them (the
engine's loader must get the checkpoint's names, not ``_checkpoint_wrapped_module.``).
After a training step, each rank's engine must decode its own prompts exactly like HF
greedy decoding on the gathered, updated weights. Prints FSDP-VLLM-OK per rank."""

import os
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"

from test_vllm_rollout import (  # noqa: E402
    GREEDY,
    PROMPTS,
    engine_tokens,
    hf_greedy,
    tiny_cfg,
    train_once,
)

from agpo.learn.trainer import Trainer  # noqa: E402
from agpo.models import load_model_and_tokenizer  # noqa: E402
from agpo.scale.distributed import init_distributed, shutdown_distributed  # noqa: E402
from agpo.tasks.data import load_problems  # noqa: E402


def main() -> None:
    env = init_distributed("cpu")
    tp = int(os.environ.get("AGPO_TEST_TP", "1"))
    ckpt = os.environ.get("AGPO_TEST_CKPT") == "1"  # activation checkpointing: wrapped layer names
    cfg = tiny_cfg(Path(tempfile.mkdtemp()), vllm_tensor_parallel_size=tp, gradient_checkpointing=ckpt)
    model, tok = load_model_and_tokenizer("tiny", seed=0)
    tr = Trainer(cfg, model, tok, load_problems(cfg.data, split="train"), env=env)
    assert tr.layout.sharded
    mine = PROMPTS[env.rank::2]
    before, _ = engine_tokens(tr, mine, GREEDY)
    train_once(tr, seed=env.rank)
    after, _ = engine_tokens(tr, mine, GREEDY)
    with tr.layout.generation() as m:
        ref = hf_greedy(m, tok, mine, 6)
    assert after == ref, (env.rank, after, ref)
    assert tr.engine.syncs >= 2, tr.engine.syncs
    changed = torch.tensor([float(after != before)])
    torch.distributed.all_reduce(changed)
    assert changed.item() > 0, "the update should change some greedy continuation"
    print(f"rank {env.rank}: FSDP-VLLM-OK", flush=True)
    tr.close()
    shutdown_distributed()


if __name__ == "__main__":
    main()
