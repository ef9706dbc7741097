"""agpo.runtime.metrics_log (metrics.jsonl / events.jsonl, resume truncation) and agpo.plot (PNG curves)."""

from __future__ import annotations

import json
import math
import struct

import pytest

from agpo import plot
from agpo.runtime import plots
from agpo.runtime.metrics_log import (
    MetricsLogger,
    TensorBoardMissingError,
    read_metrics,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _metrics(step: int, scale: float = 1.0) -> dict:
    return {
        "reward/mean": scale * step / 10, "reward/accuracy": min(1.0, scale * step / 8),
        "eps/mean": 0.2, "eps/min": 0.1, "eps/max": 0.3 + 0.01 * step,
        "tau/mean": 1.0, "tau/min": 0.7, "tau/max": 1.3,
        "kl/step": 0.01 * step, "tokens/generated_total": int(100 * step * scale),
    }


def _write_run(run_dir, steps=8, scale=1.0, eval_every=4):
    with MetricsLogger(run_dir, total_steps=steps, progress=False) as log:
        for s in range(1, steps + 1):
            m = _metrics(s, scale)
            if s % eval_every == 0:
                m["eval/accuracy"] = 0.1 * s
            log.log(s, m)
    return run_dir


def _png_size(path):
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


# ----------------------------------------------------------------------------- metrics_log


def test_logger_writes_strict_jsonl_with_null_for_nan(tmp_path, capsys):
    with MetricsLogger(tmp_path, total_steps=3, progress=True) as log:
        log.log(1, {"reward/mean": 0.5, "kl/ref": float("nan"), "optim/grad_norm": float("inf"),
                    "tokens/generated_total": 128})
        log.log(2, {"reward/mean": 0.75, "reward/accuracy": 1 / 3, "eps/mean": 0.2, "tau/mean": 1.0})
        log.event("eval_before", {"accuracy": 0.25, "n": 16, "bad": float("nan"), "per_item": [1, 0]})
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2
    rows = [json.loads(line, parse_constant=lambda c: pytest.fail(f"non-strict JSON constant {c}")) for line in lines]
    assert rows[0] == {"step": 1, "reward/mean": 0.5, "kl/ref": None, "optim/grad_norm": None,
                       "tokens/generated_total": 128}
    assert isinstance(rows[0]["step"], int) and rows[1]["step"] == 2
    assert read_metrics(tmp_path) == rows == read_metrics(tmp_path / "metrics.jsonl")
    events = [json.loads(line) for line in (tmp_path / "events.jsonl").read_text().splitlines()]
    assert events == [{"event": "eval_before", "accuracy": 0.25, "n": 16, "bad": None, "per_item": [1, 0]}]
    err = capsys.readouterr()
    assert "eval_before" in err.out + err.err and "accuracy=0.25" in err.out + err.err
    assert "reward=0.75" in err.err and "acc=0.333" in err.err  # the tqdm postfix (3 significant digits)


def test_each_line_is_flushed_before_close(tmp_path):
    log = MetricsLogger(tmp_path, total_steps=5, progress=False)
    log.log(1, {"reward/mean": 1.0})
    assert read_metrics(tmp_path) == [{"step": 1, "reward/mean": 1.0}]
    log.close()
    log.close()  # idempotent


def test_fresh_run_truncates_and_resume_keeps_rows_up_to_step(tmp_path):
    _write_run(tmp_path, steps=6)
    (tmp_path / "metrics.jsonl").open("a").write('{"step": 7, "reward/me')  # crash mid-line
    with MetricsLogger(tmp_path, total_steps=6, progress=True, resume_step=4) as log:
        assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3, 4]
        assert log._bar.n == 4
        for s in (5, 6):
            log.log(s, _metrics(s))
    resumed = (tmp_path / "metrics.jsonl").read_text()
    uninterrupted = (_write_run(tmp_path / "full", steps=6) / "metrics.jsonl").read_text()
    assert resumed == uninterrupted
    assert not list(tmp_path.glob("*.tmp"))  # the atomic rewrite left no temp file
    with MetricsLogger(tmp_path, total_steps=6, progress=False):
        pass
    assert (tmp_path / "metrics.jsonl").read_text() == ""  # resume_step=None starts afresh


def test_resume_without_a_metrics_file(tmp_path):
    with MetricsLogger(tmp_path / "new", total_steps=3, progress=False, resume_step=2) as log:
        log.log(3, {"reward/mean": 0.0})
    assert read_metrics(tmp_path / "new") == [{"step": 3, "reward/mean": 0.0}]


def test_read_metrics_skips_truncated_last_line(tmp_path):
    f = tmp_path / "metrics.jsonl"
    f.write_text('{"step": 1, "reward/mean": 0.5}\n{"step": 2, "reward/mean": null}\n{"step": 3, "rew')
    assert read_metrics(f) == [{"step": 1, "reward/mean": 0.5}, {"step": 2, "reward/mean": None}]
    f.write_text('{"step": 1}\nnot json\n{"step": 3}\n')
    with pytest.raises(ValueError, match="line 2"):
        read_metrics(f)


def test_disabled_logger_writes_nothing(tmp_path):
    run = tmp_path / "rank1"
    with MetricsLogger(run, total_steps=3, enabled=False, tensorboard=True, resume_step=1) as log:
        log.log(1, {"reward/mean": 1.0})
        log.event("eval_after", {"accuracy": 1.0})
    assert not run.exists()


def test_tensorboard_missing_gives_a_clear_error(tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_tensorboard(name, *args, **kwargs):
        if name.startswith(("torch.utils.tensorboard", "tensorboard")):
            raise ModuleNotFoundError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_tensorboard)
    with pytest.raises(TensorBoardMissingError, match=r"--tensorboard needs the tensorboard package \(pip install"):
        MetricsLogger(tmp_path / "tb", total_steps=2, progress=False, tensorboard=True)
    assert not (tmp_path / "tb").exists()  # failed before creating anything


# ----------------------------------------------------------------------------- plot


def test_plot_single_run_default_output(tmp_path):
    run = _write_run(tmp_path / "agpo")
    out = plots.plot_runs(run)
    assert out == run / "curves.png"
    w, h = _png_size(out)
    assert w > 500 and h > 300 and out.stat().st_size > 5000
    fig, info = plots.make_figure([plots.load_run(run)])
    assert info["keys"] == ["reward/mean", "reward/accuracy", "eps/mean", "tau/mean", "kl/step", "eval/accuracy"]
    assert all(n == 1 for n in info["lines"].values())
    assert info["bands"]["eps/mean"] == info["bands"]["tau/mean"] == 1 and info["bands"]["kl/step"] == 0
    ax = fig.axes[0]
    x, y = ax.lines[0].get_data()
    assert list(x) == list(range(1, 9)) and y[-1] == pytest.approx(0.8)


def test_plot_overlays_runs_against_generated_tokens(tmp_path):
    a = _write_run(tmp_path / "x" / "agpo")
    b = _write_run(tmp_path / "y" / "grpo", scale=2.0)
    out = tmp_path / "cmp" / "cmp.png"
    assert plot.main([str(a), str(b), "--out", str(out), "--x", "tokens/generated_total",
                      "--keys", "reward/mean,eps/mean,nope/missing", "--smooth", "3"]) == 0
    _png_size(out)
    fig, info = plots.make_figure([plots.load_run(a), plots.load_run(b)], keys=["reward/mean", "eps/mean", "nope/missing"],
                                 x="tokens/generated_total", smooth=3)
    assert info["keys"] == ["reward/mean", "eps/mean"] and info["lines"] == {"reward/mean": 2, "eps/mean": 2}
    assert info["labels"] == ["agpo", "grpo"]
    xb, yb = fig.axes[0].lines[1].get_data()
    assert list(xb) == [200 * s for s in range(1, 9)]  # run b's x = its generated tokens
    assert yb[2] == pytest.approx((0.2 + 0.4 + 0.6) / 3)  # 3-point trailing moving average


def test_plot_same_dir_names_get_distinct_labels(tmp_path):
    runs = [plots.load_run(_write_run(tmp_path / p / "out", steps=3)) for p in ("a", "b")]
    plots._unique_labels(runs)
    assert [r.label for r in runs] == ["a/out", "b/out"]


def test_plot_errors_exit_2(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert plot.main([str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err
    assert f"no metrics.jsonl in {tmp_path / 'empty'}: is it a run directory of python -m agpo.train?" in err
    assert plot.main([str(tmp_path / "does-not-exist")]) == 2
    run = _write_run(tmp_path / "run", steps=2)
    assert plot.main([str(run), "--keys", "nope/a,nope/b"]) == 2
    assert "nothing to plot" in capsys.readouterr().err
    assert plot.main([str(run), "--x", "nope/x"]) == 2
    assert not (run / "curves.png").exists()


def test_plot_skips_null_values(tmp_path):
    with MetricsLogger(tmp_path, total_steps=3, progress=False) as log:
        log.log(1, {"reward/mean": 0.1, "kl/ref": float("nan")})
        log.log(2, {"reward/mean": float("nan"), "kl/ref": float("nan")})
        log.log(3, {"reward/mean": 0.3, "kl/ref": float("nan")})
    fig, info = plots.make_figure([plots.load_run(tmp_path)])
    assert info["keys"] == ["reward/mean"]  # kl/ref has no finite value
    x, y = fig.axes[0].lines[0].get_data()
    assert list(x) == [1, 3] and all(math.isfinite(v) for v in y)
