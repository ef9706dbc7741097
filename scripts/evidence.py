"""Does AGPO help? The paired, many-seed experiment of docs/recipes.md#does-agpo-help, and its table.

    python scripts/evidence.py run --out runs/evidence          # every run (about 85 min on 2 cores)
    python scripts/evidence.py report --out runs/evidence       # table, JSON and plot from the runs

With ``--results DIR`` (``run`` and ``report``) each finished run also leaves a small record,
``DIR/ARM/sSEED.json`` (its summary, held-out curve and per-step controller metrics; seed 0
also ``sSEED.groups.jsonl``): commit those, and ``run`` on any machine skips what they hold
and ``report`` needs nothing else. A learning-rate sweep is ``run`` once per rate (``-- --lr
X`` into ``DIR/lrX``), then ``pick --sweep DIR``: each arm's rate of best mean area under the
curve, in ``DIR/pick.json``, which ``run --lr-from`` applies arm by arm. ``collect`` gathers
every task's ``docs/evidence/TASK/main/report.json`` into ``docs/img/evidence.json``.

Every arm is the tiny preset on its embedded task after the same warm-up (each seed's
warm-up, prompt order and sampling noise are shared by all its arms: common random
numbers; ``run`` warms each seed up once, in ``OUT/warmup/``, and starts its arms from
that model: ``evidence_warmup``), 4 update epochs, a constant learning rate and the same budget
of generated tokens with the probe's counted. Arms (``ARMS``): AGPO; GRPO with groups of 2G (the
primary control: the same tokens and updates); GRPO with groups of G (twice the steps);
GRPO at AGPO's realised mean eps; AGPO training on its probe; AGPO whose probe filters
prompts; GRPO 2G with AGPO's clip fed by the train group's own statistics (no probe, every
sample at tau_base); GRPO 2G with a clip from the pass count alone (the difficulty-schedule
baseline: ``--clip-inputs rewards``). Seed 0 of every arm also writes ``groups.jsonl``
(``--dump-groups``: per step and prompt, pass counts, sigma, k, E, tau, eps). ``run`` skips runs already finished (rerun it to continue) and runs ``--jobs``
at a time with one thread each; arguments after ``--`` go to every ``agpo.train``.
``report`` compares each arm with GRPO-2G seed by seed: paired differences of held-out
accuracy at four equal-token points with 95% t intervals and a sign-flip permutation test;
collapse counts, spread across seeds, and the controllers' trajectories.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import yaml

from evidence_stats import at_tokens, auc, collapsed, paired
from evidence_warmup import train, warm_start, warmup_of

ARMS = {  # name -> (label, agpo.train flags, --eval-every)
    "agpo": ("AGPO (probe G + train G)", ["--algo", "agpo", "--group-size", "8", "--no-probe-reuse"], 10),
    "grpo16": ("GRPO, groups of 2G", ["--algo", "grpo", "--group-size", "16"], 10),
    "grpo8": ("GRPO, groups of G, 2x steps", ["--algo", "grpo", "--group-size", "8"], 20),
    "grpo16-eps": ("GRPO 2G at AGPO's mean eps", ["--algo", "grpo", "--group-size", "16"], 10),
    "agpo-reuse": ("AGPO + probe reuse", ["--algo", "agpo", "--group-size", "8", "--probe-reuse"], 10),
    "agpo-filter": ("AGPO + probe filter", ["--algo", "agpo", "--group-size", "8", "--probe-filter",
                                            "--no-probe-reuse"], 10),
    "grpo16-trainclip": ("GRPO 2G, AGPO's clip from the train group (no probe)",
                         ["--algo", "grpo", "--group-size", "16", "--adaptive-clip", "--clip-from-train"], 10),
    "grpo16-passclip": ("GRPO 2G, clip from the pass count alone",
                        ["--algo", "grpo", "--group-size", "16", "--adaptive-clip", "--clip-from-train",
                         "--clip-inputs", "rewards"], 10),
    "grpo16-refill": ("GRPO 2G + dynamic sampling (refill)", ["--algo", "grpo", "--group-size", "16", "--filter-groups"],
                      10),
    "agpo-reuse-refill": ("AGPO + probe reuse + dynamic sampling (refill)",
                          ["--algo", "agpo", "--group-size", "8", "--probe-reuse", "--filter-groups"], 10),
}
PRIMARY = ("agpo", "grpo16")
"""Run for every seed (``--seeds``); the other arms for the first ``--extra-seeds``."""
CONTROL = "grpo16"
COMMON = ["--prompts-per-step", "16", "--update-epochs", "4", "--test-size", "1000", "--eval-size", "1000",
          "--save-every", "0", "--no-progress", "--overwrite", "--steps", "100000"]
POINTS = (0.25, 0.5, 0.75, 1.0)
"""Shares of the token budget where the arms are compared."""


RECORD_KEYS = ("tokens/generated_total", "eval/accuracy", "eps/mean", "eps/sd", "tau/mean", "tau/sd",
               "loss/clip_frac", "loss/clip_frac_base", "loss/clip_changed", "kl/step", "policy/entropy",
               "probe/skipped_frac", "reward/zero_std_frac", "filter/informative_frac", "filter/rounds")
"""The per-step metrics a run's record keeps (what ``report`` reads)."""


def run_dir(out: Path, arm: str, seed: int) -> Path:
    return out / arm / f"s{seed}"


def record_path(results: Path, arm: str, seed: int) -> Path:
    return results / arm / f"s{seed}.json"


def _short(v):
    """A per-step value as the record keeps it: 5 significant digits."""
    return float(f"{v:.5g}") if isinstance(v, float) and math.isfinite(v) else v


def write_record(d: Path, path: Path, flags: list[str]) -> None:
    """The small, committable record of the finished run in ``d`` (and its groups dump)."""
    run = read_run(d)
    run["steps"] = [{k: _short(r[k]) for k in RECORD_KEYS if k in r} for r in run["steps"]]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**run, "flags": flags}) + "\n")
    if (d / "groups.jsonl").is_file():
        path.with_suffix(".groups.jsonl").write_text((d / "groups.jsonl").read_text())


RATE_OF = {"grpo16-refill": "grpo16", "agpo-reuse-refill": "agpo-reuse"}
"""Arms that take another arm's picked rate when the sweep did not cover them (the filter
arms: the same algorithm, one switch more)."""


def lr_of(arm: str, picks: Path | None) -> list[str]:
    """``--lr`` of ``arm`` from a sweep's pick.json (none: the runs' own)."""
    if picks is None:
        return []
    pick = json.loads(picks.read_text())["pick"]
    if arm not in pick and RATE_OF.get(arm) in pick:
        arm = RATE_OF[arm]
    if arm not in pick:
        raise SystemExit(f"--lr-from {picks}: no rate picked for {arm}; sweep it first")
    return ["--lr", str(pick[arm])]


def realised_eps(out: Path, results: Path | None = None, source: str = "agpo") -> float:
    """The mean eps of ``source``'s finished runs (each run's mean over its steps, then the
    runs' mean), for the ``grpo16-eps`` arm; from its records where there are records, so
    every machine takes the same value."""
    means = []
    for run in load_runs(out, results).get(source, {}).values():
        vals = [r["eps/mean"] for r in run["steps"] if isinstance(r.get("eps/mean"), float) and math.isfinite(r["eps/mean"])]
        means += [sum(vals) / len(vals)] if vals else []
    if not means:
        raise SystemExit(f"grpo16-eps: no finished {source} run with a logged eps to take the realised eps from; "
                         "run that arm first (or choose another with --eps-from)")
    return round(sum(means) / len(means), 4)


def sized(flags: list[str], group: int) -> list[str]:
    """An arm's flags for the group size ``group`` (G) instead of 8: ``--group-size`` 8 becomes
    G and 16 becomes 2G (the arms' names keep G = 8)."""
    out = list(flags)
    for i, f in enumerate(flags[:-1]):
        if f == "--group-size":
            out[i + 1] = str(group * int(flags[i + 1]) // 8)
    return out


def run_args(out: Path, arm: str, seed: int, budget: int, extra: list[str], results: Path | None = None,
             picks: Path | None = None, dump_seed: int = 0, group: int = 8, eps_from: str = "agpo") -> list[str]:
    """The ``agpo.train`` flags of one run (its ``--out-dir`` aside); ``dump_seed``'s runs
    dump their groups; ``group``: G (``sized``); ``eps_from``: the arm ``grpo16-eps`` copies."""
    flags = sized(ARMS[arm][1], group) + lr_of(arm, picks)
    if arm == "grpo16-eps":
        flags += ["--eps-base", str(realised_eps(out, results, eps_from))]
    if seed == dump_seed:  # what the controllers saw and chose, for one seed
        flags += ["--dump-groups"]
    return [*COMMON, *flags, "--eval-every", str(ARMS[arm][2]), "--token-budget", str(budget), "--seed", str(seed),
            *extra]


def launch(out: Path, arm: str, seed: int, budget: int, extra: list[str], log, results: Path | None = None,
           picks: Path | None = None, dump_seed: int = 0, warmups: Path | None = None, group: int = 8,
           eps_from: str = "agpo") -> None:
    d = run_dir(out, arm, seed)
    if results is not None and record_path(results, arm, seed).is_file():
        return  # finished on some machine, committed
    args = run_args(out, arm, seed, budget, extra, results, picks, dump_seed, group, eps_from)
    if (d / "summary.json").is_file():  # finished here: only if it was made with these very flags
        made = json.loads((d / "command.json").read_text()) if (d / "command.json").is_file() else None
        if made != args:
            raise SystemExit(f"{d} holds a run made with other flags ({made}); give each experiment (each sweep "
                             "rate) its own --out, or delete it")
        if results is not None:
            write_record(d, record_path(results, arm, seed), args)
        return
    started = warm_start(warmups or out / "warmup", args, log)
    d.mkdir(parents=True, exist_ok=True)
    (d / "command.json").write_text(json.dumps(args) + "\n")
    t0 = time.time()
    rc = train(started or args, d)
    log(f"{arm} seed {seed}: exit {rc} in {time.time() - t0:.0f} s")
    if rc:
        raise SystemExit(f"{arm} seed {seed} failed (exit {rc}); see {d.parent / f's{seed}.log'}")
    if results is not None:
        write_record(d, record_path(results, arm, seed), args)


def finished(out: Path, arm: str, seed: int, results: Path | None) -> bool:
    """Whether the run has a record in ``results`` or has finished in ``out``."""
    recorded = results is not None and record_path(results, arm, seed).is_file()
    return recorded or (run_dir(out, arm, seed) / "summary.json").is_file()


def cmd_run(a) -> None:
    out = Path(a.out)
    arms = a.arms.split(",")
    first = a.first_seed
    queue = [(arm, s) for s in range(first, first + a.seeds) for arm in PRIMARY if arm in arms]
    queue += [(arm, s) for s in range(first, first + a.extra_seeds)
              for arm in ARMS if arm in arms and arm not in PRIMARY]
    results, picks = (Path(a.results) if a.results else None), (Path(a.lr_from) if a.lr_from else None)
    left = [(arm, s) for arm, s in queue if not finished(out, arm, s, results)]
    # grpo16-eps reads its eps when it starts, not when the arm it copies has ended
    if {"grpo16-eps", a.eps_from} <= {arm for arm, _ in left}:
        raise SystemExit(f"--arms: grpo16-eps copies {a.eps_from}'s realised eps; run it in a command of its own "
                         f"once {a.eps_from} has finished")
    log = lambda msg: print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)
    log(f"{len(queue)} runs, {a.jobs} at a time, budget {a.budget} tokens each")
    warmups = Path(a.warmups) if a.warmups else out / "warmup"
    with ThreadPoolExecutor(a.jobs) as pool:
        # the pending seeds' warm-ups first, side by side and in the runs' order (a seed's runs
        # would each wait for its one)
        todo: dict[int, str] = {}
        for arm, s in left:
            todo.setdefault(s, arm)
        jobs = [pool.submit(warm_start, warmups, run_args(out, arm, s, a.budget, a.extra, results, picks, first,
                                                          a.group_size, a.eps_from), log) for s, arm in todo.items()]
        jobs += [pool.submit(launch, out, arm, s, a.budget, a.extra, log, results, picks, first, warmups,
                             a.group_size, a.eps_from) for arm, s in queue]
        for f in jobs:
            f.result()


# -- the report -----------------------------------------------------------------------------
def read_run(d: Path) -> dict:
    """A finished run's evaluation curve ``[(tokens, accuracy)]`` (before RL at 0 tokens),
    its final accuracy, tokens and per-step metrics."""
    summary = json.loads((d / "summary.json").read_text())
    rows = [json.loads(line) for line in open(d / "metrics.jsonl")]
    steps = [r for r in rows if "tokens/generated_total" in r]
    curve = [(0, summary["accuracy_before"])]
    curve += [(r["tokens/generated_total"], r["eval/accuracy"]) for r in steps if "eval/accuracy" in r]
    curve.append((summary["tokens_generated"], summary["accuracy_after"]))
    config = yaml.safe_load((d / "config.yaml").read_text()) if (d / "config.yaml").is_file() else {}
    eps_base = (config.get("controller") or {}).get("eps_base")
    return {"summary": summary, "curve": curve, "steps": steps, "eps_base": eps_base, "warmup": warmup_of(d, config)}


def sampled_view(steps: list[dict]) -> list[dict]:
    """Per-step metrics with ``reward/zero_std_frac`` the share of the *sampled* train groups
    whose rewards are all equal: under ``--filter-groups`` the logged one covers only the
    trained groups (about 0), the sampled share is 1 - ``filter/informative_frac``."""
    return [{**r, "reward/zero_std_frac": 1.0 - r["filter/informative_frac"]} if "filter/informative_frac" in r else r
            for r in steps]


def mean_of(steps: list[dict], key: str) -> float:
    vals = [r[key] for r in steps if key in r and isinstance(r[key], (int, float)) and math.isfinite(r[key])]
    return sum(vals) / len(vals) if vals else math.nan


def load_runs(out: Path, results: Path | None) -> dict:
    """``{arm: {seed: run}}``: the records in ``results``, else the finished runs in ``out``."""
    if results is not None:
        runs = {arm: {int(f.name[1:-5]): json.loads(f.read_text()) for f in sorted((results / arm).glob("s*.json"))}
                for arm in ARMS if (results / arm).is_dir()}
    else:
        runs = {arm: {int(d.name[1:]): read_run(d) for d in sorted((out / arm).glob("s*"))
                      if (d / "summary.json").is_file()} for arm in ARMS if (out / arm).is_dir()}
    return {k: v for k, v in runs.items() if v}


def cmd_pick(a) -> None:
    """Each arm's learning rate of best mean AUC over its seeds, one sweep folder per rate."""
    sweep = Path(a.sweep)
    by_lr = {f.name[2:]: load_runs(f, f) for f in sorted(sweep.glob("lr*"))}
    by_lr = {lr: runs for lr, runs in by_lr.items() if runs}
    if not by_lr:
        raise SystemExit(f"--sweep {sweep}: no lr*/ARM/sSEED.json records; run the sweep first")
    # one horizon for every rate and arm, and each arm's seeds that every rate has: paired
    b = min(r["summary"]["tokens_generated"] for runs in by_lr.values() for v in runs.values() for r in v.values())
    table: dict[str, dict[str, float]] = {}
    seeds_of: dict[str, list[int]] = {}
    for arm in ARMS:
        have = [set(runs[arm]) for runs in by_lr.values() if arm in runs]
        if not have:
            continue
        seeds = sorted(set.intersection(*have))
        if not seeds:
            raise SystemExit(f"pick: {arm} has no seed run at every rate; finish the sweep")
        seeds_of[arm] = seeds
        table[arm] = {lr: statistics.mean(auc(runs[arm][s]["curve"], b) for s in seeds)
                      for lr, runs in by_lr.items() if arm in runs}
    pick = {arm: float(max(aucs, key=aucs.get)) for arm, aucs in table.items()}
    result = {"auc": table, "pick": pick, "seeds": seeds_of, "at_tokens": b}
    (sweep / "pick.json").write_text(json.dumps(result, indent=1) + "\n")
    print(pick_markdown(result))


def pick_markdown(result: dict) -> str:
    """The sweep's table (a ``pick.json``): each arm's mean AUC per rate and its pick."""
    lrs = sorted({lr for aucs in result["auc"].values() for lr in aucs}, key=float)
    lines = [f"Mean area under the held-out curve over the first {result['at_tokens']} tokens (%):", "",
             "| arm | seeds | " + " | ".join(f"lr {lr}" for lr in lrs) + " | picked |",
             "|---|---|" + "---|" * (len(lrs) + 1)]
    for arm, aucs in result["auc"].items():
        cells = [f"{100 * aucs[lr]:.1f}" if lr in aucs else "-" for lr in lrs]
        lines.append(f"| {ARMS[arm][0]} | {len(result['seeds'][arm])} | " + " | ".join(cells)
                     + f" | {result['pick'][arm]:g} |")
    return "\n".join(lines)


def cmd_report(a) -> None:
    out = Path(a.out)
    runs = load_runs(out, Path(a.results) if a.results else None)
    if not runs:
        raise SystemExit(f"no finished runs in {a.results or out}")
    b = min(r["summary"]["tokens_generated"] for v in runs.values() for r in v.values())
    result = {"compared_at_tokens": {str(p): p * b for p in POINTS}, "arms": {}}  # one token axis for all arms
    control = runs.get(CONTROL, {})
    for arm, by_seed in runs.items():
        seeds = sorted(by_seed)
        acc = {p: [at_tokens(by_seed[s]["curve"], p * b) for s in seeds] for p in POINTS}
        row = {"label": ARMS[arm][0], "seeds": seeds,
               "tokens_median": statistics.median(r["summary"]["tokens_generated"] for r in by_seed.values()),
               "tokens_range": [min(r["summary"]["tokens_generated"] for r in by_seed.values()),
                                max(r["summary"]["tokens_generated"] for r in by_seed.values())],
               "steps_median": statistics.median(r["summary"]["steps"] for r in by_seed.values()),
               "before": statistics.mean(by_seed[s]["curve"][0][1] for s in seeds),
               "accuracy": {str(p): statistics.mean(v) for p, v in acc.items()},
               "final_sd": statistics.stdev(acc[1.0]) if len(seeds) > 1 else math.nan,
               "collapses": sum(collapsed(by_seed[s]["curve"]) for s in seeds),
               "eps_base": sorted({by_seed[s]["eps_base"] for s in seeds if by_seed[s]["eps_base"] is not None}),
               "controllers": {k: statistics.mean(mean_of(sampled_view(by_seed[s]["steps"]), k) for s in seeds)
                               for k in ("eps/mean", "eps/sd", "tau/mean", "tau/sd", "loss/clip_frac",
                                         "loss/clip_frac_base", "loss/clip_changed", "kl/step", "policy/entropy",
                                         "probe/skipped_frac", "reward/zero_std_frac")}}
        row["auc"] = statistics.mean(auc(by_seed[s]["curve"], b) for s in seeds)
        if arm != CONTROL and control:
            both = [s for s in seeds if s in control]
            row["vs_control"] = {str(p): paired([at_tokens(by_seed[s]["curve"], p * b)
                                                  - at_tokens(control[s]["curve"], p * b) for s in both])
                                 for p in POINTS}
            row["vs_control"]["auc"] = paired([auc(by_seed[s]["curve"], b) - auc(control[s]["curve"], b)
                                               for s in both])
        result["arms"][arm] = row
    dest = Path(a.results) if a.results else out
    (dest / "report.json").write_text(json.dumps(result, indent=1) + "\n")
    print(markdown(result))
    if a.plot:
        plot(runs, Path(a.plot))


def dump_markdown(path: Path) -> str:
    """What the controllers did, by the probe's pass count, from one run's ``groups.jsonl``:
    the trained groups' mean (sd) eps and tau per pass count."""
    by: dict[int, list[tuple[float, float]]] = {}
    for line in path.read_text().splitlines():
        r = json.loads(line)
        if r["probe_pass"] is not None and r["eps"] is not None and r["tau"] is not None:  # eps: trained
            by.setdefault(r["probe_pass"], []).append((r["eps"], r["tau"]))
    lines = ["| probe passes | groups | eps mean (sd) | tau mean (sd) |", "|---|---|---|---|"]
    for k in sorted(by):
        eps, tau = [e for e, _ in by[k]], [t for _, t in by[k]]
        lines.append(f"| {k} | {len(eps)} | {statistics.mean(eps):.3f} ({statistics.pstdev(eps):.3f}) | "
                     f"{statistics.mean(tau):.3f} ({statistics.pstdev(tau):.3f}) |")
    return "\n".join(lines)


def p_text(p: float) -> str:
    return "p=n/a" if not math.isfinite(p) else "p<0.001" if p < 0.001 else f"p={p:.3f}"


def markdown(result: dict) -> str:
    pct = lambda v: "n/a" if v is None or not math.isfinite(v) else f"{100 * v:.1f}"
    lines = ["| arm | seeds | steps | tokens | before | " + " | ".join(f"{int(100 * p)}%" for p in POINTS)
             + " | final - GRPO-2G [95% CI], p | sd | collapses |", "|" + "---|" * (9 + len(POINTS) - 1)]
    for arm, r in result["arms"].items():
        vs = r.get("vs_control", {}).get("1.0")
        diff = "(control)" if vs is None else \
            f"{100 * vs['mean']:+.1f} [{100 * vs['lo']:+.1f}, {100 * vs['hi']:+.1f}], {p_text(vs['p'])}"
        lines.append(f"| {r['label']} | {len(r['seeds'])} | {r['steps_median']:.0f} | {r['tokens_median']:.0f} | "
                     f"{pct(r['before'])} | " + " | ".join(pct(r["accuracy"][str(p)]) for p in POINTS)
                     + f" | {diff} | {pct(r['final_sd'])} | {r['collapses']}/{len(r['seeds'])} |")
    lines += ["", "Paired difference from GRPO-2G at each equal-token point (points; mean [95% CI], sign-flip p):", "",
              "| arm | " + " | ".join(f"{int(100 * p)}%" for p in POINTS) + " | mean over the run |",
              "|---|" + "---|" * (len(POINTS) + 1)]
    for arm, r in result["arms"].items():
        if "vs_control" in r:
            cells = [r["vs_control"][str(p)] for p in POINTS] + [r["vs_control"]["auc"]]
            lines.append(f"| {r['label']} | " + " | ".join(
                f"{100 * c['mean']:+.1f} [{100 * c['lo']:+.1f}, {100 * c['hi']:+.1f}] {p_text(c['p'])}" for c in cells) + " |")
    keys = (("eps/mean", "eps mean"), ("eps/sd", "eps sd"), ("tau/sd", "tau sd"), ("loss/clip_frac", "clipped"),
            ("loss/clip_changed", "changed vs eps_base"), ("kl/step", "kl/step"), ("policy/entropy", "entropy"),
            ("reward/zero_std_frac", "all-equal groups"), ("probe/skipped_frac", "skipped"))
    lines += ["", "Controllers and trust region, mean over steps and seeds:", "",
              "| arm | " + " | ".join(k for _, k in keys) + " |", "|---|" + "---|" * len(keys)]
    fmt = lambda v: "-" if not math.isfinite(v) else f"{v:.3f}"
    for arm, r in result["arms"].items():
        lines.append(f"| {r['label']} | " + " | ".join(fmt(r["controllers"][k]) for k, _ in keys) + " |")
    return "\n".join(lines)


def plot(runs: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    grid = [i / 20 for i in range(21)]
    for arm, by_seed in runs.items():
        b = statistics.median(r["summary"]["tokens_generated"] for r in by_seed.values())
        mean = [statistics.mean(at_tokens(r["curve"], g * b) for r in by_seed.values()) for g in grid]
        axes[0].plot([g * b for g in grid], [100 * m for m in mean], label=f"{ARMS[arm][0]} (n={len(by_seed)})")
        for ax, key in ((axes[1], "policy/entropy"), (axes[2], "loss/clip_frac")):
            curves = [[r.get(key, math.nan) for r in run["steps"]] for run in by_seed.values()]
            n = min(len(c) for c in curves)
            tokens = [statistics.mean(run["steps"][i]["tokens/generated_total"] for run in by_seed.values())
                      for i in range(n)]
            ax.plot(tokens, [statistics.mean(c[i] for c in curves) for i in range(n)], label=ARMS[arm][0])
    axes[0].set(xlabel="generated tokens (probe included)", ylabel="held-out accuracy, % (mean over seeds)")
    axes[1].set(xlabel="generated tokens", ylabel="policy entropy (T=1)")
    axes[2].set(xlabel="generated tokens", ylabel="clip share, epochs 2-4")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def cmd_collect(a) -> None:
    """Every task's main result (``EVIDENCE/TASK/main/report.json``) in one file, keyed by task:
    the evidence the README and docs/recipes.md quote, for a reader who wants one file."""
    root = Path(a.evidence)
    result = {t.name: json.loads((t / "main" / "report.json").read_text())
              for t in sorted(root.iterdir()) if (t / "main" / "report.json").is_file()}
    if not result:
        raise SystemExit(f"{root}: no TASK/main/report.json (run `report --results {root}/TASK/main` first)")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"{a.out}: {', '.join(result)}")


def cmd_warmup_curve(a) -> None:
    """Window loss and greedy held-out accuracy along one seed's warm-up (the run's own warm-up
    loop), every ``--every`` steps, as JSON lines: how a task and its target loss are chosen."""
    import torch

    from agpo.config import config_from_args
    from agpo.learn.launch import resolve_defaults, training_problems
    from agpo.learn.policy import Policy
    from agpo.learn.sft import supervised_warmup
    from agpo.models import load_model_and_tokenizer
    from agpo.tasks.evaluate import evaluate

    torch.set_num_threads(1)
    flags = [*COMMON, "--seed", str(a.seed), "--eval-size", str(a.eval_size), *a.extra]
    cfg = resolve_defaults(config_from_args(flags))
    train, test, _ = training_problems(cfg)
    torch.manual_seed(a.seed)
    model, tok = load_model_and_tokenizer(cfg.model.model, seed=a.seed, dtype=cfg.model.dtype, device="cpu",
                                          attn=cfg.model.attn)

    def watch(step: int, loss: float) -> None:
        acc = evaluate(model, tok, test, max_new_tokens=cfg.rollout.max_new_tokens, seed=a.seed, progress=False,
                       batch_size=64)["summary"]["accuracy"]
        print(json.dumps({"flags": " ".join(a.extra), "seed": a.seed, "step": step, "window_loss": round(loss, 4),
                          "accuracy": acc}), flush=True)

    w = cfg.warmup
    supervised_warmup(Policy(model, impl=cfg.loss.impl), tok, train, steps=a.steps, batch_size=w.sft_batch_size,
                      lr=w.sft_lr, seed=a.seed, progress=False, every=a.every, watch=watch)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="train every arm and seed that has not finished")
    r.add_argument("--out", default="runs/evidence")
    r.add_argument("--seeds", type=int, default=16, help="seeds of AGPO and GRPO-2G")
    r.add_argument("--extra-seeds", type=int, default=8, help="seeds of the other arms")
    r.add_argument("--first-seed", type=int, default=0, help="seeds run from here (main runs after a sweep: seeds "
                                                            "the sweep did not pick the rate on); its runs dump groups")
    r.add_argument("--arms", default=",".join(ARMS))
    r.add_argument("--budget", type=int, default=90000, help="generated tokens per run, probe included")
    r.add_argument("--group-size", type=int, default=8, help="G: the arms' groups of 8 get G samples, of 16 2G")
    r.add_argument("--jobs", type=int, default=2)
    r.add_argument("--eps-from", default="agpo", choices=["agpo", "agpo-reuse"], help="grpo16-eps runs at this "
                   "arm's realised mean eps")
    r.add_argument("--results", default=None, help="keep each finished run's record here (commit it); skip "
                                                     "the runs it holds")
    r.add_argument("--lr-from", default=None, help="a sweep's pick.json: each arm at its picked --lr")
    r.add_argument("--warmups", default=None, help="where each seed's warm-up is kept (default OUT/warmup); give "
                                                     "one folder to every experiment on a task to warm up once "
                                                     "(one run command at a time per folder)")
    r.add_argument("extra", nargs="*", help="after --: more agpo.train flags for every run")
    q = sub.add_parser("report", help="the table (markdown), report.json and the plot")
    q.add_argument("--out", default="runs/evidence")
    q.add_argument("--results", default=None, help="read the run records here instead of the runs")
    q.add_argument("--plot", default=None, help="write the plot here (PNG)")
    k = sub.add_parser("pick", help="each arm's best learning rate of a sweep (pick.json)")
    k.add_argument("--sweep", required=True, help="a folder of lrX/ record folders")
    o = sub.add_parser("collect", help="every task's report.json in one file (docs/img/evidence.json)")
    o.add_argument("--evidence", default="docs/evidence", help="a folder of TASK/main/report.json")
    o.add_argument("--out", default="docs/img/evidence.json")
    c = sub.add_parser("warmup-curve", help="loss and held-out accuracy along one seed's warm-up (JSON lines)")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--steps", type=int, default=2500, help="warm-up steps (no target loss: the whole curve)")
    c.add_argument("--every", type=int, default=250, help="evaluate after every this many steps")
    c.add_argument("--eval-size", type=int, default=500, help="held-out problems per evaluation")
    c.add_argument("extra", nargs="*", help="after --: the task's agpo.train flags")
    return p


def main(argv: list[str] | None = None) -> None:
    a = build_parser().parse_args(argv)
    {"run": cmd_run, "report": cmd_report, "pick": cmd_pick, "collect": cmd_collect,
     "warmup-curve": cmd_warmup_curve}[a.cmd](a)


if __name__ == "__main__":
    main()
