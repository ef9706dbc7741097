"""Run by tests/test_weight_sync.py under ``torchrun --nproc_per_node 2`` (gloo, CPU):
``python -m torch.distributed.run --standalone --nproc_per_node 2 tests/weight_sync_check.py
MODEL_DIR OUT_DIR``. The policy is laid out exactly as ``agpo.train`` lays it out under
torchrun (``prepare_layout``: activation checkpointing, FSDP2 over both ranks, weights read
into the shards), then streamed as the vLLM engine streams it (``policy_weights``). Each
rank writes what it received and the stream's counters to OUT_DIR/rank{R}.pt; the test
compares them with the checkpoint itself. A second layout does the same with LoRA on a
bf16 base and records the dtypes the adapters compute in."""

import sys
from pathlib import Path

import torch

from agpo.config import TrainConfig
from agpo.rollout.weights import SyncStats, policy_weights
from agpo.scale.distributed import init_distributed, shutdown_distributed
from agpo.scale.loading import empty_model
from agpo.scale.parallel import prepare_layout


def _full_ft(folder: Path, env) -> dict:
    cfg = TrainConfig()
    cfg.model.gradient_checkpointing = True
    model = empty_model(folder, dtype=torch.float32, attn="sdpa")
    layout = prepare_layout(cfg, model, env, weights=folder)
    out = {"n_layers": model.config.num_hidden_layers}
    for key, dtype, bucket in (("bf16", torch.bfloat16, 2**30), ("fp32", None, 2**30),
                               ("bf16_buckets", torch.bfloat16, 4096)):
        stats = SyncStats()
        got = {n: t.clone() for n, t in policy_weights(layout.model, dtype=dtype, stats=stats, bucket_bytes=bucket)}
        out[key] = {"weights": got, "stats": vars(stats)}
    out["module_names"] = [n for n, _ in layout.model.named_parameters()]
    return out


def _lora(folder: Path, env) -> dict:
    from agpo.models import load_model_and_tokenizer

    cfg = TrainConfig()
    cfg.model.lora_rank, cfg.model.lora_alpha, cfg.model.gradient_checkpointing = 4, 8.0, True
    model, tok = load_model_and_tokenizer(str(folder), seed=0, device="cpu", dtype=torch.bfloat16)
    layout = prepare_layout(cfg, model, env, compute_dtype=torch.bfloat16)
    seen = {}

    def hook(name):
        def record(module, args, output):
            seen.setdefault(name, (str(module.weight.dtype), str(args[0].dtype), str(output.dtype)))
        return record

    for name, module in layout.model.named_modules():
        if name.endswith(("lora_A.default", "lora_B.default")):
            module.register_forward_hook(hook(name))
    with torch.no_grad():
        for n, p in layout.model.named_parameters():
            if "lora_B" in n:  # B = 0 at creation: give the merge something to do
                local = p.to_local()
                local.normal_(0, 0.2, generator=torch.Generator().manual_seed(len(n) + env.rank))
    ids = tok(["12+34=", "7*8="], return_tensors="pt", padding=True)
    from agpo.learn.batches import SequenceBatch
    batch = SequenceBatch(prompt_ids=ids["input_ids"], prompt_mask=ids["attention_mask"],
                          completion_ids=ids["input_ids"][:, :3], completion_mask=torch.ones(2, 3, dtype=torch.long),
                          temperature=torch.ones(2))
    with torch.no_grad():
        layout.policy(batch)
    layout.release()
    stats = SyncStats()
    got = {n: t.clone() for n, t in policy_weights(layout.model, dtype=torch.bfloat16, stats=stats)}
    adapters = {}
    for n, p in layout.model.named_parameters():
        if ".lora_" in n:
            adapters[n] = (p.full_tensor().detach().clone(), str(p.dtype))
    return {"weights": got, "stats": vars(stats), "adapter_compute": seen, "adapters": adapters}


def _lora_streamed(folder: Path, env) -> dict:
    """LoRA as ``agpo.train`` lays it out under torchrun now: the bf16 base empty (meta),
    adapters created on it and initialised from the seed, each rank reading its shards."""
    import resource

    cfg = TrainConfig()
    cfg.model.lora_rank, cfg.model.gradient_checkpointing = 4, True
    model = empty_model(folder, dtype=torch.bfloat16, attn="sdpa")
    on_meta = all(p.is_meta for p in model.parameters())
    layout = prepare_layout(cfg, model, env, compute_dtype=torch.bfloat16, weights=folder)
    got = {n: t.clone() for n, t in policy_weights(layout.model, dtype=torch.bfloat16)}
    adapters = {n: (p.full_tensor().detach().clone(), str(p.dtype)) for n, p in layout.model.named_parameters()
                if ".lora_" in n}
    base_dtypes = {str(p.dtype) for n, p in layout.model.named_parameters() if ".lora_" not in n}
    return {"weights": got, "adapters": adapters, "base_dtypes": base_dtypes, "on_meta": on_meta,
            "peak_rss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}


def main() -> None:
    folder, out = Path(sys.argv[1]), Path(sys.argv[2])
    env = init_distributed("cpu", timeout_s=120)
    res = {"full": _full_ft(folder, env), "lora": _lora(folder, env), "lora_streamed": _lora_streamed(folder, env),
           "world": env.world_size}
    torch.save(res, out / f"rank{env.rank}.pt")
    shutdown_distributed()


if __name__ == "__main__":
    main()
