"""``python -m agpo.train`` under torchrun (gloo, CPU) and with LoRA (issue 7).

One 2-rank launch trains the tiny preset for 3 steps with a KL reference and a
checkpoint after every step. The tests compare it with the same run in this process
(world size 1, same global batch and seed): per-step loss and metrics agree within float
tolerance, the exported final weights too, and the rank-2 checkpoint of step 2 resumes
at world size 1 into the same step 3. The held-out evaluation gives the ranks uneven
shares (8 and 9 problems in batches of 8), which hangs if ``generate`` syncs the ranks.
A 1-rank torchrun takes the sharded path and matches too. Rank independence comes from
the sampler (the noise of a row depends on its global index, not on which rank draws it)
and from running the controllers on the gathered global batch.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from tolerance import assert_same_update

from agpo.config import TrainConfig
from agpo.learn.launch import resolve_defaults, run
from agpo.learn.trainer import TIME_KEYS
from agpo.runtime import checkpoint as ckpt
from agpo.runtime.metrics_log import read_metrics

ROOT = Path(__file__).resolve().parents[1]
HAVE_PEFT = __import__("importlib").util.find_spec("peft") is not None

# eval 17 in batches of 8: rank 0 evaluates 8 problems in one generate call, rank 1 nine in two.
# The entropy bonus gives every step a gradient whatever rewards this machine's rollouts earn
# (a 40-step warm-up may solve none of the 4 prompts, and all-zero advantages move nothing).
FLAGS = {"steps": 3, "prompts_per_step": 4, "group_size": 4, "max_new_tokens": 6, "sft_steps": 40,
         "eval_size": 17, "generation_batch_size": 8, "beta": 0.03, "entropy_coef": 0.01, "save_every": 1,
         "keep_checkpoints": 3, "dist_timeout": 60, "device": "cpu"}


def cfg_for(out_dir: Path, **over) -> TrainConfig:
    cfg = TrainConfig()
    values = {**FLAGS, **over}
    for section in (cfg.model, cfg.rollout, cfg.optim, cfg.loss, cfg.warmup, cfg.run):
        for k in list(values):
            if hasattr(section, k):
                setattr(section, k, values.pop(k))
    assert not values, values
    cfg.run.out_dir, cfg.run.progress = str(out_dir), False
    return resolve_defaults(cfg)


def argv_for(out_dir: Path, **over) -> list[str]:
    out = []
    for k, v in {**FLAGS, **over}.items():
        out += [f"--{k.replace('_', '-')}", str(v)]
    return out + ["--out-dir", str(out_dir), "--no-progress"]


def torchrun(args: list[str], timeout: float = 150, nproc: int = 2) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           "-m", "agpo.train", *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


LAYOUT_KEYS = ("update/processed_tokens",)
"""Costs that depend on how the rows are split over ranks (padded micro-batches are padded
to each rank's own longest row), not results of the run."""


def rows(run_dir: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if not k.startswith(TIME_KEYS) and k not in LAYOUT_KEYS}
            for r in read_metrics(run_dir)]


def assert_rows_close(a: list[dict], b: list[dict], rtol: float = 1e-4, atol: float = 1e-5) -> None:
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for ra, rb in zip(a, b):
        assert set(ra) == set(rb), set(ra) ^ set(rb)
        for k in ra:
            assert ra[k] == pytest.approx(rb[k], rel=rtol, abs=atol), (ra["step"], k, ra[k], rb[k])


UPDATE_REL = 1e-3
"""The 2-rank and the 1-process runs' AdamW updates agree to this fraction of their norm
(tests/tolerance.py: ``assert_same_update``); a rank whose gradients were lost or wrong
differs by O(1)."""


def start_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    """The warmed-up start of a run (its ``reference`` folder), keyed like the export."""
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(str(Path(run_dir) / "reference")).state_dict()


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file
    return load_file(str(Path(run_dir) / "final" / "model.safetensors"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same run at world size 2 (torchrun) and 1 (this process)."""
    base = tmp_path_factory.mktemp("scale")
    p = torchrun(argv_for(base / "ws2"))
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-5000:]
    summary1 = run(cfg_for(base / "ws1"))
    return base, p, summary1


@pytest.mark.timeout(400)
def test_two_ranks_match_one_process(runs):
    base, p, summary1 = runs
    assert p.stdout.count("FSDP2 over 2 rank(s) (gloo)") == 1  # rank 0 alone prints
    summary2 = json.loads((base / "ws2" / "summary.json").read_text())
    assert summary2["world_size"] == 2 and summary1["world_size"] == 1
    a, b = rows(base / "ws2"), rows(base / "ws1")
    assert [r["step"] for r in a] == [1, 2, 3]
    assert_rows_close(a, b)
    for k in ("accuracy_before", "accuracy_after", "tokens_generated"):
        assert summary2[k] == pytest.approx(summary1[k]), k
    wa, wb = final_weights(base / "ws2"), final_weights(base / "ws1")
    assert set(wa) == set(wb)
    start = start_weights(base / "ws2")
    assert max(float((wa[k] - start[k]).abs().max()) for k in wa) > 1e-4  # the run moved the weights
    assert_same_update(wa, wb, start, rel=UPDATE_REL)
    # rank 0 alone wrote the run directory: one metrics line per step
    assert len((base / "ws2" / "metrics.jsonl").read_text().splitlines()) == 3


@pytest.mark.timeout(300)
def test_one_rank_torchrun_takes_the_sharded_path(runs, tmp_path):
    """``torchrun --nproc_per_node 1`` shards too (FSDP2 over a group of one, the path a
    single GPU uses for fp32 master weights) and gives the plain run's metrics."""
    base, _, _ = runs
    p = torchrun(argv_for(tmp_path / "t1", steps=2, eval_size=0, save_every=0), nproc=1)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-5000:]
    assert "FSDP2 over 1 rank(s) (gloo), float32 shards" in p.stdout
    assert json.loads((tmp_path / "t1" / "summary.json").read_text())["world_size"] == 1
    assert (tmp_path / "t1" / "checkpoints" / "step-000002" / "weights" / ".metadata").is_file()
    assert_rows_close(rows(tmp_path / "t1"), rows(base / "ws1")[:2])


@pytest.mark.timeout(300)
def test_checkpoint_from_two_ranks_resumes_at_one(runs):
    base, _, _ = runs
    resumed = base / "resumed"
    shutil.copytree(base / "ws2", resumed)
    shutil.rmtree(resumed / "checkpoints" / "step-000003")
    shutil.rmtree(resumed / "final")
    state = torch.load(resumed / "checkpoints" / "step-000002" / "trainer_state.pt", weights_only=False)
    assert state["world_size"] == 2
    cfg = cfg_for(resumed)
    cfg.run.resume = "auto"
    run(cfg)
    assert_rows_close(rows(resumed), rows(base / "ws1"))
    assert_same_update(final_weights(resumed), final_weights(base / "ws1"), start_weights(base / "ws1"), rel=UPDATE_REL)


@pytest.mark.skipif(not HAVE_PEFT, reason="pip install peft")
@pytest.mark.timeout(300)
def test_lora_trains_only_adapters(tmp_path):
    """LoRA through the training loop: the optimiser holds adapters only, the frozen base
    (LM head included) is bit-identical after the step, the adapters moved, the KL
    reference is the base with adapters off (kl/ref starts at 0), and the final export is
    the plain architecture with the adapters merged in."""
    from agpo.learn.trainer import Trainer
    from agpo.models import load_model_and_tokenizer
    from agpo.rollout import sample_groups
    from agpo.tasks.data import load_problems

    # one update epoch: its forwards all run at the step's start weights, the reference
    cfg = cfg_for(tmp_path / "lora", lora_rank=4, lora_alpha=8.0, steps=2, lr=1e-2, update_epochs=1)
    model, tok = load_model_and_tokenizer("tiny", seed=0)
    train = load_problems(cfg.data, split="train")
    base0 = {k: v.clone() for k, v in model.state_dict().items()}
    tr = Trainer(cfg, model, tok, train)
    names = {id(p): n for n, p in tr.model.named_parameters()}
    opt_names = [names[id(p)] for g in tr.optimizer.param_groups for p in g["params"]]
    assert opt_names and all(".lora_" in n for n in opt_names)
    lora0 = {n: p.detach().clone() for n, p in tr.model.named_parameters() if ".lora_" in n}
    roll = sample_groups(tr.model, tok, [p.prompt for p in train[:4]], torch.ones(4), group_size=4,
                         max_new_tokens=5)
    old, _ = tr.score(tr.policy, roll.batch)
    with tr.layout.reference() as ref:
        ref_logp, _ = tr.score(ref, roll.batch)
    torch.testing.assert_close(ref_logp, old)  # the adapters start at zero (lora_B = 0)
    metrics = tr.step()
    assert metrics["kl/ref"] == pytest.approx(0.0, abs=1e-6)
    # random advantages give the adapters a gradient whatever rewards the step earned
    adv = torch.randn(roll.batch.rows, generator=torch.Generator().manual_seed(0))
    tr.update(roll.batch, adv, torch.full((roll.batch.rows,), 0.2), old, ref_logp)
    after = {n.replace("base_model.model.", "").replace(".base_layer", ""): p.detach()
             for n, p in tr.model.named_parameters() if ".lora_" not in n}
    assert set(after) == set(base0) - {"lm_head.weight"} or set(after) == set(base0)
    for k, v in after.items():
        torch.testing.assert_close(v, base0[k], rtol=0, atol=0, msg=k)
    moved = [n for n, p in tr.model.named_parameters() if ".lora_B" in n and not torch.equal(p, lora0[n])]
    assert moved, "the adapters did not train"


@pytest.mark.skipif(not HAVE_PEFT, reason="pip install peft")
@pytest.mark.timeout(300)
def test_lora_run_resumes_and_exports(tmp_path):
    """A LoRA run checkpoints adapters only, resumes to the same metrics, and its final
    export (adapters merged) loads as a plain HF model giving the trained policy."""
    from torch.distributed.checkpoint import FileSystemReader

    # the entropy bonus (FLAGS) gives the adapters a gradient whatever rewards the groups earn
    full = cfg_for(tmp_path / "a", lora_rank=4, steps=2, beta=0.0, eval_size=0, lr=1e-3)
    run(full)
    saved = FileSystemReader(str(tmp_path / "a" / "checkpoints" / "step-000002" / "weights"))
    keys = [k for k in saved.read_metadata().state_dict_metadata if k.startswith("model.")]
    assert keys and all(".lora_" in k for k in keys), keys  # the frozen base is not saved
    shutil.copytree(tmp_path / "a", tmp_path / "b")      # as if the run had stopped after step 1
    shutil.rmtree(tmp_path / "b" / "checkpoints" / "step-000002")
    shutil.rmtree(tmp_path / "b" / "final")
    resumed = copy.deepcopy(full)
    resumed.run.out_dir, resumed.run.resume = str(tmp_path / "b"), "auto"
    run(resumed)
    assert_rows_close(rows(tmp_path / "a"), rows(tmp_path / "b"), rtol=1e-6, atol=1e-7)
    wa, wb = final_weights(tmp_path / "a"), final_weights(tmp_path / "b")
    assert not any("lora" in k for k in wa)
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=1e-6, msg=k)
    from transformers import AutoModelForCausalLM
    start = AutoModelForCausalLM.from_pretrained(str(tmp_path / "a" / "reference")).state_dict()
    assert max(float((wa[k] - start[k]).abs().max()) for k in wa) > 1e-5  # the merge changed weights


def test_prompts_must_split_evenly_over_ranks(tmp_path):
    from agpo.learn.trainer import Trainer
    from agpo.models import load_model_and_tokenizer
    from agpo.scale.distributed import DistEnv

    cfg = cfg_for(tmp_path, prompts_per_step=4)
    model, tok = load_model_and_tokenizer("tiny", seed=0)
    with pytest.raises(ValueError, match="--prompts-per-step 4: must be a multiple of the world size 3"):
        Trainer(cfg, model, tok, [], env=DistEnv(rank=0, world_size=3, local_rank=0, device=torch.device("cpu")))


# -- faults under torchrun (issue 20) -----------------------------------------------------------
PAUSING = f"{ROOT / 'tests/fixtures/fault_rewards.py'}:pausing"
CALLS_PER_STEP = 2 * 2 * 4  # per rank: probe + train rollouts of its 2 prompts x 4 samples


def kill_group(p: subprocess.Popen) -> None:
    """torchrun and its workers (which outlive a killed torchrun), if still there."""
    try:
        os.killpg(p.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    p.wait()


def torchrun_paused(tmp_path: Path, **over) -> tuple[subprocess.Popen, Path]:
    """A 2-rank launch whose rank 1 pauses inside its reward in step 2 (its pid in
    ``handshake/ready``) until ``handshake/go`` exists; output in ``handshake/stdout``,
    ``handshake/stderr`` (files: nothing blocks on a full pipe)."""
    handshake = tmp_path / "handshake"
    handshake.mkdir()
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), AGPO_TEST_RANK="1",
               AGPO_TEST_PAUSE_AT=str(CALLS_PER_STEP + 3), AGPO_TEST_DIR=str(handshake))
    args = argv_for(tmp_path / "run", **{"steps": 20, "sft_steps": 0, "eval_size": 0, "reward": PAUSING, **over})
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "--monitor-interval", "0.5", "-m", "agpo.train", *args]
    with open(handshake / "stdout", "w") as out, open(handshake / "stderr", "w") as err:
        p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=err, start_new_session=True)
    deadline = time.monotonic() + 240
    while not (handshake / "ready").exists():
        if p.poll() is not None or time.monotonic() > deadline:
            kill_group(p)
            pytest.fail("rank 1 never reached its pause:\n" + (handshake / "stderr").read_text()[-3000:])
        time.sleep(0.05)
    return p, handshake


def exit_codes(stderr: str) -> dict[int, int]:
    """Exit status by rank, from torchrun's failure report."""
    found = re.findall(r"rank\s*:\s*(\d+) \(local_rank.*\n\s*exitcode\s*:\s*(-?\d+)", stderr)
    return {int(r): int(c) for r, c in found}


@pytest.mark.timeout(300)
def test_signal_to_one_rank_stops_every_rank_after_the_same_step(tmp_path):
    """SIGTERM to rank 1 alone (one node of a job preempted, or a hand-sent signal): both
    ranks finish step 2, take one checkpoint together and exit 75."""
    p, handshake = torchrun_paused(tmp_path, save_every=0)
    try:
        os.kill(int((handshake / "ready").read_text()), signal.SIGTERM)
        (handshake / "go").touch()
        p.wait(timeout=240)
    finally:
        kill_group(p)
    out, err = (handshake / "stdout").read_text(), (handshake / "stderr").read_text()
    assert "SIGTERM on 1 of 2 rank(s): stopped after step 2" in out, out[-3000:] + err[-3000:]
    assert exit_codes(err) == {0: 75, 1: 75}, err[-3000:]
    run_dir = tmp_path / "run"
    assert [r["step"] for r in read_metrics(run_dir)] == [1, 2]
    assert [s for s, _ in ckpt.list_checkpoints(run_dir)] == [2]
    assert ckpt.validate(ckpt.checkpoint_dir(run_dir) / "step-000002")["world_size"] == 2


@pytest.mark.timeout(300)
def test_a_killed_rank_makes_the_other_exit_within_the_dist_timeout(tmp_path):
    """SIGKILL to rank 1 in the middle of step 2 while rank 0 waits for it in a collective:
    rank 0 exits by itself with status 69 and a clear error well within --dist-timeout,
    naming the last complete checkpoint (step 1)."""
    timeout_s = 40
    p, handshake = torchrun_paused(tmp_path, save_every=1, dist_timeout=timeout_s)
    try:
        os.kill(int((handshake / "ready").read_text()), signal.SIGKILL)
        t0 = time.monotonic()
        p.wait(timeout=240)
        elapsed = time.monotonic() - t0
    finally:
        kill_group(p)
    err = (handshake / "stderr").read_text()
    print(f"\ntorchrun exited {elapsed:.1f} s after rank 1 was killed (--dist-timeout {timeout_s})")
    assert elapsed < timeout_s, elapsed
    assert "rank 0 lost contact with the other ranks" in err, err[-4000:]
    assert "step-000001" in err and "--resume auto" in err
    assert exit_codes(err)[0] == 69, err[-3000:]
    assert ckpt.validate(ckpt.checkpoint_dir(tmp_path / "run") / "step-000001")["trainer"]["step"] == 1
