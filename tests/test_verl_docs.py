"""Every verl command the docs show is a promise: each one, and each launch script's final
command, composes into a verl 0.9.1 config that ``python -m agpo.verl`` accepts (AGPO's
checks and verl's own ``validate_config``). In .venv-verl; skipped where verl is not
installed. What cannot run here (GPUs, vLLM servers, several nodes) stops at the config.

- ``examples/verl/*.sh``: run with ``PYTHON`` pointing at a recorder of its arguments, the
  data files pointing at files that exist;
- ``docs/verl.md`` and ``examples/verl_openrlhf.md``: every ``python -m agpo.verl`` and
  ``python -m verl.trainer.main_ppo`` command in their code blocks, with ``$HOME`` set to a
  folder holding the data files they name.
"""

import os
import re
import shlex
import stat
import subprocess
from pathlib import Path

import pytest

pytest.importorskip("verl", reason="verl is not installed here; .ci/run runs this file in .venv-verl")

from verl.trainer.ppo.utils import need_critic, need_reference_policy  # noqa: E402
from verl.utils.config import validate_config  # noqa: E402

from agpo.integrations.verl.checks import apply_defaults, check_config, check_paths  # noqa: E402
from agpo.verl import _config  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted((ROOT / "examples" / "verl").glob("*.sh"))
DOCS = [ROOT / "docs" / "verl.md", ROOT / "examples" / "verl_openrlhf.md"]


def accepted(argv: list[str]):
    """The config ``python -m agpo.verl`` would run with these arguments (raises otherwise), and
    the GPUs hold whole rollout replicas (verl makes ``GPUs // tensor-parallel`` of them)."""
    config = _config(list(argv))
    apply_defaults(config)
    check_config(config)
    check_paths(config)
    validate_config(config=config, use_reference_policy=need_reference_policy(config), use_critic=need_critic(config))
    gpus, tp = config.trainer.nnodes * config.trainer.n_gpus_per_node, config.actor_rollout_ref.rollout.tensor_model_parallel_size
    assert gpus >= tp and gpus % tp == 0, f"{gpus} GPUs do not hold whole rollout replicas of tensor-parallel {tp}"
    return config


@pytest.fixture
def home(tmp_path, monkeypatch):
    data = tmp_path / "data" / "gsm8k"
    data.mkdir(parents=True)
    for name in ("train.parquet", "test.parquet"):
        (data / name).write_bytes(b"")
    monkeypatch.setenv("HOME", str(tmp_path))
    return tmp_path


def recorded_argv(script: Path, home: Path, tmp_path: Path, **env) -> list[str]:
    rec = tmp_path / "python"
    rec.write_text('#!/usr/bin/env bash\nprintf "%s\\n" "$@" > "$ARGV_FILE"\n')
    rec.chmod(rec.stat().st_mode | stat.S_IEXEC)
    out = tmp_path / "argv.txt"
    full = dict(os.environ, HOME=str(home), PYTHON=str(rec), ARGV_FILE=str(out), **env)
    p = subprocess.run(["bash", str(script), "trainer.total_epochs=1"], cwd=tmp_path, env=full, capture_output=True,
                       text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    return out.read_text().splitlines()


def test_there_are_launch_scripts_for_one_and_two_nodes():
    assert [s.name for s in SCRIPTS] == ["qwen14b_gsm8k_2x8gpu.sh", "qwen14b_gsm8k_8gpu.sh"]


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda s: s.name)
def test_launch_script_composes_an_accepted_config(script, home, tmp_path, monkeypatch):
    argv = recorded_argv(script, home, tmp_path)
    assert argv[:3] == ["-m", "agpo.verl", "examples/verl/agpo_trainer.yaml"] and argv[-1] == "trainer.total_epochs=1"
    monkeypatch.chdir(ROOT)
    config = accepted(argv[2:])
    nodes = 2 if "2x8" in script.name else 1
    assert config.trainer.nnodes == nodes and config.trainer.n_gpus_per_node == 8
    assert config.data.train_batch_size == 64 * nodes and config.trainer.total_epochs == 1
    assert config.trainer.v1.trainer_mode == "agpo_sync" and config.agpo.probe_size == 8
    assert config.actor_rollout_ref.model.path == "Qwen/Qwen2.5-14B-Instruct"
    assert config.actor_rollout_ref.model.use_fused_kernels is False
    assert config.actor_rollout_ref.rollout.agent.default_agent_loop == "agpo_single_turn"


def test_the_fused_head_switch_of_the_launch_script(home, tmp_path, monkeypatch):
    argv = recorded_argv(ROOT / "examples" / "verl" / "qwen14b_gsm8k_8gpu.sh", home, tmp_path, AGPO_HEAD="true")
    monkeypatch.chdir(ROOT)
    model = accepted(argv[2:]).actor_rollout_ref.model
    assert model.use_fused_kernels is True and model.fused_kernel_options.impl_backend == "agpo"


def doc_commands() -> list[tuple[str, str]]:
    found = []
    for doc in DOCS:
        for block in re.findall(r"```bash\n(.*?)```", doc.read_text(), flags=re.S):
            for cmd in block.replace("\\\n", " ").splitlines():
                if cmd.startswith(("python -m agpo.verl", "python -m verl.trainer.main_ppo")):
                    found.append((doc.name, cmd))
    return found


def test_the_docs_show_verl_commands():
    assert {doc for doc, _ in doc_commands()} == {"verl.md", "verl_openrlhf.md"}


@pytest.mark.parametrize("doc, command", doc_commands(), ids=lambda x: x[:40])
def test_every_doc_command_composes_an_accepted_config(doc, command, home, monkeypatch):
    monkeypatch.chdir(ROOT)
    argv = shlex.split(os.path.expandvars(command))[3:]
    if command.startswith("python -m agpo.verl"):
        accepted(argv)
    else:  # verl's own entry with agpo's head: verl's config, plus agpo's check of its files
        config = _config(argv)
        check_paths(config)
        assert config.actor_rollout_ref.model.fused_kernel_options.impl_backend == "agpo"
