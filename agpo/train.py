"""``python -m agpo.train``: AGPO (or GRPO) fine-tuning of a Hugging Face causal LM.

With no arguments: the tiny preset on the embedded ``a+b=`` task, a supervised warm-up,
held-out accuracy, AGPO, held-out accuracy again; a few minutes on a 2-core CPU. Flags
and ``--config`` are described in ``agpo.config`` (``--help`` lists them); the step in
``agpo.learn.trainer``; checkpoints in ``agpo.runtime.checkpoint``. The run directory gets
``config.yaml``, ``metrics.jsonl`` (one line per step), ``events.jsonl`` (evaluations),
``checkpoints/step-*/``, ``final/`` (a plain HF model) and ``summary.json``;
``python -m agpo.plot RUN_DIR`` draws it. The run directory is ``--out-dir`` (default
``runs/ALGO``: ``runs/agpo``, ``runs/grpo``); one that holds an earlier run is refused unless
``--resume auto`` continues it or ``--overwrite`` replaces it. Every check that needs no
model (``agpo.learn.preflight``) runs before anything is loaded: a misuse ends with one
line on stderr and exit status 2. Installed as the ``agpo-train`` command too.

Under ``torchrun --nproc_per_node K [--nnodes M ...] -m agpo.train ...`` every rank runs
``run``: FSDP2 shards the policy (``agpo.scale.parallel``), each rank samples its block of the
step's prompts, and rank 0 writes the run directory (docs/scale.md).

SIGTERM / SIGUSR1 finish the current step, checkpoint and exit with status 75
(``agpo.runtime.preempt``); the other exit statuses and faults are in ``agpo.runtime.guard`` and
docs/operations.md.
"""

from __future__ import annotations

import sys

import torch

from agpo.config import config_from_args
from agpo.errors import EXIT_OK, EXIT_PREEMPTED
from agpo.learn.launch import run
from agpo.runtime.guard import exit_status
from agpo.runtime.preempt import ignore_preemption
from agpo.scale.distributed import shutdown_distributed


def main(argv: list[str] | None = None) -> int:
    """The command; returns the exit status (``agpo.runtime.guard.EXIT_*``, docs/operations.md)."""
    cfg, status = None, None
    try:
        cfg = config_from_args(argv)
        summary = run(cfg)
    except Exception as e:
        status = exit_status(e, out_dir=cfg and cfg.run.out_dir, dist_timeout=cfg and cfg.run.dist_timeout)
        if status is None:
            raise
        if torch.distributed.is_initialized():
            ignore_preemption()  # leaving with this status: torchrun's SIGTERM to the survivors must not replace it
    finally:
        shutdown_distributed()  # after exit_status: it asks the process group who failed
    if status is not None:
        print(f"agpo.train: error: {status[1]}", file=sys.stderr)
        return status[0]
    return EXIT_PREEMPTED if "preempted" in summary else EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
