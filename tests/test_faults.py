"""Faults a long run survives (issue 20): non-finite steps, damaged or malicious
checkpoints, a disk that fills up while a checkpoint is written.

Everything runs the real trainer on the tiny preset, real files and real DCP folders;
faults are planted where they happen in practice: a forward hook that turns one layer's
output into NaN, a reward whose values overflow the group statistics, truncated and
crafted checkpoint files, a file writer that runs out of space half-way through a write.
"""

from __future__ import annotations

import contextlib
import copy
import errno
import io
import os
import pickle
import shutil
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from test_train_scale import rows

from agpo.config import TrainConfig
from agpo.learn.launch import resolve_defaults, run
from agpo.learn.trainer import Trainer
from agpo.models import load_model_and_tokenizer
from agpo.runtime import checkpoint as ckpt
from agpo.runtime.guard import (
    EXIT_CHECKPOINT_WRITE,
    EXIT_DIVERGED,
    EXIT_USAGE,
    GuardConfig,
)
from agpo.runtime.metrics_log import read_metrics
from agpo.scale.dcp_safe import SafeLoadPlanner, check_folder, read_extra
from agpo.tasks.data import load_problems
from agpo.tasks.rewards import DEFAULT_VERIFIER, RewardError
from agpo.train import main

ROOT = Path(__file__).resolve().parents[1]
REWARDS = ROOT / "tests" / "fixtures" / "fault_rewards.py"
ARGS = ["--prompts-per-step", "4", "--group-size", "4", "--sft-steps", "0", "--eval-size", "0", "--no-progress"]


def cfg_for(out_dir: Path, **run_kw) -> TrainConfig:
    cfg = TrainConfig()
    cfg.rollout.prompts_per_step, cfg.rollout.group_size = 4, 4
    cfg.warmup.sft_steps, cfg.run.eval_size, cfg.run.progress = 0, 0, False
    cfg.run.out_dir = str(out_dir)
    for k, v in run_kw.items():
        setattr(cfg.run, k, v)
    return resolve_defaults(cfg)


def steps_saved(run_dir) -> list[int]:
    return [s for s, _ in ckpt.list_checkpoints(run_dir)]


# -- non-finite steps ----------------------------------------------------------------------------
def _nan_in_training(module, inputs, output):
    return output * float("nan") if module.training else None  # eval (rollout scoring) stays clean


def test_non_finite_update_is_skipped_and_the_controller_restored(tmp_path):
    """A NaN planted in the forward pass of the update: no optimiser step is applied (weights
    bit-identical, AdamW and the LR schedule do not count it), the controller is back at its
    state from before the step, and the next clean step trains normally."""
    cfg = cfg_for(tmp_path)
    model, tok = load_model_and_tokenizer("tiny", seed=0)
    tr = Trainer(cfg, model, tok, load_problems(cfg.data, split="train"))
    assert tr.step()["optim/skipped_steps"] == 0  # AdamW and the controllers now have state
    params = [p.detach().clone() for p in tr.model.parameters()]
    adam_steps = [float(s["step"]) for s in tr.optimizer.state.values()]
    sched, ctl = tr.scheduler.state_dict(), copy.deepcopy(tr.controller.state_dict())
    hook = tr.model.model.layers[0].register_forward_hook(_nan_in_training)
    m = tr.step()
    hook.remove()
    E = cfg.optim.update_epochs
    assert m["optim/skipped_steps"] == E and tr.guard.skipped_in_a_row == E
    assert m["loss/policy"] != m["loss/policy"]  # the loss was NaN: logged, not hidden
    for a, b in zip(params, tr.model.parameters()):
        assert torch.equal(a, b)
    assert [float(s["step"]) for s in tr.optimizer.state.values()] == adam_steps
    assert tr.scheduler.state_dict() == sched
    assert tr.controller.state_dict() == ctl
    assert tr.step_count == 2  # the data moved on: the next step samples new prompts
    m = tr.step()
    assert m["optim/skipped_steps"] == 0 and tr.guard.skipped_in_a_row == 0
    assert [float(s["step"]) for s in tr.optimizer.state.values()] == [a + E for a in adam_steps]
    assert tr.controller.state_dict()["probe_steps"] == ctl["probe_steps"] + 1
    assert all(bool(torch.isfinite(p).all()) for p in tr.model.parameters())


def test_run_stops_after_max_skipped_steps_with_its_last_good_checkpoint(tmp_path, capsys):
    """From the second step on the reward's values overflow the group statistics: those
    steps are skipped, no checkpoint is written during the streak, and after
    --max-skipped-steps the run exits with status 3 naming the last good checkpoint."""
    out = tmp_path / "run"
    code = main(ARGS + ["--out-dir", str(out), "--steps", "6", "--save-every", "1", "--update-epochs", "1",
                        "--max-skipped-steps", "2", "--reward", f"{REWARDS}:overflowing"])
    err = capsys.readouterr().err
    assert code == EXIT_DIVERGED, err
    assert "--max-skipped-steps 2" in err and "step-000001" in err
    assert [r["optim/skipped_steps"] for r in read_metrics(out)] == [0, 1, 1]
    assert steps_saved(out) == [1]
    state = ckpt.validate(ckpt.checkpoint_dir(out) / "step-000001")
    assert state["trainer"]["step"] == 1 and state["trainer"]["skipped_in_a_row"] == 0


@pytest.fixture
def default_verifier_restored():
    """The trainer configures the process-wide verifier from its flags: put it back."""
    yield
    g = GuardConfig()
    DEFAULT_VERIFIER.configure(timeout=g.verifier_timeout, workers=g.verifier_workers,
                               batch_timeout=g.verifier_batch_timeout)


def test_verifier_failures_and_reward_errors_reach_the_step_metrics(tmp_path, default_verifier_restored):
    """A math-verify timeout inside the run and a reward that raises: by default the run
    stops with the row and its text; with --reward-errors zero the row scores 0, and the
    step's metrics count both (never silent)."""
    args = ARGS + ["--steps", "1", "--verifier-timeout", "0.5", "--verifier-workers", "1",
                   "--reward", f"{REWARDS}:fragile"]
    with pytest.raises(RewardError, match=r"raised on row 1: KeyError.*completion '"):
        main(args + ["--out-dir", str(tmp_path / "a")])
    with pytest.warns(UserWarning, match="--reward-errors zero: 1 row"):
        assert main(args + ["--out-dir", str(tmp_path / "b"), "--reward-errors", "zero"]) == 0
    (row,) = read_metrics(tmp_path / "b")
    assert row["reward/errors"] == 1
    assert row["verifier/calls"] == 1 and row["verifier/timeouts"] == 1 and row["verifier/errors"] == 0


# -- damaged checkpoints --------------------------------------------------------------------
@pytest.fixture(scope="module")
def three(tmp_path_factory):
    """A 3-step run with a checkpoint after every step."""
    out = tmp_path_factory.mktemp("ckpt") / "run"
    run(cfg_for(out, steps=3, save_every=1, keep_checkpoints=3))
    return out


def _cut(file: Path) -> None:
    data = file.read_bytes()
    file.write_bytes(data[:len(data) // 2])


def test_damaged_checkpoints_are_named_and_resume_auto_falls_back(three, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(three, out)
    cdir = ckpt.checkpoint_dir(out)
    _cut(cdir / "step-000003" / "trainer_state.pt")
    with pytest.raises(ckpt.CheckpointError, match=r"step-000003: trainer_state.pt is truncated"):
        ckpt.resolve_resume(str(cdir / "step-000003"), out)
    with pytest.warns(ckpt.CheckpointWarning) as warned:
        assert ckpt.resolve_resume("auto", out) == cdir / "step-000002"
    assert "step-000003: trainer_state.pt is truncated" in str(warned[0].message)
    assert "resuming from" in str(warned[1].message) and "step-000002" in str(warned[1].message)
    # the resumed run (from step 2) equals the uninterrupted one
    cfg = cfg_for(out, steps=3, save_every=1, keep_checkpoints=3, resume="auto")
    with pytest.warns(ckpt.CheckpointWarning):
        run(cfg)
    assert rows(out) == rows(three)
    # a truncated weight shard is named too; with every checkpoint damaged, a clear error
    shard = next((cdir / "step-000003" / "weights").glob("*.distcp"))
    _cut(shard)
    with pytest.raises(ckpt.CheckpointError, match=rf"{shard.name}: truncated"):
        ckpt.validate(cdir / "step-000003")
    for step in (1, 2):
        (cdir / f"step-00000{step}" / "weights" / ".metadata").write_bytes(b"\x80\x04garbage")
    with pytest.warns(ckpt.CheckpointWarning):
        with pytest.raises(ckpt.CheckpointError, match="every checkpoint is damaged"):
            ckpt.resolve_resume("auto", out)
    with pytest.warns(ckpt.CheckpointWarning):
        assert main(ARGS + ["--out-dir", str(out), "--steps", "3", "--resume", "auto"]) == EXIT_USAGE


class _Planted:
    """Unpickling it calls os.makedirs(marker): code from a checkpoint file running."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return os.makedirs, (self.marker,)


def test_checkpoint_files_cannot_run_code(three, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(three, out)
    step = ckpt.checkpoint_dir(out) / "step-000003"
    marker = tmp_path / "pwned"
    legit = ckpt.load_state(step)  # what the trainer stores loads with weights_only=True
    assert legit["trainer"]["step"] == 3 and isinstance(legit["rng"]["numpy"]["key"], list)
    # a state written before the RNG states were plain values (NumPy's tuple) still loads and restores
    np.random.seed(3)
    old = {**legit, "rng": {**legit["rng"], "numpy": np.random.get_state()}}
    want = np.random.random(4)
    torch.save(old, step / "trainer_state.pt")
    ckpt.set_rng_state(ckpt.load_state(step)["rng"])
    assert np.array_equal(np.random.random(4), want)
    torch.save({**legit, "x": _Planted(marker)}, step / "trainer_state.pt")
    with pytest.raises(ckpt.CheckpointError, match="trainer_state.pt"):
        ckpt.load_state(step)
    (step / "weights" / ".metadata").write_bytes(pickle.dumps(_Planted(marker)))
    with pytest.raises(ValueError, match="not allowed"):
        check_folder(step / "weights")
    torch.save({"extra": _Planted(marker)}, step / "weights" / "extra.pt")
    with pytest.raises(ValueError, match="extra.pt"):
        read_extra(step / "weights" / "extra.pt")
    buf = io.BytesIO()
    torch.save(_Planted(marker), buf)
    item = types.SimpleNamespace(dest_index=types.SimpleNamespace(fqn="optim.param_groups.0.lr"))
    with pytest.raises(ValueError, match="weights_only"):
        SafeLoadPlanner().load_bytes(item, io.BytesIO(buf.getvalue()))
    assert not marker.exists()


# -- a disk that fills up -----------------------------------------------------------------------
class _FullDisk:
    """A file whose writes fail with ENOSPC once ``room`` bytes are in it (after writing
    what fits: the file is left cut short, as on a real full disk)."""

    def __init__(self, stream, room: int):
        self._stream, self._room = stream, room

    def write(self, data) -> int:
        data = bytes(data)
        if len(data) > self._room:
            self._stream.write(data[:self._room])
            self._room = 0
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self._room -= len(data)
        return self._stream.write(data)

    def __getattr__(self, name):
        return getattr(self._stream, name)


def test_disk_full_while_checkpointing_keeps_the_previous_one(tmp_path, monkeypatch, capsys):
    """Step 2's weight shard runs out of space half-way: the run stops with status 74 and a
    clear error, step 1's checkpoint is byte-for-byte untouched and nothing partial is left."""
    from torch.distributed.checkpoint.filesystem import FileSystem

    out = tmp_path / "run"
    real = FileSystem.create_stream
    seen = {}

    @contextlib.contextmanager
    def create_stream(self, path, mode):
        with real(self, path, mode) as stream:
            if "w" in mode and ".tmp-step-000002" in str(path) and str(path).endswith(".distcp"):
                first = ckpt.checkpoint_dir(out) / "step-000001"
                seen["before"] = {p.relative_to(first): p.read_bytes() for p in first.rglob("*") if p.is_file()}
                yield _FullDisk(stream, room=4096)
            else:
                yield stream

    monkeypatch.setattr(FileSystem, "create_stream", create_stream)
    code = main(ARGS + ["--out-dir", str(out), "--steps", "3", "--save-every", "1"])
    err = capsys.readouterr().err
    assert code == EXIT_CHECKPOINT_WRITE, err
    assert "No space left on device" in err and "step-000001 is untouched" in err
    assert steps_saved(out) == [1] and not list(ckpt.checkpoint_dir(out).glob(".tmp-*"))
    first = ckpt.checkpoint_dir(out) / "step-000001"
    assert seen["before"] and {p.relative_to(first): p.read_bytes()
                                for p in first.rglob("*") if p.is_file()} == seen["before"]
    ckpt.validate(first)


def test_failed_state_write_raises_and_leaves_nothing(tmp_path, monkeypatch):
    """The same for the trainer state written from rank 0 after the weights."""
    model, _ = load_model_and_tokenizer("tiny", seed=0)
    ckpt.save_checkpoint(tmp_path, 1, model, None, {"step": 1})

    def fails(file, state):
        file.write_bytes(b"PK\x03\x04 half a zip")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(ckpt, "_write_state", fails)
    with pytest.raises(ckpt.CheckpointWriteError, match=r"No space left on device.*step-000001 is untouched"):
        ckpt.save_checkpoint(tmp_path, 2, model, None, {"step": 2})
    assert steps_saved(tmp_path) == [1] and not list(ckpt.checkpoint_dir(tmp_path).glob(".tmp-*"))
    assert ckpt.validate(ckpt.checkpoint_dir(tmp_path) / "step-000001") == {"step": 1}
