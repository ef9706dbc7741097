"""The suite tells a user which dependency versions it was last run green with."""

import importlib.metadata

import conftest


def test_newer_dependencies_are_named(monkeypatch):
    real = importlib.metadata.version
    fake = {"transformers": "9.1.0.dev0", "trl": conftest.TESTED_WITH["trl"], "torch": "2.1.0+cu121"}
    monkeypatch.setattr(importlib.metadata, "version", lambda d: fake[d] if d in fake else real(d))
    lines = conftest.untested_versions()
    assert any(line.startswith("transformers 9.1.0.dev0 is newer than " + conftest.TESTED_WITH["transformers"])
               for line in lines), lines
    assert not any(line.startswith(("trl ", "torch ")) for line in lines)  # same and older: silent


def test_release_numbers():
    assert conftest._release("2.13.0+cpu") == (2, 13, 0)
    assert conftest._release("5.24.0") > conftest._release("5.9.1")
    assert conftest._release("3.10.0rc1") == (3, 10, 0)
    assert conftest._release("1.16.0.post1") == (1, 16, 0)


def test_readme_names_the_same_versions():
    """README.md's "last run green" paragraph and ``TESTED_WITH`` are kept in step by hand."""
    import re
    from pathlib import Path

    text = " ".join((Path(__file__).resolve().parents[1] / "README.md").read_text().split())
    para = text[text.index("The suite was last run green"):]
    para = para[:para.index("UntestedVersionWarning")]
    for dist, version in conftest.TESTED_WITH.items():
        assert re.search(rf"\b{re.escape(dist)} {re.escape(version)}\b", para), (dist, version, para)
