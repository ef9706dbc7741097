"""Regenerate docs/scale.md's memory tables: every ``<!-- plan: FLAGS -->`` ... ``<!-- /plan -->``
block becomes ``python -m agpo.plan FLAGS --markdown`` for 80 GiB GPUs (tests/test_memory_plan.py
fails when a block and the planner disagree).

    python scripts/doc_plans.py [docs/scale.md]
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
BLOCK = re.compile(r"<!-- plan: (?P<args>[^>]*?) -->\n(?P<body>.*?)<!-- /plan -->", re.DOTALL)


def render(args: str) -> str:
    from agpo.config import config_from_args
    from agpo.plan import plan_of
    from agpo.scale.sizing import table

    argv = args.split()
    nproc = 1
    if "--nproc-per-node" in argv:
        i = argv.index("--nproc-per-node")
        nproc = int(argv[i + 1])
        argv = argv[:i] + argv[i + 2:]
    return table(plan_of(config_from_args(argv), nproc=nproc, gib=80), markdown=True)


def main(path: str = str(ROOT / "docs" / "scale.md")) -> None:
    p = Path(path)
    text = BLOCK.sub(lambda m: f"<!-- plan: {m['args']} -->\n{render(m['args'])}\n<!-- /plan -->", p.read_text())
    p.write_text(text)


if __name__ == "__main__":
    main(*sys.argv[1:])
