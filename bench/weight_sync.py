"""Weight-sync cost on CPU, per FSDP unit vs one parameter at a time (issue 23, finding 8).

``python -m torch.distributed.run --standalone --nproc_per_node 2 bench/weight_sync.py
[--model smollm2-135m|DIR] [--repeats 3] [--old REV]`` lays the model out as ``agpo.train`` does
under torchrun (full fine-tuning, FSDP2 over the ranks, weights read into fp32 shards) and
streams its weights as the vLLM engine does, into a consumer that copies each tensor into
a preallocated engine-dtype (bf16) buffer like vLLM's loader:

- ``old``: the stream of git revision ``--old`` (default ``9c7a2a9``, before the change):
  one ``DTensor.full_tensor`` per parameter, in the shards' fp32; its collectives are
  counted by wrapping its gather helper (one all-gather each);
- ``new``: ``agpo.rollout.weights.policy_weights(dtype=bf16)``: one all-gather per FSDP unit
  of the shards cast to bf16 first; counted by the stream itself (``SyncStats``).

Rank 0 prints one row per variant: collectives per sync, bytes received per rank per
sync, seconds per sync (median of ``--repeats``); and a JSON line. gloo on CPU: the
seconds are CPU copies and loopback TCP, not NVLink; the counts and bytes are exact.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from agpo.config import TrainConfig  # noqa: E402
from agpo.rollout.weights import SyncStats, policy_weights  # noqa: E402
from agpo.scale.distributed import init_distributed, shutdown_distributed  # noqa: E402
from agpo.scale.loading import empty_model, weights_dir  # noqa: E402
from agpo.scale.parallel import prepare_layout  # noqa: E402


def old_stream(rev: str):
    """The ``policy_weights`` of git revision ``rev`` and a counter of its gathers."""
    src = subprocess.run(["git", "show", f"{rev}:agpo/rollout/weights.py"], cwd=ROOT, capture_output=True,
                         text=True, check=True).stdout
    path = Path(tempfile.mkdtemp()) / "old_weights.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location("old_weights", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    count = {"collectives": 0, "bytes": 0}
    full = mod._full

    def counted(p):
        t = full(p)
        if callable(getattr(p, "full_tensor", None)):
            count["collectives"] += 1
            count["bytes"] += t.numel() * t.element_size()
        return t

    mod._full = counted
    return mod.policy_weights, count


def consume(stream, engine: dict[str, torch.Tensor]) -> int:
    n = 0
    for name, t in stream:
        engine[name].copy_(t)  # vLLM's loader: a copy into the engine's (bf16) parameter
        n += 1
    return n


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--old", default="9c7a2a9")
    a = ap.parse_args()
    env = init_distributed("cpu", timeout_s=600)
    folder = weights_dir(a.model)
    if folder is None:
        raise SystemExit(f"{a.model}: no local safetensors folder")
    cfg = TrainConfig()
    model = empty_model(folder, dtype=torch.float32, attn="sdpa")
    layout = prepare_layout(cfg, model, env, weights=folder)
    engine = {n: torch.empty(t.shape, dtype=torch.bfloat16) for n, t in policy_weights(layout.model)}
    old_fn, old_count = old_stream(a.old)
    rows = {}
    for variant in ("old", "new"):
        times = []
        for _ in range(a.repeats):
            torch.distributed.barrier()
            stats = SyncStats()
            old_count.update(collectives=0, bytes=0)
            t0 = time.perf_counter()
            if variant == "old":
                consume(old_fn(layout.model), engine)
            else:
                consume(policy_weights(layout.model, dtype=torch.bfloat16, stats=stats), engine)
            torch.distributed.barrier()
            times.append(time.perf_counter() - t0)
        c = old_count if variant == "old" else vars(stats)
        rows[variant] = {"collectives": c["collectives"], "bytes": c["bytes"], "seconds": statistics.median(times),
                         "tensors": len(engine)}
    if env.is_main:
        n = sum(p.numel() for p in model.parameters())
        print(f"model {a.model}: {n / 1e6:.1f} M parameters, {model.config.num_hidden_layers} layers, "
              f"world size {env.world_size} (gloo, CPU), engine dtype bf16")
        for k, r in rows.items():
            print(f"{k:>4}: {r['collectives']:4d} collectives/sync  {r['bytes'] / 2**20:8.1f} MiB received/rank/sync  "
                  f"{r['seconds']:.3f} s/sync")
        print(json.dumps({"model": a.model, "params": n, "world": env.world_size, **rows}))
    shutdown_distributed()


if __name__ == "__main__":
    main()
