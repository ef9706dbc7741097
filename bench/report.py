"""Turns benchmark results into the comparison table (Markdown).

Usable on pytest-benchmark JSON: ``python bench/report.py results.json > table.md``.
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict


def markdown_table(rows: list[dict]) -> str:
    """rows: dicts with ``median`` (s) and ``extra_info`` (shape, mode, impl, flops, ...)."""
    groups = defaultdict(dict)
    matmul = {}
    for r in rows:
        x = r["extra_info"]
        if "impl" not in x:
            continue
        if x["impl"] == "matmul":
            matmul[x["shape"]] = x["flops"] / r["median"]
            continue
        groups[(x["shape"], x["mode"])][x["impl"]] = (r["median"], x)
    lines = ["| shape | mode | impl | median ms | TFLOP/s | % of bf16 matmul | vs eager | vs liger | peak extra MiB |",
             "|---|---|---|---|---|---|---|---|---|"]
    for (shape, mode), impls in groups.items():
        base = impls.get("eager", (None,))[0]
        lig = impls.get("liger", (None,))[0]
        for impl, (med, x) in sorted(impls.items()):
            rate = x["flops"] / med
            mm = matmul.get(shape)
            lines.append("| " + " | ".join([
                shape, mode, impl, f"{med * 1e3:.2f}", f"{rate / 1e12:.1f}",
                f"{100 * rate / mm:.0f}%" if mm else "-",
                f"{base / med:.2f}x" if base else "-",
                f"{lig / med:.2f}x" if lig and mode != "bwd" else "-",
                f"{x['peak_extra_mib']:.0f}" if x.get("peak_extra_mib") is not None else "-",
            ]) + " |")
    lines.append("\nLiger computes its gradients inside the forward call, so its 'bwd' row is "
                 "only the hand-back of stored gradients: compare fwd+bwd.")
    for shape, rate in matmul.items():
        lines.append(f"\nbf16 matmul [N,D]x[D,V] for {shape}: {rate / 1e12:.1f} TFLOP/s")
    return "\n".join(lines)


def train_table(rows: list[dict]) -> str:
    """The training-step rows (``extra_info["bench"] == "train_step"``): seconds and
    tokens/s per phase."""
    rows = [r for r in rows if r["extra_info"].get("bench") == "train_step"]
    if not rows:
        return ""
    lines = ["| preset | algo | step median s | generate s | score s | update s | generate tok/s | "
             "score tok/s | update tok/s | generated tokens |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        x = r["extra_info"]
        lines.append(f"| {x['preset']} | {x['algo']} | {r['median']:.3f} | {x['generate_s']:.3f} | {x['score_s']:.3f} "
                     f"| {x['update_s']:.3f} | {x['generate_tokens_per_s']:.0f} | {x['score_tokens_per_s']:.0f} "
                     f"| {x['update_tokens_per_s']:.0f} | {x['generated_tokens']:.0f} |")
    return "\n".join(lines)


def update_table(rows: list[dict]) -> str:
    """Padded vs packed rows (``extra_info["bench"]`` "update" or "step"): time, tokens
    really processed, real tokens/s and peak memory, with the packed speed-up."""
    rows = [r for r in rows if r["extra_info"].get("bench") in ("update", "step")]
    if not rows:
        return ""
    medians = {(r["extra_info"]["bench"], r["extra_info"]["model"], r["extra_info"]["layout"]): r["median"]
               for r in rows}
    lines = ["| what | layout | median s | real tokens | processed tokens | processed / real | real tok/s "
             "| vs padded | peak MiB |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        x = r["extra_info"]
        padded = medians.get((x["bench"], x["model"], "padded"))
        lines.append(f"| {x['bench']} ({x['model']}, {x['device']}) | {x['layout']} | {r['median']:.3f} "
                     f"| {x['real_tokens']:.0f} | {x['processed_tokens']:.0f} "
                     f"| {x['processed_tokens'] / x['real_tokens']:.2f} | {x['real_tokens'] / r['median']:.0f} "
                     f"| {padded / r['median']:.2f}x | {x['peak_mib']:.0f} |")
    return "\n".join(lines)


def rollout_table(rows: list[dict]) -> str:
    """The rollout rows (``extra_info["bench"] == "rollout"``): generation tokens/s per
    engine on the same rollout, and each engine's speed relative to hf."""
    rows = [r for r in rows if r["extra_info"].get("bench") == "rollout"]
    if not rows:
        return ""
    hf = {(r["extra_info"]["model"], r["extra_info"]["device"]): r["extra_info"]["generate_tokens_per_s"]
          for r in rows if r["extra_info"]["engine"] == "hf"}
    lines = ["| model | device | engine | rollout median s | generated tokens | generate tok/s | vs hf | "
             "weight sync s | engine start s | peak RSS MiB |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        x = r["extra_info"]
        base = hf.get((x["model"], x["device"]))
        rate = x["generate_tokens_per_s"]
        lines.append(f"| {x['model']} | {x['device']} | {x['engine']} | {r['median']:.2f} | {x['generated_tokens']:.0f} "
                     f"| {rate:.1f} | {f'{rate / base:.2f}x' if base else '-'} | {x['weight_sync_s']:.2f} "
                     f"| {x['engine_start_s']:.1f} | {x['peak_rss_mib']:.0f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    data = json.load(open(sys.argv[1]))
    rows = [dict(median=b["stats"]["median"], extra_info=b["extra_info"]) for b in data["benchmarks"]]
    print(markdown_table(rows))
    print(train_table(rows))
    print(update_table(rows))
    print(rollout_table(rows))
