"""Table of one AGPO step per rollout engine, from the run directories the GPU suite makes.

``python bench/engine_steps.py DIR``: every ``DIR/rollout-<preset>-<engine>/metrics.jsonl``;
the last step of each run (engine start-up and the first weight sync are behind it).
"""

import json
import pathlib
import sys

KEYS = ["time/step", "time/generate", "time/generate_probe", "time/weight_sync", "perf/generate_tokens_per_s",
        "rollout/logprob_abs_diff_mean", "rollout/ratio_outside_frac", "rollout/tis_weight_mean"]


def table(root: pathlib.Path) -> str:
    lines = ["| run | " + " | ".join(KEYS) + " |", "|---|" + "---|" * len(KEYS)]
    for d in sorted(root.glob("rollout-*")):
        f = d / "metrics.jsonl"
        rows = [json.loads(line) for line in f.read_text().splitlines()] if f.exists() else []
        last = rows[-1] if rows else {}
        lines.append(f"| {d.name} | " + " | ".join(f"{last[k]:.4g}" if k in last else "-" for k in KEYS) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(table(pathlib.Path(sys.argv[1])))
