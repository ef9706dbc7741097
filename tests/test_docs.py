"""The documentation is self-contained and its links, anchors and quoted numbers hold.

- no file of the project points outside it (to a specification or notes beside the
  repository) or at a document it does not ship;
- every relative link and image in README.md and docs/*.md names an existing file, and
  every ``#anchor`` a heading of the file it points into (GitHub's slugs);
- every anchor of docs/algorithm.md cited in code, tests or docs exists;
- README.md and docs/ carry no dates or tracker numbers in their prose;
- the numbers README.md quotes beside its picture are those of the runs that drew it
  (``scripts/readme_figure.sh`` keeps them in ``docs/img/readme-agpo-vs-grpo.json``);
- the benchmark suite's default run has a small case of every benchmark, and the long
  shapes run only with ``--bench-long``.
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TEXT_SUFFIXES = {".py", ".md", ".yaml", ".yml", ".sh", ".toml", ".txt", ".cfg", ".ini", ".json"}
SKIP_DIRS = {"runs", "outputs", "build", "dist", "__pycache__", "node_modules"}
# Built from parts so that this file does not match itself.
_NAME = "SP" + "EC"  # the external specification the docs once cited
OUTSIDE = [re.compile(p) for p in (r"\.\./" + "shared", r"\b" + _NAME + r"\b", _NAME + r"\.md",
                                   "shared/" + "notes", "shared/" + "seed")]


def project_files():
    for dirpath, dirnames, filenames in os.walk(ROOT):
        dirnames[:] = [d for d in dirnames
                       if not d.startswith(".") and d not in SKIP_DIRS and not d.endswith(".egg-info")]
        for name in filenames:
            path = Path(dirpath, name)
            if path.suffix in TEXT_SUFFIXES:
                yield path


def docs():
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def slug(heading: str) -> str:
    """GitHub's anchor of a Markdown heading."""
    text = re.sub(r"[`*_]|\[([^\]]*)\]\([^)]*\)", lambda m: m.group(1) or "", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    out, fenced = set(), False
    for line in path.read_text().splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and (m := re.match(r"#{1,6}\s+(.*)", line)):
            out.add(slug(m.group(1)))
    return out


def links(path: Path):
    """(target, line number) of each Markdown link and image outside code blocks."""
    fenced = False
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if line.startswith("```"):
            fenced = not fenced
            continue
        if fenced:
            continue
        for m in re.finditer(r"!?\[[^\]]*\]\(([^)\s]+)\)", re.sub(r"`[^`]*`", "", line)):
            yield m.group(1), n


def test_no_file_points_outside_the_project():
    hits = []
    for path in project_files():
        if path == Path(__file__).resolve():
            continue
        for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            if any(p.search(line) for p in OUTSIDE):
                hits.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
    assert not hits, "\n".join(hits)


def test_relative_links_and_anchors_resolve():
    bad = []
    for doc in docs():
        for target, n in links(doc):
            if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
                continue
            file, _, anchor = target.partition("#")
            dest = (doc.parent / file).resolve() if file else doc
            where = f"{doc.relative_to(ROOT)}:{n}: {target}"
            if not dest.exists():
                bad.append(where + " (no such file)")
            elif ROOT not in dest.parents and dest != ROOT:
                bad.append(where + " (outside the repository)")
            elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                bad.append(where + f" (no heading #{anchor})")
    assert not bad, "\n".join(bad)


def test_algorithm_anchors_cited_anywhere_exist():
    known = anchors(ROOT / "docs" / "algorithm.md")
    bad = []
    for path in project_files():
        for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            for m in re.finditer(r"algorithm\.md#([\w-]+)", line):
                if m.group(1) not in known:
                    bad.append(f"{path.relative_to(ROOT)}:{n}: #{m.group(1)}")
    assert not bad, "\n".join(bad)
    # The modules the page describes point back to it.
    for module in ("agpo/algo/controllers.py", "agpo/algo/stats.py", "agpo/learn/trainer.py",
                   "agpo_kernels/agpo_loss.py"):
        assert "docs/algorithm.md" in (ROOT / module).read_text(), module


def test_algorithm_page_cites_the_paper_and_the_code():
    text = (ROOT / "docs" / "algorithm.md").read_text()
    assert "arxiv.org/abs/2605.20722" in text
    assert "github.com/wandugu/paper_agpo" in text
    for heading in ("group-statistics", "advantages", "temperature-controller", "adaptive-clip",
                    "kl-estimators", "loss-aggregation", "defaults", "departures-from-the-authors-code"):
        assert heading in anchors(ROOT / "docs" / "algorithm.md"), heading


def test_algorithm_defaults_match_the_code():
    """The defaults table quotes ControllerConfig's values."""
    from agpo.algo.controllers import ControllerConfig

    text = (ROOT / "docs" / "algorithm.md").read_text()
    text = text[text.index("\n## Defaults"):text.index("\n## Departures")]
    cfg = ControllerConfig()
    for name in ("eps_base", "alpha_var", "gamma_stepkl", "delta_probe_entropy", "zeta_skew", "h_ref_alpha",
                 "tau_base", "lambda_temp", "ema_alpha", "baseline_min", "entropy_floor", "adv_floor"):
        row = next((line for line in text.splitlines() if f"`{name}`" in line and line.startswith("|")), None)
        assert row is not None, name
        cells = [c.strip() for c in row.split("|")]
        value = cells[cells.index(next(c for c in cells if f"`{name}`" in c)) + 1].split()[0]
        assert float(value) == getattr(cfg, name), (name, value, getattr(cfg, name))


def test_no_dates_or_tracker_numbers_in_the_prose():
    bad = []
    for doc in docs():
        for n, line in enumerate(doc.read_text().splitlines(), 1):
            prose = re.sub(r"\[[^\]]*\]\([^)]*\)|`[^`]*`", "", line)  # file names of results carry dates
            if re.search(r"\b20\d\d-\d\d-\d\d\b", prose) or re.search(r"\bissue #?\d+", prose, re.I):
                bad.append(f"{doc.relative_to(ROOT)}:{n}: {line.strip()}")
    assert not bad, "\n".join(bad)


def test_readme_numbers_are_those_of_its_figure_runs():
    readme = (ROOT / "README.md").read_text()
    figure = "docs/img/readme-agpo-vs-grpo.png"
    assert figure in readme and (ROOT / figure).exists()
    assert "scripts/readme_figure.sh" in readme and (ROOT / "scripts" / "readme_figure.sh").exists()
    runs = json.loads((ROOT / "docs" / "img" / "readme-agpo-vs-grpo.json").read_text())
    ctl = runs.pop("agpo_controllers")
    for key in ("eps_mean", "eps_min", "eps_max", "tau_min", "tau_max"):
        assert f"{ctl[key]:.2f}" in readme, (key, ctl[key])
    for name, s in runs.items():
        before, after = f"{100 * s['accuracy_before']:.1f}%", f"{100 * s['accuracy_after']:.1f}%"
        assert before in readme and after in readme, (name, before, after)
        assert f"{s['tokens_generated']:,}" in readme, (name, s["tokens_generated"])
    # Every percentage in the table beside the picture comes from those runs.
    table = readme[readme.index("| run |"):]
    table = table[:table.index("\n\n")]
    quoted = set(re.findall(r"\d+\.\d%", table))
    known = {f"{100 * s[k]:.1f}%" for s in runs.values() for k in ("accuracy_before", "accuracy_after")}
    assert quoted and quoted <= known, (quoted, known)


def test_readme_points_to_the_algorithm_and_says_how_long_things_take():
    readme = (ROOT / "README.md").read_text()
    assert "docs/algorithm.md" in readme
    assert "arxiv.org/abs/2605.20722" in readme
    assert "--bench-long" in readme and "pytest bench/ --benchmark-only" in readme
    assert "AGPOClipCallback" in readme


def _collect(*args):
    out = subprocess.run([sys.executable, "-m", "pytest", "bench/", "--collect-only", "-q", "-p", "no:cacheprovider",
                          *args], cwd=ROOT, capture_output=True, text=True, timeout=300)
    if out.returncode == 5:  # nothing collected
        return set()
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    return {line.split("::", 1)[1] for line in out.stdout.splitlines() if "::" in line}


@pytest.mark.slow
def test_bench_default_run_is_small_and_long_shapes_are_an_option():
    pytest.importorskip("pytest_benchmark")
    default = _collect("-m", "not bench_long")
    long = _collect("--bench-long", "-m", "bench_long")
    functions = {item.split("[")[0] for item in default | long}
    assert {"test_loss", "test_update_pass", "test_full_step", "test_rollout", "test_sampler_step",
            "test_train_step"} <= functions, functions
    # Every benchmark has a case in the default run (the matmul rate is a GPU-only figure).
    assert functions - {"test_matmul_rate"} <= {item.split("[")[0] for item in default}, functions
    assert any("cpu-vocab152k" in i or "llama3-8b" in i for i in long), long
    assert any("long" in i for i in long if i.startswith("test_update_pass")), long
    assert not any("cpu-vocab152k" in i or "cpu-long16k" in i or "-long]" in i or "[long" in i
                   for i in default), default
