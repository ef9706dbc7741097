"""Test setup: Triton runs in its CPU interpreter when no GPU is present, and the suite
says which versions of its main dependencies it was last run green with.

TRITON_INTERPRET must be set before triton is first imported, hence here.
"""

import importlib.metadata
import os
import random
import re
import warnings
import zlib

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

TESTED_WITH = {"torch": "2.13.0", "transformers": "5.25.0", "trl": "1.16.0", "triton": "3.9.0",
               "peft": "0.21.2", "liger-kernel": "0.8.5"}
"""Versions the whole suite last passed with (natively on avx2; the files .ci/run names as
numeric again under ATEN_CPU_CAPABILITY=default with OMP_NUM_THREADS=1; README.md says the
same). Keep in step with the README."""


class UntestedVersionWarning(UserWarning):
    """An installed dependency is newer than the suite was last run green with."""


def _release(version: str) -> tuple:
    """``2.13.0+cpu`` -> ``(2, 13, 0)``: the release numbers, local and pre-release tags dropped."""
    out = []
    for part in version.split("+")[0].split("."):
        digits = re.match(r"\d*", part).group()
        if not digits:
            break
        out.append(int(digits))
        if digits != part:  # "0rc1", "0a2": the pre-release tag ends the release numbers
            break
    return tuple(out)


def untested_versions() -> list[str]:
    """One line per installed dependency newer than ``TESTED_WITH``."""
    lines = []
    for dist, tested in TESTED_WITH.items():
        try:
            have = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
        if _release(have) > _release(tested):
            lines.append(f"{dist} {have} is newer than {tested}, the version this suite was last run green with; "
                         f"a failure may come from the newer {dist} (pip install '{dist}=={tested}' to compare)")
    return lines


def pytest_report_header(config):
    return "agpo suite last run green with: " + ", ".join(f"{k} {v}" for k, v in TESTED_WITH.items())


def pytest_configure(config):
    for line in untested_versions():
        config.issue_config_time_warning(UntestedVersionWarning(line), stacklevel=2)


warnings.simplefilter("default", UntestedVersionWarning)


@pytest.fixture(autouse=True)
def _fixed_seed(request):
    """Every test draws its random inputs from a seed of its own, fixed by its name: the
    global torch and ``random`` generators are seeded before it runs, so a failure
    reproduces on rerun (no test depends on an unseeded draw)."""
    seed = zlib.crc32(request.node.nodeid.split("::", 1)[-1].encode())
    torch.manual_seed(seed)
    random.seed(seed)


@pytest.fixture(scope="session")
def warm():
    """A tiny model after a short warm-up (some rewards are non-zero) and its problems, built
    once for the session: tests that train take a ``copy.deepcopy`` of the model."""
    from agpo.learn.policy import Policy
    from agpo.learn.sft import supervised_warmup
    from agpo.models import load_model_and_tokenizer
    from agpo.tasks.data import load_problems

    torch.manual_seed(0)
    model, tok = load_model_and_tokenizer("tiny", seed=0)
    train = load_problems(dataset="arith", split="train")
    supervised_warmup(Policy(model), tok, train, steps=120, batch_size=64, lr=2e-3, progress=False)
    return model, tok, train
