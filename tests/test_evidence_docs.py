"""The evidence in the docs: docs/recipes.md's and the README's tables and figures of the
paired experiments are those the committed records give (scripts/evidence.py recomputes
them in each test)."""

from __future__ import annotations

import json
import re
import shlex
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_docs_quote_the_first_round():
    """docs/recipes.md holds the first round's tables as `report` prints them from its committed
    result, docs/evidence/round1/report.json, and the README quotes its primary result."""
    sys.path.insert(0, str(ROOT / "scripts"))
    import evidence

    result = json.loads((ROOT / "docs" / "evidence" / "round1" / "report.json").read_text())
    recipes = (ROOT / "docs" / "recipes.md").read_text()
    for line in evidence.markdown(result).splitlines():
        if line.startswith("| ") and not line.startswith("| arm"):
            assert line in recipes, line
    vs = result["arms"]["agpo"]["vs_control"]["1.0"]
    readme = (ROOT / "README.md").read_text()
    side = "below" if vs["mean"] < 0 else "above"
    assert f"{abs(100 * vs['mean']):.1f} points {side}" in readme
    assert f"{100 * vs['lo']:.1f} to {100 * vs['hi']:.1f}" in readme
    assert "docs/img/evidence.png" in recipes and (ROOT / "docs" / "img" / "evidence.png").is_file()


TASKS = ("embedded", "hard")
"""The tasks of round two whose records docs/recipes.md quotes (docs/evidence/TASK/)."""


@pytest.mark.parametrize("task", TASKS)
def test_docs_quote_the_round_two_sweep(task):
    """docs/recipes.md's learning-rate sweep table is `pick`'s, from the committed pick.json,
    and that pick.json is what `pick` computes from the committed sweep records."""
    sys.path.insert(0, str(ROOT / "scripts"))
    import evidence

    sweep = ROOT / "docs" / "evidence" / task / "sweep"
    committed = json.loads((sweep / "pick.json").read_text())
    recipes = (ROOT / "docs" / "recipes.md").read_text()
    for line in evidence.pick_markdown(committed).splitlines():
        assert line in recipes, line
    by_lr = {f.name[2:]: evidence.load_runs(f, f) for f in sorted(sweep.glob("lr*"))}
    b = min(r["summary"]["tokens_generated"] for runs in by_lr.values() for v in runs.values() for r in v.values())
    assert committed["at_tokens"] == b
    for arm, aucs in committed["auc"].items():
        for lr, value in aucs.items():
            seeds = committed["seeds"][arm]
            want = sum(evidence.auc(by_lr[lr][arm][s]["curve"], b) for s in seeds) / len(seeds)
            assert value == pytest.approx(want, abs=1e-12), (arm, lr)


def quoted_report(task: str, tmp_path: Path, seeds: int = 16, dump_seed: int = 3) -> dict:
    """docs/evidence/TASK/main/report.json, checked: it is what `report` computes from the
    committed records beside it, of ``seeds`` paired seeds, and docs/recipes.md holds its
    tables and the groups dump of AGPO + reuse's first seed."""
    import shutil

    sys.path.insert(0, str(ROOT / "scripts"))
    import evidence

    main = ROOT / "docs" / "evidence" / task / "main"
    committed = json.loads((main / "report.json").read_text())
    copy = tmp_path / "main"
    shutil.copytree(main, copy, ignore=shutil.ignore_patterns("report.json"))
    evidence.main(["report", "--results", str(copy)])
    assert json.loads((copy / "report.json").read_text()) == committed
    recipes = (ROOT / "docs" / "recipes.md").read_text()
    for line in evidence.markdown(committed).splitlines():
        if line.startswith("| ") and not line.startswith("| arm"):
            assert line in recipes, line
    for line in evidence.dump_markdown(main / "agpo-reuse" / f"s{dump_seed}.groups.jsonl").splitlines():
        assert line in recipes, line  # what the controllers did, from the committed dump
    assert len(committed["arms"]["agpo-reuse"]["seeds"]) == seeds
    return committed


def test_docs_quote_the_round_two_main_runs(tmp_path):
    """docs/recipes.md's round-2 tables on the embedded task are `report`'s from the committed
    records, and the README quotes its primary result: AGPO with probe reuse against
    GRPO-2G, the paired area under the curve, with its interval."""
    sys.path.insert(0, str(ROOT / "scripts"))
    import evidence

    committed = quoted_report("embedded", tmp_path)
    main = ROOT / "docs" / "evidence" / "embedded" / "main"
    recipes = (ROOT / "docs" / "recipes.md").read_text()
    vs = committed["arms"]["agpo-reuse"]["vs_control"]["auc"]
    readme = " ".join((ROOT / "README.md").read_text().split())
    assert f"{100 * vs['mean']:+.1f} points (95% interval {100 * vs['lo']:+.1f} to {100 * vs['hi']:+.1f})" in readme
    assert f"would have seen {100 * vs['detectable']:.1f} points" in readme
    assert "docs/img/evidence-round2.png" in recipes and (ROOT / "docs" / "img" / "evidence-round2.png").is_file()
    prose = " ".join(recipes.split())  # the reading's figures, from the same records
    clipped = [100 * committed["arms"][a]["controllers"]["loss/clip_frac"] for a in ("grpo16", "agpo-reuse")]
    assert f"({clipped[0]:.1f}% of GRPO's tokens, {clipped[1]:.1f}% of AGPO's)" in prose
    arms = committed["arms"]
    diff = {a: {k: {s: 100 * arms[a]["vs_control"][k][s] for s in ("mean", "lo", "hi")} for k in ("auc", "1.0")}
            for a in ("agpo", "grpo16-trainclip", "grpo16-passclip")}
    published, train, passes = diff["agpo"], diff["grpo16-trainclip"]["auc"], diff["grpo16-passclip"]["auc"]
    assert (f"by {published['auc']['mean']:+.1f} points of area (95% interval {published['auc']['lo']:+.1f} to "
            f"{published['auc']['hi']:+.1f}) and {published['1.0']['mean']:+.1f} at the end") in prose
    assert (f"{train['mean']:+.1f} points of area (the train group's own statistics, {train['lo']:+.1f} to "
            f"{train['hi']:+.1f}) and {passes['mean']:+.1f} (the pass count alone, {passes['lo']:+.1f} to "
            f"{passes['hi']:+.1f})") in prose
    assert (f"AGPO as published, at its own picked rate, is still {-published['auc']['mean']:.1f} points of area "
            f"below GRPO-2G (4 seeds, 95% interval {published['auc']['lo']:+.1f} to {published['auc']['hi']:+.1f})"
            in readme)
    binds = [100 * arms[a]["controllers"]["loss/clip_frac"] for a in ("grpo16-trainclip", "grpo16-passclip", "grpo16")]
    assert f"binds on {binds[0]:.1f}% and {binds[1]:.1f}% of tokens, GRPO-2G's on {binds[2]:.1f}%" in prose
    assert all(len(arms[a]["seeds"]) == 4 for a in ("agpo", "grpo16-trainclip", "grpo16-passclip"))
    runs = evidence.load_runs(main, main)
    steps = [r for arm in ("grpo16-refill", "agpo-reuse-refill") for run in runs[arm].values() for r in run["steps"]]
    assert f"{100 * sum(r['filter/rounds'] > 1 for r in steps) / len(steps):.0f}% of the steps drew a second" in prose


def test_docs_say_why_the_harder_task_is_three_terms_of_two_digits():
    """The recipes' reading of the warm-up pilot quotes its committed curves."""
    rows = [json.loads(line) for line in open(ROOT / "docs" / "evidence" / "hard" / "warmup-pilot.jsonl")]
    at = {(r["flags"], r["seed"], r["step"]): r for r in rows}
    prose = " ".join((ROOT / "docs" / "recipes.md").read_text().split())
    hard = [at["--arith-terms 3 --max-operand 999", s, 3000 if s == 1 else 2750] for s in (1, 2)]
    assert (f"loss {hard[0]['window_loss']:.2f} and {hard[1]['window_loss']:.2f} after 3,000 and 2,750 steps"
            in prose)
    jump = [at["--arith-terms 2 --max-operand 999", 1, s]["accuracy"] for s in (1000, 1250)]
    assert f"from {100 * jump[0]:.1f}% to {100 * jump[1]:.1f}% within 250 steps" in prose
    smooth = [at["--arith-terms 3 --max-operand 99", s, 1500]["accuracy"] for s in (1, 2, 3)]
    assert f"{100 * min(smooth):.1f}-{100 * max(smooth):.1f}% at 1,500 steps" in prose


def test_the_harder_task_starts_low_but_not_at_zero():
    """What docs/recipes.md says of the harder task's warm-up holds for every committed run of
    it: the warm-up reached its target loss, and RL starts low, at the quoted range, but
    above 2% (the pilot's seeds that started at 0.4-1.4% learned nothing)."""
    hard = ROOT / "docs" / "evidence" / "hard"
    records = [json.loads(f.read_text()) for f in sorted(hard.glob("[sm]*/**/s*.json"))]
    assert len(records) >= 18
    for r in records:
        assert r["warmup"]["sft/reached_target"] == 1.0 and r["warmup"]["sft/window_loss"] <= 0.75
    start = sorted(100 * r["summary"]["accuracy_before"] for r in records)
    assert start[0] > 2  # above the pilot's seeds that learned nothing
    prose = " ".join((ROOT / "docs" / "recipes.md").read_text().split())
    assert f"(the runs below started at {start[0]:.0f}-{start[-1]:.0f}%)" in prose
    sweep = [json.loads(f.read_text()) for f in sorted((hard / "sweep").glob("lr*/*/s*.json"))]
    steps = sorted(r["warmup"]["sft/steps"] for r in sweep)
    before = sorted(100 * r["summary"]["accuracy_before"] for r in sweep)
    assert (f"warm-up stopped after {steps[0]:,}-{steps[-1]:,} steps, RL starting at {before[0]:.1f}-"
            f"{before[-1]:.1f}%") in prose


def test_docs_quote_the_harder_task(tmp_path):
    """docs/recipes.md's tables of the harder task are `report`'s from its committed records,
    and the README quotes its primary result with the smallest effect the design sees."""
    committed = quoted_report("hard", tmp_path)
    vs = committed["arms"]["agpo-reuse"]["vs_control"]["auc"]
    hard = ROOT / "docs" / "evidence" / "hard"
    start = sorted(100 * json.loads(f.read_text())["summary"]["accuracy_before"]
                   for f in hard.glob("[sm]*/**/s*.json"))
    readme = " ".join((ROOT / "README.md").read_text().split())
    assert (f"harder task (three terms of 0-99, RL starting at {start[0]:.0f}-{start[-1]:.0f}%) AGPO with probe reuse differs by "
            f"{100 * vs['mean']:+.1f} points (95% interval {100 * vs['lo']:+.1f} to {100 * vs['hi']:+.1f}; "
            f"{100 * vs['detectable']:.1f} points detectable)") in readme
    recipes = (ROOT / "docs" / "recipes.md").read_text()
    assert "docs/img/evidence-hard.png" in recipes and (ROOT / "docs" / "img" / "evidence-hard.png").is_file()


def test_docs_quote_the_smollm2_runs(tmp_path, monkeypatch):
    """docs/recipes.md's SmolLM2-135M tables are `report`'s from its committed records (4 paired
    seeds, seed 0's groups dump), the fixed-eps arm ran at AGPO + reuse's realised eps, and the
    README quotes both comparisons with their intervals."""
    sys.path.insert(0, str(ROOT / "scripts"))
    import evidence

    committed = quoted_report("smollm2", tmp_path, seeds=4, dump_seed=0)
    arms = committed["arms"]
    main = ROOT / "docs" / "evidence" / "smollm2" / "main"
    assert arms["grpo16-eps"]["eps_base"] == [evidence.realised_eps(tmp_path / "none", main, "agpo-reuse")]
    assert len(arms["grpo16-eps"]["seeds"]) == 4
    readme = " ".join((ROOT / "README.md").read_text().split())
    reuse, fixed = (arms[a]["vs_control"]["auc"] for a in ("agpo-reuse", "grpo16-eps"))
    side = "ahead of" if reuse["mean"] > 0 else "behind"
    assert (f"AGPO with probe reuse is {side} GRPO-2G by {100 * abs(reuse['mean']):.1f} points of area (95% interval "
            f"{100 * reuse['lo']:+.1f} to {100 * reuse['hi']:+.1f}; {100 * reuse['detectable']:.1f} points "
            "detectable)") in readme
    assert (f"GRPO-2G at AGPO's mean eps ({arms['grpo16-eps']['eps_base'][0]}) differs from GRPO-2G by "
            f"{100 * fixed['mean']:+.1f} ({100 * fixed['lo']:+.1f} to {100 * fixed['hi']:+.1f})") in readme
    recipes = (ROOT / "docs" / "recipes.md").read_text()
    assert "docs/img/evidence-smollm2.png" in recipes and (ROOT / "docs" / "img" / "evidence-smollm2.png").is_file()
    # "in area on each of the 4 seeds": AGPO + reuse's area is above both GRPO arms' on each seed, by the quoted range
    runs, b = evidence.load_runs(main, main), float(committed["compared_at_tokens"]["1.0"])
    area = {a: [evidence.auc(runs[a][s]["curve"], b) for s in range(4)] for a in arms}
    ahead = [100 * (x - y) for x, y in zip(area["agpo-reuse"], area["grpo16"])]
    assert all(x > y for other in ("grpo16", "grpo16-eps") for x, y in zip(area["agpo-reuse"], area[other]))
    assert "AGPO with probe reuse was ahead in area on each of the 4 seeds tried" in readme
    # the direct comparison: AGPO + reuse against the fixed-eps arm, paired by seed
    vs_eps = evidence.paired([100 * (x - y) for x, y in zip(area["agpo-reuse"], area["grpo16-eps"])])
    assert (f"{vs_eps['mean']:.1f} points of area behind AGPO with probe reuse ({vs_eps['lo']:+.1f} to "
            f"{vs_eps['hi']:+.1f})") in readme
    # the documented commands make the committed runs, flag for flag (the fixed eps included)
    smol = shlex.split(re.search(r'SMOL="([^"]+)"', recipes).group(1))
    made = {}
    monkeypatch.setattr(evidence, "launch", lambda out, arm, s, budget, extra, log, results, picks, dump, warmups,
                        group, eps_from: made.setdefault((arm, s), evidence.run_args(
                            out, arm, s, budget, extra, results, picks, dump, group, eps_from)))
    monkeypatch.setattr(evidence, "warm_start", lambda *a: None)
    monkeypatch.chdir(ROOT)
    for line in recipes.splitlines():
        if line.startswith("python scripts/evidence.py run") and "smollm2" in line:
            evidence.main([a for w in shlex.split(line)[2:] for a in (smol if w == "$SMOL" else [w])])
    assert sorted(made) == sorted((a, s) for a in arms for s in range(4))
    assert all(flags == json.loads(evidence.record_path(main, *k).read_text())["flags"] for k, flags in made.items())
    ctl = {t: json.loads((ROOT / "docs" / "evidence" / t / "main" / "report.json").read_text())["arms"]["agpo-reuse"]
           ["controllers"] for t in ("smollm2", "embedded", "hard")}
    tau, changed = ([f"{v[k]:.3f}" if k == "tau/sd" else f"{100 * v[k]:.1f}%" for v in ctl.values()]
                    for k in ("tau/sd", "loss/clip_changed"))
    prose = " ".join(recipes.split())
    assert f"tau sd {tau[0]} over groups ({tau[1]} on the embedded task, {tau[2]} on the harder one)" in prose
    assert f"{changed[0]} of token decisions differ from a fixed eps of 0.2 ({changed[1]} and {changed[2]})" in prose
    assert f"on each of the 4 seeds (by {min(ahead):.1f} to {max(ahead):.1f} points)" in prose
    assert f"is ahead of it by {vs_eps['mean']:+.1f} points of area (95% interval {vs_eps['lo']:+.1f} to " \
           f"{vs_eps['hi']:+.1f})" in prose
    gap = {k: 100 * arms["agpo-reuse"]["vs_control"][k]["mean"] for k in ("0.25", "0.5", "0.75", "1.0")}
    assert max(gap, key=gap.get) == "0.5" and gap["1.0"] < min(gap["0.25"], gap["0.5"])  # opens, peaks, narrows
    assert (f"opens early** ({gap['0.25']:+.1f} points at 25% of the budget), peaks mid-run ({gap['0.5']:+.1f} at "
            f"50%) and narrows by the end ({gap['1.0']:+.1f})") in prose


def test_the_evidence_file_is_every_tasks_report(tmp_path, monkeypatch):
    """docs/img/evidence.json is what `collect` gathers from the committed reports, and on the
    embedded task it holds the arms the second round compares: GRPO-2G, AGPO with probe reuse,
    AGPO as published, and the two probe-free clips (train group, pass count); on SmolLM2-135M,
    GRPO-2G, AGPO with probe reuse and GRPO-2G at AGPO's mean eps."""
    sys.path.insert(0, str(ROOT / "scripts"))
    import evidence

    monkeypatch.chdir(ROOT)  # the documented command, from the repository root, written elsewhere
    evidence.main(["collect", "--out", str(tmp_path / "e.json")])
    committed = json.loads((ROOT / "docs" / "img" / "evidence.json").read_text())
    assert json.loads((tmp_path / "e.json").read_text()) == committed
    assert {*TASKS, "smollm2"} <= set(committed)
    assert {"grpo16", "agpo-reuse", "agpo", "grpo16-trainclip", "grpo16-passclip"} <= set(committed["embedded"]["arms"])
    assert set(committed["smollm2"]["arms"]) == {"grpo16", "agpo-reuse", "grpo16-eps"}
