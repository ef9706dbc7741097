"""Run configuration: keyword-only dataclasses, a YAML file and the command line.

``TrainConfig`` holds one section per concern (model, data, rollout, optim, loss,
controller, warmup, run, guard). ``--config file.yaml`` loads a nested mapping
(``{optim: {lr: 1e-4}, rollout: {group_size: 8}}``) and flags given on the command line
override it.

- ``sections``: the sections' dataclasses (defaults, per-field docstrings,
  checks) and ``TrainConfig`` with its YAML round trip;
- ``cli``: the flags of ``python -m agpo.train`` built from those fields, their
  choices, and the one-line errors of a bad command line.

Import from here (``agpo.config``); the two modules are where a reader finds the parts.
"""

from agpo.config.cli import CHOICES, FLAG_HINTS, build_parser, config_from_args
from agpo.config.sections import (
    ALGOS,
    DTYPE_ALIASES,
    IMPLS,
    KL_ESTIMATORS,
    LOSS_AGGS,
    ROLLOUT_ENGINES,
    SCHEDULES,
    SCORE_TEMPERATURES,
    SECTIONS,
    TIS_MODES,
    VLLM_HEAD_DTYPES,
    LossConfig,
    ModelConfig,
    OptimConfig,
    RolloutConfig,
    RunConfig,
    TrainConfig,
    WarmupConfig,
    load_yaml,
)
from agpo.errors import ConfigError

__all__ = ["ALGOS", "CHOICES", "DTYPE_ALIASES", "FLAG_HINTS", "IMPLS", "KL_ESTIMATORS", "LOSS_AGGS",
           "ROLLOUT_ENGINES", "SCHEDULES", "SCORE_TEMPERATURES", "SECTIONS", "TIS_MODES", "VLLM_HEAD_DTYPES",
           "ConfigError", "LossConfig", "ModelConfig", "OptimConfig", "RolloutConfig", "RunConfig", "TrainConfig",
           "WarmupConfig", "build_parser", "config_from_args", "load_yaml"]
