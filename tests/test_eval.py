"""``python -m agpo.eval`` end to end on the tiny preset, ``evaluate`` with several samples,
majority voting, and bad input."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from agpo.eval import main
from agpo.models import load_model_and_tokenizer
from agpo.tasks.data import Problem, load_problems, task_options
from agpo.tasks.evaluate import default_max_new_tokens, evaluate, majority

ROOT = Path(__file__).resolve().parents[1]
FIX = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="module")
def tiny():
    return load_model_and_tokenizer("tiny")


def test_eval_command_end_to_end(tmp_path):
    out = tmp_path / "ev"
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-m", "agpo.eval", "--model", "tiny", "--dataset", "arith", "--limit", "12",
                           "--batch-size", "5", "--out", str(out)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert json.loads(proc.stdout) == summary
    assert summary["model"] == "tiny" and summary["n"] == 12 and summary["temperature"] == 0.0
    assert summary["accuracy"] == summary["pass@1"] and 0.0 <= summary["pass@1"] <= 1.0
    assert summary["max_new_tokens"] == 5 and summary["verifier"]["failures"] == 0
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 12
    want = {p.id: p for p in load_problems(dataset="arith", limit=12)}
    assert [r["id"] for r in rows] == list(want)  # input order, though batches are sorted by length
    for r in rows:
        assert {"prompt", "completion", "answer", "reference", "correct"} <= set(r)
        assert r["prompt"] == want[r["id"]].prompt and r["reference"] == want[r["id"]].reference
        assert isinstance(r["correct"], bool) and 1 <= r["tokens"] <= 5
    assert "eval" in proc.stderr  # the progress bar


def test_evaluate_with_samples(tiny):
    model, tok = tiny
    model.train()
    probs = load_problems(dataset="arith", limit=6)
    res = evaluate(model, tok, probs, samples=3, temperature=1.0, batch_size=4, progress=False, seed=5)
    assert model.training  # mode restored
    model.eval()
    s = res["summary"]
    assert {"mean@3", "maj@3", "pass@3", "accuracy", "no_answer_rate"} <= set(s) and "pass@1" not in s
    assert s["accuracy"] == s["mean@3"] and s["mean@3"] <= s["pass@3"] and s["maj@3"] <= s["pass@3"]
    for r in res["records"]:
        assert len(r["samples"]) == 3 and r["completion"] == r["samples"][0]["completion"]
        assert r["maj_correct"] in (True, False)
    again = evaluate(model, tok, probs, samples=3, temperature=1.0, batch_size=4, progress=False, seed=5)
    assert [r["samples"] for r in again["records"]] == [r["samples"] for r in res["records"]]
    with pytest.raises(ValueError, match="--temperature > 0"):
        evaluate(model, tok, probs, samples=2, temperature=0.0, progress=False)
    with pytest.raises(ValueError, match="no problems"):
        evaluate(model, tok, [], progress=False)


def test_evaluate_on_a_gsm8k_file_uses_the_plain_template(tiny):
    model, tok = tiny
    probs = load_problems(dataset="gsm8k", path=str(FIX / "gsm8k_sample.jsonl"))
    res = evaluate(model, tok, probs, max_new_tokens=4, progress=False)
    assert res["summary"]["n"] == 3 and res["summary"]["pass@1"] == 0.0
    assert all(r["prompt"].startswith("Question: ") and r["prompt"].endswith("Answer:") for r in res["records"])


def test_majority_vote():
    assert majority(["4", "5", "5", "4"], [True] * 4) == 0  # tie: the earliest
    assert majority(["x", "5", "5"], [False, True, True]) == 1
    assert majority(["a", "b"], [False, False]) is None


def test_task_options():
    assert task_options(["max_terms=2", "allow_negation=true", "name=x y"]) == {
        "max_terms": 2, "allow_negation": True, "name": "x y"}


def test_default_max_new_tokens(tiny):
    _, tok = tiny
    assert default_max_new_tokens("tiny", tok) == 5 and default_max_new_tokens("qwen7b", tok) == 1024
    assert default_max_new_tokens("/some/checkpoint", tok) == 5  # a char-vocabulary checkpoint


@pytest.mark.parametrize("args,match", [
    (["--dataset", "gsm8k", "--data-path", "{tmp}/missing.jsonl"], "missing.jsonl: no such data file"),
    (["--dataset", "gsm8k", "--data-path", "{tmp}/bad.jsonl"], "bad.jsonl:2: not valid JSON"),
    (["--dataset", "gsm8k", "--data-path", "{tmp}/empty.jsonl"], "empty.jsonl: contains no problems"),
    (["--dataset", "arith", "--limit", "0"], "--limit 0"),
    (["--dataset", "arith", "--samples", "2", "--temperature", "0"], "--temperature > 0"),
    (["--dataset", "arith", "--task-option", "max_terms"], "expected KEY=VALUE"),
])
def test_bad_input_is_one_clear_error(tmp_path, capsys, args, match):
    (tmp_path / "bad.jsonl").write_text('{"question": "q", "answer": "#### 1"}\n{"question": \n')
    (tmp_path / "empty.jsonl").write_text("")
    rc = main(["--model", "tiny", "--no-progress", "--out", str(tmp_path / "o")]
              + [a.format(tmp=tmp_path) for a in args])
    assert rc == 2
    err = capsys.readouterr().err
    assert err.startswith("agpo.eval: error:") and match in err and "Traceback" not in err


def test_missing_model_is_one_clear_error(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["--model", str(tmp_path / "no-model"), "--dataset", "arith", "--limit", "1"]) == 2
    assert "no such file or folder" in capsys.readouterr().err


def test_verbatim_problems_skip_templates(tiny):
    model, tok = tiny
    p = Problem(prompt="1+1=", reference="2", id="x", source="arith", verbatim=True)
    res = evaluate(model, tok, [p], progress=False)
    assert res["records"][0]["prompt"] == "1+1="
