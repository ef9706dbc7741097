"""Training curves of one or more runs as a PNG: ``python -m agpo.plot RUN_DIR [RUN_DIR ...]``.

Reads each run directory's ``metrics.jsonl`` (written by ``agpo.runtime.metrics_log``) and draws
one subplot per metric, the runs overlaid (legend = the run directory's name), with
matplotlib's Agg backend (no display needed)::

    python -m agpo.plot runs/agpo runs/grpo --out cmp.png --x tokens/generated_total --smooth 5

- ``--keys k1,k2``: the metrics to draw (default: those of ``DEFAULT_KEYS`` the runs have,
  then every ``eval/*`` key). Keys no run has are skipped.
- ``--x KEY``: the x axis, ``step`` by default; ``tokens/generated_total`` compares methods
  at equal generated-token cost.
- ``--smooth N``: trailing moving average over ``N`` logged points (1 = raw).
- ``--out FILE.png``: default ``RUN_DIR/curves.png`` of the first run.

A ``*/mean`` metric whose ``*/min`` and ``*/max`` are logged too (``eps``, ``tau``) gets
the min..max range as a shaded band. Python API:
``agpo.runtime.plots``. Errors (no ``metrics.jsonl``, nothing to draw) print
one line and exit with code 2.
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from agpo.runtime.plots import PlotError, plot_runs


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m agpo.plot",
                                description="Draw the training curves of agpo.train run directories to a PNG.")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories (with a metrics.jsonl)")
    p.add_argument("--out", default=None, metavar="FILE.png", help="output PNG (default: RUN_DIR/curves.png)")
    p.add_argument("--keys", default=None, help="comma-separated metric keys (default: the usual ones present)")
    p.add_argument("--x", default="step", metavar="KEY", help="x axis: step (default) or a metric such as "
                   "tokens/generated_total")
    p.add_argument("--smooth", type=int, default=1, metavar="N", help="moving average over N points (default 1)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    keys = [k.strip() for k in a.keys.split(",") if k.strip()] if a.keys is not None else None
    try:
        path = plot_runs(a.run_dirs, a.out, keys=keys, x=a.x, smooth=a.smooth)
    except PlotError as e:
        print(f"agpo.plot: error: {e}", file=sys.stderr)
        return 2
    print(f"agpo.plot: wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
