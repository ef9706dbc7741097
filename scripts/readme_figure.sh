#!/usr/bin/env bash
# Regenerate the README's AGPO-vs-GRPO picture and the numbers quoted beside it.
#
#   bash scripts/readme_figure.sh
#
# Two runs of the embedded default (tiny preset, a+b= task, seed 0), one per
# algorithm, then agpo.plot over both. About two minutes per run on 2 idle CPU cores.
# The numbers the README quotes are printed at the end and kept, from each run's
# summary.json, in docs/img/readme-agpo-vs-grpo.json (tests/test_docs.py checks the README
# against that file).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
for algo in agpo grpo; do
    rm -rf "runs/readme-$algo"
    "$PY" -m agpo.train --algo "$algo" --out-dir "runs/readme-$algo"
done
mkdir -p docs/img
"$PY" -m agpo.plot runs/readme-agpo runs/readme-grpo --smooth 5 \
    --keys reward/mean,eps/mean,tau/mean,policy/entropy,loss/clip_frac,kl/step \
    --out docs/img/readme-agpo-vs-grpo.png
"$PY" - <<'PY'
import json
out = {algo: json.load(open(f"runs/readme-{algo}/summary.json")) for algo in ("agpo", "grpo")}
rows = [json.loads(line) for line in open("runs/readme-agpo/metrics.jsonl")]
ctl = {"eps_mean": sum(r["eps/mean"] for r in rows) / len(rows), "eps_min": min(r["eps/min"] for r in rows),
       "eps_max": max(r["eps/max"] for r in rows), "tau_min": min(r["tau/min"] for r in rows),
       "tau_max": max(r["tau/max"] for r in rows)}
out["agpo_controllers"] = {k: round(v, 2) for k, v in ctl.items()}
with open("docs/img/readme-agpo-vs-grpo.json", "w") as f:
    json.dump(out, f, indent=1, sort_keys=True)
    f.write("\n")
print("agpo controllers over the run:", out["agpo_controllers"])
for algo in ("agpo", "grpo"):
    s = out[algo]
    print(f"{algo}: held-out accuracy {100 * s['accuracy_before']:.1f}% -> {100 * s['accuracy_after']:.1f}%, "
          f"{s['tokens_generated']} tokens generated in {s['steps']} steps")
PY
