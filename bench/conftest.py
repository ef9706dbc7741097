"""pytest-benchmark setup: device, the default/long split, and a comparison table at the end.

``pytest bench/ --benchmark-only`` runs every benchmarked component (the fused loss and
log-probs against eager PyTorch and Liger-Kernel, the HF sampler, the HF rollout, the
update pass and a full step on SmolLM2-135M, the tiny preset's training step) at small
shapes: a few minutes on a 2-core laptop. ``--bench-long`` adds the long shapes (the
152k vocabulary, one 16k-token sequence, the model heads of 8B-14B models on a GPU, the
realistic 32-row update batch, 8-prompt rollouts), which the tables in bench/results/
were measured at: tens of minutes on a CPU.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# A long case is ``pytest.param(..., marks=pytest.mark.bench_long)`` in its test module.


def pytest_addoption(parser):
    parser.addoption("--bench-long", action="store_true", default=False,
                     help="also run the long benchmark shapes (tens of minutes on a CPU); "
                          "default: small shapes only")


def pytest_configure(config):
    config.addinivalue_line("markers", "bench_long: a long benchmark shape, run only with --bench-long")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--bench-long"):
        return
    skip = pytest.mark.skip(reason="long shape: run with --bench-long")
    for item in items:
        if "bench_long" in item.keywords:
            item.add_marker(skip)


def pytest_terminal_summary(terminalreporter):
    session = getattr(terminalreporter.config, "_benchmarksession", None)
    benches = getattr(session, "benchmarks", None) if session else None
    if not benches:
        return
    from report import markdown_table, rollout_table, train_table, update_table

    rows = [dict(name=b.name, median=b.stats.median, extra_info=dict(b.extra_info)) for b in benches]
    terminalreporter.write_line("")
    terminalreporter.write_line(markdown_table(rows))
    for table in (train_table(rows), update_table(rows), rollout_table(rows)):
        if table:
            terminalreporter.write_line("")
            terminalreporter.write_line(table)
