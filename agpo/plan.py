"""``python -m agpo.plan``: the memory plan of a run, per GPU and per phase, without weights.

    python -m agpo.plan --model DIR_OR_PRESET --nproc-per-node 8 [--nnodes N] [--gpu-memory-gib 80]
                        [--markdown] [any agpo.train flag]

``DIR`` may hold only a config.json; the presets need nothing on disk (their shapes are in
``agpo.models.PRESET_CONFIGS``). The run is planned as ``agpo.train`` would run it under
``torchrun --nnodes N --nproc-per-node K`` (one process on one GPU: plain ``python``) on GPUs of
``--gpu-memory-gib`` (default: the visible GPU's, else 80): the rollout and update phases'
tables, the KV cache in tokens against what the rollout needs, the settings left unset and
what the plan derives for them (``agpo.scale.memory``, ``agpo.scale.sizing``; ``agpo.train`` derives the same and
records them in config.yaml), and whether it fits, with the flag to change when it does not.
Exits 0 after printing the plan, whether it fits or not; 2 on a bad flag or config.json.
"""

from __future__ import annotations

import argparse
import sys

from agpo.config import build_parser, config_from_args
from agpo.errors import EXIT_OK, EXIT_USAGE, UsageError


def _plan_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("plan (python -m agpo.plan only)")
    g.add_argument("--nproc-per-node", "--nproc_per_node", dest="plan.nproc", type=int, default=1, metavar="K",
                   help="GPUs (ranks) per node, as torchrun's flag (default 1)")
    g.add_argument("--nnodes", dest="plan.nnodes", type=int, default=1, metavar="N",
                   help="nodes, as torchrun's flag (default 1)")
    g.add_argument("--gpu-memory-gib", dest="plan.gib", type=float, default=None, metavar="GIB",
                   help="memory of one GPU in GiB (default: the visible GPU's, else 80)")
    g.add_argument("--markdown", dest="plan.markdown", action="store_true", default=False,
                   help="print the tables as Markdown (docs/scale.md's are made so)")


def parser() -> argparse.ArgumentParser:
    p = build_parser()
    p.prog = "python -m agpo.plan"
    p.description = __doc__.split("\n\n")[0].split(": ", 1)[1] + " Flags: those of python -m agpo.train, plus:"
    _plan_flags(p)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ns = vars(parser().parse_args(argv))  # --help, and every flag checked once
    only = argparse.ArgumentParser(add_help=False, argument_default=argparse.SUPPRESS)
    _plan_flags(only)
    _, rest = only.parse_known_args(argv)
    nproc, nnodes, gib = ns["plan.nproc"], ns["plan.nnodes"], ns["plan.gib"]
    try:
        if nproc < 1 or nnodes < 1 or (gib is not None and not gib > 0):
            raise UsageError(f"--nproc-per-node {nproc} / --nnodes {nnodes} / --gpu-memory-gib {gib}: must be > 0")
        cfg = config_from_args(rest)
        plan = plan_of(cfg, nproc=nproc, nnodes=nnodes, gib=gib)
    except UsageError as e:
        print(f"agpo.plan: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    if plan is None:
        print(f"agpo.plan: error: no config.json for --model {cfg.model.model} (not a folder holding one, not a "
              "preset, not in the Hugging Face cache)", file=sys.stderr)
        return EXIT_USAGE
    from agpo.scale.sizing import table

    print(table(plan, markdown=ns["plan.markdown"]))
    return EXIT_OK


def plan_of(cfg, *, nproc: int = 1, nnodes: int = 1, gib: float | None = None):
    """The plan ``agpo.train`` would make for ``cfg`` on ``nnodes`` x ``nproc`` GPUs (``cfg`` gets
    the derived settings); None without a config.json."""
    from agpo.models import PRESETS
    from agpo.rollout import resolve_engine
    from agpo.scale.sizing import resolve

    preset = PRESETS.get(cfg.model.model)
    if cfg.rollout.max_new_tokens is None:
        cfg.rollout.max_new_tokens = preset.max_new_tokens if preset else 512
    if cfg.model.device in ("auto", "cpu"):
        cfg.model.device = "cuda"
    cfg.rollout.engine = resolve_engine(cfg.rollout.engine, "cuda")
    world = nproc * nnodes
    return resolve(cfg, world=world, nproc_per_node=nproc, sharded=world > 1, device_gib=gib, on_gpu=True)


if __name__ == "__main__":
    sys.exit(main())
