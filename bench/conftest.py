"""pytest-benchmark setup: device, and a comparison table printed at the end."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


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
