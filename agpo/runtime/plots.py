"""Training curves of one or more run directories, drawn with matplotlib (no display needed).

Reads each run directory's ``metrics.jsonl`` (written by ``agpo.runtime.metrics_log``) and
draws one subplot per metric, the runs overlaid (legend = the run directory's name).
``plot_runs(run_dirs, out, ...)`` writes a PNG, ``make_figure`` builds the figure itself.
A ``*/mean`` metric whose ``*/min`` and ``*/max`` are logged too (``eps``, ``tau``) gets
the min..max range as a shaded band. ``PlotError`` names what cannot be drawn.
``python -m agpo.plot`` is the command around it.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")  # before anything imports pyplot; the figures below never use pyplot anyway

import numpy as np  # noqa: E402
from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from agpo.runtime.metrics_log import METRICS_FILE, read_metrics  # noqa: E402

__all__ = ["DEFAULT_KEYS", "PlotError", "Run", "load_run", "select_keys", "make_figure", "plot_runs"]

DEFAULT_KEYS = (
    "reward/mean", "reward/accuracy", "reward/zero_std_frac", "eps/mean", "tau/mean",
    "probe/vote_entropy", "policy/entropy", "kl/step", "kl/ref", "loss/clip_frac",
    "optim/grad_norm", "response/length", "perf/tokens_per_s",
)
MAX_COLS = 3


class PlotError(Exception):
    """A run directory or an option that cannot be drawn (``main`` exits with code 2)."""


class Run:
    """The metric rows of one run directory and its label in the legend."""

    def __init__(self, path: Path, rows: list[dict], label: str):
        self.path, self.rows, self.label = path, rows, label

    def keys(self) -> set[str]:
        return {k for r in self.rows for k, v in r.items() if _finite(v)}

    def series(self, key: str, x: str = "step") -> tuple[np.ndarray, np.ndarray]:
        """(x, y) of the rows where both are finite numbers, sorted by x."""
        pts = [(float(r[x]), float(r[key])) for r in self.rows if _finite(r.get(x)) and _finite(r.get(key))]
        pts.sort(key=lambda p: p[0])
        if not pts:
            return np.empty(0), np.empty(0)
        a = np.asarray(pts, dtype=np.float64)
        return a[:, 0], a[:, 1]


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def load_run(run_dir: str | Path) -> Run:
    """The rows of ``run_dir/metrics.jsonl`` (``run_dir`` may also be the file itself)."""
    p = Path(run_dir)
    if p.is_file() and p.name == METRICS_FILE:
        p = p.parent
    f = p / METRICS_FILE
    if not f.is_file():
        raise PlotError(f"no {METRICS_FILE} in {p}: is it a run directory of python -m agpo.train?")
    try:
        rows = read_metrics(f)
    except (OSError, ValueError) as e:
        raise PlotError(f"cannot read {f}: {e}") from None
    return Run(p, rows, p.resolve().name or str(p))


def _unique_labels(runs: list[Run]) -> None:
    """Runs with the same directory name (``a/out``, ``b/out``) get ``a/out``-style labels."""
    seen: dict[str, int] = {}
    for r in runs:
        seen[r.label] = seen.get(r.label, 0) + 1
    for r in runs:
        if seen[r.label] > 1:
            r.label = "/".join(r.path.resolve().parts[-2:])


def select_keys(runs: Sequence[Run], keys: Sequence[str] | None = None) -> list[str]:
    """The metrics to draw: ``keys`` (or the defaults, then ``eval/*``) that some run has."""
    have = set().union(*(r.keys() for r in runs)) if runs else set()
    if keys is None:
        keys = list(DEFAULT_KEYS) + sorted(k for k in have if k.startswith("eval/"))
    out: list[str] = []
    for k in keys:
        if k in have and k not in out:
            out.append(k)
    return out


def _smooth(y: np.ndarray, n: int) -> np.ndarray:
    """Trailing moving average over ``n`` points (a shorter window for the first points)."""
    if n <= 1 or y.size == 0:
        return y
    c = np.concatenate(([0.0], np.cumsum(y)))
    idx = np.arange(1, y.size + 1)
    lo = np.maximum(idx - n, 0)
    return (c[idx] - c[lo]) / (idx - lo)


def _band_keys(key: str) -> tuple[str, str] | None:
    if key.endswith("/mean"):
        base = key[: -len("mean")]
        return base + "min", base + "max"
    return None


def make_figure(runs: Sequence[Run], keys: Sequence[str] | None = None, x: str = "step",
                smooth: int = 1) -> tuple[Figure, dict]:
    """The figure of ``runs`` and what was drawn on it.

    Returns ``(figure, info)`` with ``info = {"keys": [...], "lines": {key: n_lines},
    "bands": {key: n_bands}, "labels": [...]}``. Raises ``PlotError`` when nothing can be drawn.
    """
    runs = list(runs)
    if not runs:
        raise PlotError("no run directories given")
    if smooth < 1:
        raise PlotError(f"--smooth must be >= 1, got {smooth}")
    if x != "step" and not any(x in r.keys() for r in runs):
        raise PlotError(f"no run has the x-axis key {x!r} (try --x step)")
    drawn = [k for k in select_keys(runs, keys) if k != x]
    if not drawn:
        wanted = ", ".join(keys) if keys is not None else "the default keys"
        raise PlotError(f"nothing to plot: none of {wanted} in {', '.join(str(r.path) for r in runs)}")

    ncols = min(MAX_COLS, len(drawn))
    nrows = math.ceil(len(drawn) / ncols)
    fig = Figure(figsize=(4.6 * ncols, 3.1 * nrows + 0.5), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    info: dict = {"keys": drawn, "lines": {}, "bands": {}, "labels": [r.label for r in runs]}
    handles: dict[str, object] = {}
    for ax, key in zip(axes, drawn):
        n_lines = n_bands = 0
        for i, run in enumerate(runs):
            xs, ys = run.series(key, x)
            if xs.size == 0:
                continue
            color = f"C{i % 10}"
            sparse = xs.size <= 20
            (line,) = ax.plot(xs, _smooth(ys, smooth), color=color, label=run.label, lw=1.4,
                              marker="o" if sparse else None, ms=3)
            handles.setdefault(run.label, line)
            n_lines += 1
            band = _band_keys(key)
            if band:
                bx, lo = run.series(band[0], x)
                bx2, hi = run.series(band[1], x)
                if lo.size and lo.size == hi.size and np.array_equal(bx, bx2):
                    ax.fill_between(bx, _smooth(lo, smooth), _smooth(hi, smooth), color=color, alpha=0.18, lw=0)
                    n_bands += 1
        title = key + ("  (band: min..max)" if n_bands else "")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel(x, fontsize=8)
        ax.tick_params(labelsize=8)
        ax.grid(True, alpha=0.3)
        info["lines"][key] = n_lines
        info["bands"][key] = n_bands
    for ax in axes[len(drawn):]:
        ax.set_visible(False)
    if handles:
        fig.legend(list(handles.values()), list(handles.keys()), loc="upper center",
                   ncol=min(len(handles), 4), fontsize=9, frameon=False)
    top = 1 - 0.45 / fig.get_figheight()
    fig.tight_layout(rect=(0, 0, 1, top))
    return fig, info


def plot_runs(run_dirs: Sequence[str | Path] | str | Path, out: str | Path | None = None,
              keys: Sequence[str] | None = None, x: str = "step", smooth: int = 1) -> Path:
    """Draw the curves of ``run_dirs`` into the PNG ``out`` (default ``RUN_DIR/curves.png``
    of the first run) and return its path. Raises ``PlotError``."""
    if isinstance(run_dirs, (str, Path)):
        run_dirs = [run_dirs]
    runs = [load_run(d) for d in run_dirs]
    _unique_labels(runs)
    fig, _ = make_figure(runs, keys=keys, x=x, smooth=smooth)
    path = Path(out) if out is not None else runs[0].path / "curves.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path
