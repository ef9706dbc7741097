"""The evidence runs' shared warm-up (``scripts/evidence.py run``): each seed warms up once
and every arm of it starts from that model; and what warm-up a finished run started from.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path

import yaml

WARM_SECTIONS = ("model", "data", "warmup")
"""The config sections the warm-up depends on (with the seed): runs that agree on them share it."""
_warm_locks: dict[Path, threading.Lock] = defaultdict(threading.Lock)


def _resolved(args: list[str]) -> dict:
    """The config ``agpo.train`` would run with ``args``, every default the preset fills in filled."""
    from agpo.config import config_from_args
    from agpo.learn.launch import resolve_defaults

    return resolve_defaults(config_from_args(args)).to_dict()


def train(args: list[str], d: Path) -> int:
    """One ``agpo.train`` run in ``d`` on one thread, its output in ``d``'s log; its exit status."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    with open(d.parent / f"{d.name}.log", "w") as f:
        return subprocess.call([sys.executable, "-m", "agpo.train", *args, "--out-dir", str(d)], stdout=f,
                               stderr=subprocess.STDOUT, env=env)


def warm_start(warmups: Path, args: list[str], log) -> list[str] | None:
    """The ``agpo.train`` flags of the run ``args`` started from its seed's shared warm-up
    (None: the run has no warm-up). The warm-up depends on the seed and on ``WARM_SECTIONS``,
    not on the arm: it runs once, as a one-step run in ``WARMUPS/KEY-sSEED``, and every
    arm loads the ``reference/`` that run saved (its weights after the warm-up, before RL)
    through a ``--config`` of the arm's own resolved settings with the warm-up off. The RL part
    then sees what it would have after warming up itself: the same weights, problems and noise
    streams (``tests/test_evidence.py`` compares the two runs' metrics)."""
    cfg = _resolved(args)
    if not cfg["warmup"]["sft_steps"]:
        return None
    seed = cfg["run"]["seed"]
    key = json.dumps({k: cfg[k] for k in WARM_SECTIONS}, sort_keys=True)
    w = warmups / f"{hashlib.sha1(key.encode()).hexdigest()[:10]}-s{seed}"
    with _warm_locks[w]:
        if not (w / "reference" / "config.json").is_file() or not (w / "summary.json").is_file():
            w.mkdir(parents=True, exist_ok=True)
            t0 = time.time()
            rc = train([*args, "--steps", "1", "--eval-size", "0", "--save-every", "0"], w)
            log(f"warm-up of seed {seed}: exit {rc} in {time.time() - t0:.0f} s")
            if rc:
                raise SystemExit(f"the warm-up of seed {seed} failed (exit {rc}); see {w}.log")
    cfg["model"]["model"] = str(w / "reference")
    cfg["warmup"]["sft_steps"] = 0
    cfg["run"].pop("out_dir", None)
    return ["--config", _write_yaml(warmups / "configs", cfg)]


def _write_yaml(folder: Path, cfg: dict) -> str:
    """``cfg`` as a YAML file in ``folder`` named by its content; the path."""
    text = yaml.safe_dump(cfg, sort_keys=True)
    path = folder / f"{hashlib.sha1(text.encode()).hexdigest()[:12]}.yaml"
    folder.mkdir(parents=True, exist_ok=True)
    if not path.is_file():
        path.write_text(text)
    return str(path)


def warmup_of(d: Path, config: dict) -> dict | None:
    """The outcome of the warm-up the run in ``d`` started from (``sft/steps``, ``sft/window_loss``,
    ...): its own, or that of the shared warm-up whose ``reference/`` it loaded (``warm_start``)."""
    start = Path(str((config.get("model") or {}).get("model", "")))
    for run in (d, start.parent) if start.name == "reference" else (d,):
        for line in open(run / "events.jsonl") if (run / "events.jsonl").is_file() else ():
            event = json.loads(line)
            if event.get("event") == "warmup":
                return {k: v for k, v in event.items() if k != "event"}
    return None
