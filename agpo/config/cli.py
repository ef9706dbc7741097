"""The command line of ``python -m agpo.train``: one flag per config field, built from the
sections' dataclasses (``agpo.config.sections``), a YAML file under ``--config``, and
one-line errors that name the flag meant (including TRL's and verl's names for ours).

Every field is a flag with the field name in kebab case (``group_size`` ->
``--group-size``; booleans get ``--x/--no-x``); the names are unique across sections so
no flag needs a prefix. Flags given on the command line override the YAML file. ``--algo
grpo`` switches both controllers off (plain GRPO, no probe); ``--adaptive-clip`` /
``--adaptive-temp`` given explicitly win over ``--algo``, which gives the paper's
ablations (either controller alone).
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import re
import threading
import types
import typing
from dataclasses import fields

from agpo.algo.controllers import CLIP_INPUTS, ENTROPY_TEMPERATURES
from agpo.algo.recipes import RECIPES
from agpo.algo.stats import DISPERSIONS, VOTE_KEYS
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
    TrainConfig,
    load_yaml,
)
from agpo.errors import ConfigError
from agpo.models import DTYPES
from agpo.runtime.guard import REWARD_ERRORS
from agpo.tasks.data import task_options

_CLI_SKIP = {"data": {"split", "limit", "generator_options"}}
CHOICES: dict[tuple[str, str], tuple] = {
    ("model", "dtype"): DTYPES + tuple(DTYPE_ALIASES),
    ("rollout", "engine"): ROLLOUT_ENGINES,
    ("rollout", "vllm_sleep_level"): (0, 1, 2),
    ("rollout", "vllm_head_dtype"): VLLM_HEAD_DTYPES,
    ("optim", "schedule"): SCHEDULES,
    ("loss", "kl_estimator"): KL_ESTIMATORS,
    ("loss", "loss_agg"): LOSS_AGGS,
    ("loss", "impl"): IMPLS,
    ("loss", "score_temperature"): SCORE_TEMPERATURES,
    ("loss", "tis"): TIS_MODES,
    ("controller", "dispersion"): DISPERSIONS,
    ("controller", "vote_keys"): tuple(VOTE_KEYS),
    ("controller", "entropy_temperature"): ENTROPY_TEMPERATURES,
    ("controller", "clip_inputs"): CLIP_INPUTS,
    ("run", "algo"): ALGOS,
    ("run", "recipe"): tuple(RECIPES),
    ("guard", "reward_errors"): REWARD_ERRORS,
}
"""The fixed values of the enumerated fields: argparse ``choices`` of their flags (``--help``
lists them; tests/test_newcomer.py checks every enumerated field is here)."""
_CLI_RENAME = {("data", "path"): "data_path", ("data", "eval_path"): "eval_data_path", ("data", "seed"): "data_seed",
               ("data", "size"): "train_size", ("rollout", "engine"): "rollout"}


def _flag_name(section: str, name: str) -> str:
    return _CLI_RENAME.get((section, name), name)


def _resolve(kind, name: str):
    hints = typing.get_type_hints(kind)
    tp = hints[name]
    optional = False
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        optional = len(args) < len(typing.get_args(tp))
        tp = args[0]
    return tp, optional


_DOCS: dict[type, dict[str, str]] = {}
_DOCS_LOCK = threading.Lock()


def _docs(kind) -> dict[str, str]:
    """Field docstrings (the string literal after each field) for ``--help``, read once per
    class. Under a lock: ``inspect.getsource`` parses the module, and CPython 3.11's parser
    can fail with "AST constructor recursion depth mismatch" when two threads parse at once
    (cpython#106905), as ``scripts/evidence.py run`` builds configs from its worker threads."""
    with _DOCS_LOCK:
        if kind not in _DOCS:
            _DOCS[kind] = _read_docs(kind)
        return dict(_DOCS[kind])


def _read_docs(kind) -> dict[str, str]:
    import ast
    import inspect
    import textwrap

    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(kind)))
    except (OSError, TypeError):
        return {}
    body = tree.body[0].body
    out = {}
    for a, b in zip(body, body[1:]):
        if isinstance(a, ast.AnnAssign) and isinstance(b, ast.Expr) and isinstance(getattr(b, "value", None),
                                                                                    ast.Constant):
            out[a.target.id] = str(b.value.value)
    return out


def _none_or(tp):
    def parse(s: str):
        if s.lower() in ("none", "null", ""):
            return None
        return tp(s)
    parse.__name__ = tp.__name__
    return parse


FLAG_HINTS = {
    "--num-generations": "--group-size", "--rollout-n": "--group-size", "--n": "--group-size",
    "--num-iterations": "--update-epochs", "--ppo-epochs": "--update-epochs",
    "--max-completion-length": "--max-new-tokens", "--max-response-length": "--max-new-tokens",
    "--temperature": "--tau-base", "--epsilon": "--eps-base", "--clip-ratio-low": "--eps-base",
    "--clip-ratio": "--eps-base", "--epsilon-high": "--eps-high-offset (eps_high = eps + offset)",
    "--clip-ratio-high": "--eps-high-offset (eps_high = eps + offset)", "--learning-rate": "--lr",
    "--output-dir": "--out-dir", "--save-steps": "--save-every", "--eval-steps": "--eval-every",
    "--max-steps": "--steps", "--loss-type": "--loss-agg", "--loss-agg-mode": "--loss-agg",
    "--model-name-or-path": "--model", "--kl-coef": "--beta", "--seed-data": "--data-seed",
}
"""TRL / verl names of agpo.train's flags, for the error of an unknown flag."""
_NUMBER = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors that suggest the flag meant, and ``--lr -1e-5`` read as a
    number. ``raising``: a bad command line raises ``ConfigError`` (``config_from_args``: exit
    status 2 through ``agpo.train.main``, like every other config error) instead of exiting."""

    raising = False

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self._negative_number_matcher = _NUMBER  # argparse's own misses exponents (-1e-5)

    def error(self, message: str):
        hints = []
        if "unrecognized arguments:" in message:
            known = [s for a in self._actions for s in a.option_strings]
            for tok in message.split("unrecognized arguments:", 1)[1].split():
                flag = tok.split("=", 1)[0]
                if flag in FLAG_HINTS:
                    hints.append(f"{flag} is {FLAG_HINTS[flag]} here")
                elif flag.startswith("--"):
                    close = difflib.get_close_matches(flag, known, n=1, cutoff=0.75)
                    if close:
                        hints.append(f"did you mean {close[0]}?")
                elif tok.lower() in ("true", "false", "yes", "no", "on", "off"):
                    hints.append("switches take no value: --x turns one on, --no-x off")
        hint = f" ({'; '.join(hints)})" if hints else ""
        text = f"{message}{hint}; {self.prog} --help lists every flag"
        if self.raising:
            raise ConfigError(text)
        self.exit(2, f"{self.prog}: error: {text}\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m agpo.train", description=(
        "AGPO / GRPO training. With no arguments: the tiny preset on the embedded a+b= task, a short "
        "supervised warm-up, then AGPO; prints held-out accuracy before and after RL."),
        argument_default=argparse.SUPPRESS)
    p.add_argument("--config", help="YAML file with sections " + ", ".join(SECTIONS) + "; flags override it")
    p.add_argument("--task-option", action="append", dest="data.generator_options", metavar="KEY=VALUE",
                   help="reasoning-gym generator option of the task, repeatable (e.g. --task-option max_terms=2); "
                        "values read as JSON")
    seen: dict[str, str] = {}
    for section, kind in SECTIONS.items():
        group = p.add_argument_group(section)
        docs = _docs(kind)
        for f in fields(kind):
            if f.name in _CLI_SKIP.get(section, ()):
                continue
            name = _flag_name(section, f.name)
            assert name not in seen, f"flag --{name} in both {seen[name]} and {section}"
            seen[name] = section
            flag = "--" + name.replace("_", "-")
            tp, optional = _resolve(kind, f.name)
            helptext = docs.get(f.name, "").replace("%", "%%")  # argparse formats help with %
            default = f.default if f.default is not dataclasses.MISSING else None
            if tp is bool:
                group.add_argument(flag, dest=f"{section}.{f.name}", action=argparse.BooleanOptionalAction,
                                   help=f"{helptext} (default {default})")
            else:
                choices = CHOICES.get((section, f.name))
                kw = dict(metavar=tp.__name__.upper())
                if choices is not None:  # None stays accepted for optional fields ("none")
                    shown = [c for c in choices if c not in DTYPE_ALIASES]  # aliases accepted, not listed
                    kw = dict(choices=(*choices, None) if optional else choices,
                              metavar="{" + ",".join(map(str, shown + (["none"] if optional else []))) + "}")
                group.add_argument(flag, dest=f"{section}.{f.name}", type=_none_or(tp) if optional else tp,
                                   help=f"{helptext} (default {default})", **kw)
    return p


def config_from_args(argv: list[str] | None = None) -> TrainConfig:
    """Parse the command line (and ``--config``) into a validated ``TrainConfig``."""
    parser = build_parser()
    parser.raising = True
    ns = vars(parser.parse_args(argv))
    base = load_yaml(ns.pop("config")) if "config" in ns else {}
    base = {k: dict(v or {}) for k, v in base.items()} if isinstance(base, dict) else base
    if "data.generator_options" in ns:
        try:
            options = task_options(ns["data.generator_options"])
        except ValueError as e:
            raise ConfigError(str(e)) from None
        ns["data.generator_options"] = {**((base.get("data") or {}).get("generator_options") or {}), **options}
    for key, value in ns.items():
        section, name = key.split(".", 1)
        base.setdefault(section, {})[name] = value
    # --algo grpo switches the controllers off unless they were set explicitly
    algo = (base.get("run") or {}).get("algo", "agpo")
    ctl = base.setdefault("controller", {})
    if algo == "grpo":
        ctl.setdefault("adaptive_clip", False)
        ctl.setdefault("adaptive_temp", False)
    return TrainConfig.from_dict(base)
