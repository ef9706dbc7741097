"""Loading straight into FSDP2 shards (agpo.scale.loading), with 2 gloo ranks on CPU.

The ranks build the model empty, shard it, and read only their own rows of the
safetensors files. Checked: the sharded weights are the file's, bit for bit (converted to
the shards' dtype); a rank's peak host memory while loading grows by about its share of
the model, not the model (SmolLM2-135M: measured here, and written to the results file
the docs quote); and a run of ``agpo.train`` that loads this way (policy and KL reference)
gives the same metrics as one process loading the plain way.

The worker part runs this file under torchrun (like tests/test_distributed.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(field)


class AnonPeak:
    """Peak of this process's anonymous resident memory (``RssAnon``: its own allocations)
    while the block runs, sampled every millisecond. File-backed resident pages (the
    memory-mapped safetensors file being read) are page cache, shared by every rank of the
    node and reclaimable, so ``VmHWM`` overstates what a rank costs; both are reported."""

    def __enter__(self):
        import threading
        self.before, self.peak, self._stop = _status_bytes("RssAnon"), 0, threading.Event()

        def sample():
            while not self._stop.is_set():
                self.peak = max(self.peak, _status_bytes("RssAnon") - self.before)
                self._stop.wait(0.001)
        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _status_bytes("RssAnon") - self.before)


def worker(folder: Path, out: Path) -> None:
    """One rank: empty model -> FSDP2 -> materialize; peak memory growth and the weights."""
    from safetensors import safe_open

    from agpo.learn.policy import Policy
    from agpo.scale.distributed import (
        device_mesh,
        init_distributed,
        shard_model,
        shutdown_distributed,
    )
    from agpo.scale.loading import empty_model, hf_parameter_names, materialize

    env = init_distributed("cpu", timeout_s=120)
    empty_model(folder, dtype=torch.float32, attn="sdpa")  # the imports it needs are not weights
    with open("/proc/self/clear_refs", "w") as f:   # VmHWM := VmRSS (Linux >= 4.0)
        f.write("5")
    before = _status_bytes("VmRSS")
    with AnonPeak() as anon:
        model = empty_model(folder, dtype=torch.float32, attn="sdpa")
        policy = Policy(model)
        shard_model(policy, list(model.model.layers), mesh=device_mesh(env))
        materialize(policy, model, folder, env.device)
    peak = _status_bytes("VmHWM") - before
    params = hf_parameter_names(model)
    local = sum(p.to_local().numel() * p.element_size() for p in params.values())
    total = sum(p.numel() * p.element_size() for p in params.values())
    mismatched = []
    files = sorted(folder.glob("*.safetensors"))
    for name, p in params.items():                  # collective: every rank gathers each tensor
        full = p.full_tensor()
        if env.is_main:
            for fname in files:
                with safe_open(str(fname), framework="pt") as f:
                    if name in f.keys():
                        want = f.get_tensor(name).to(full.dtype)
            if not torch.equal(full, want):
                mismatched.append(name)
    (out / f"rank{env.rank}.json").write_text(json.dumps(
        {"peak": peak, "anon_peak": anon.peak, "local_bytes": local, "model_bytes": total, "mismatched": mismatched,
         "tied": model.lm_head.weight is model.model.embed_tokens.weight}))
    shutdown_distributed()


def torchrun(args: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), TORCHELASTIC_ERROR_FILE="")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.timeout(600)
def test_two_ranks_load_only_their_shards(tmp_path):
    pytest.importorskip("gguf")
    from agpo.models import ModelNotFoundError, smollm2_dir
    try:
        folder = smollm2_dir()
    except ModelNotFoundError as e:
        pytest.skip(str(e))
    p = torchrun([__file__, "--worker", str(folder), str(tmp_path)])
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-5000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["mismatched"] == [] and ranks[0]["tied"]
    model = ranks[0]["model_bytes"]
    for r in ranks:
        assert 0.45 * model < r["local_bytes"] < 0.55 * model  # half of the model each
        # its own memory: its shards plus the slice being read; the plain path allocates the
        # full model on every rank (>= 1.0x) before sharding
        assert r["anon_peak"] < 0.75 * model, (r["anon_peak"] / model, r)
    print(f"\nSmolLM2-135M fp32 ({model / 2**20:.0f} MiB), 2 ranks, growth while loading: "
          + ", ".join(f"rank {i}: own memory {r['anon_peak'] / 2**20:.0f} MiB ({r['anon_peak'] / model:.2f}x), "
                      f"RSS with the mapped file {r['peak'] / 2**20:.0f} MiB" for i, r in enumerate(ranks)))


@pytest.mark.timeout(600)
def test_streamed_run_equals_plain_run(tmp_path):
    """``python -m agpo.train --model DIR`` under torchrun reads each rank's shards from DIR
    (policy and reference); the same run in one process loads DIR the plain way."""
    from test_train_scale import assert_rows_close, rows

    from agpo.config import config_from_args
    from agpo.learn.launch import resolve_defaults, run
    from agpo.learn.policy import Policy
    from agpo.learn.sft import supervised_warmup
    from agpo.models import load_model_and_tokenizer
    from agpo.tasks.data import load_problems

    model, tok = load_model_and_tokenizer("tiny", seed=0)
    supervised_warmup(Policy(model), tok, load_problems(dataset="arith", split="train"), steps=60, batch_size=64,
                      lr=2e-3, progress=False)
    folder = tmp_path / "start"
    model.save_pretrained(str(folder))
    tok.save_pretrained(str(folder))
    flags = ["--model", str(folder), "--dataset", "arith", "--steps", "2", "--prompts-per-step", "4",
             "--group-size", "4", "--max-new-tokens", "5", "--sft-steps", "0", "--eval-size", "0", "--beta", "0.03",
             "--device", "cpu", "--no-progress"]
    p = torchrun(["-m", "agpo.train", *flags, "--out-dir", str(tmp_path / "ws2")])
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-5000:]
    assert "weights read into the shards" in p.stdout
    run(resolve_defaults(config_from_args([*flags, "--out-dir", str(tmp_path / "ws1")])))
    a, b = rows(tmp_path / "ws2"), rows(tmp_path / "ws1")
    assert [r["step"] for r in a] == [1, 2] and "kl/ref" in a[0]
    assert_rows_close(a, b)


if __name__ == "__main__" and len(sys.argv) == 4 and sys.argv[1] == "--worker":
    worker(Path(sys.argv[2]), Path(sys.argv[3]))
