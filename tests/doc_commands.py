"""The agpo command lines the docs show, read from the docs themselves: shared by
tests/test_newcomer.py (every flag on them parses) and tests/test_rehearsal.py (every
training command runs, scaled down).

``logical_lines`` joins backslash continuations; ``AGPO_COMMAND`` finds ``python -m agpo.X``,
``torchrun ... -m agpo.X`` and the console scripts on a line; ``train_commands`` returns the
``agpo.train`` invocations of a Markdown file's fenced code blocks and inline code spans
(or of a YAML file's comments) with their launcher (plain ``python`` or ``torchrun`` and
its flags) kept apart from agpo's own arguments.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

AGPO_COMMAND = re.compile(r"(?:^|\s)(?:python3?\s+(?:-\S+\s+)*-m\s+|torchrun\s.*?-m\s+)"
                          r"(agpo\.train|agpo\.eval|agpo\.plot|agpo\.plan|agpo_kernels\.compile_report)(?=\s|$)"
                          r"|(?:^|\s)(agpo-train|agpo-eval|agpo-plot)(?=\s|$)")
"""An agpo command on a line: group 1 the module run with ``-m``, group 2 a console script."""


def logical_lines(text: str) -> list[str]:
    """Lines with backslash continuations joined."""
    text = re.sub(r"\\\n\s*", " ", text)
    return text.splitlines()


def fenced_blocks(text: str) -> list[str]:
    """The contents of a Markdown file's fenced code blocks (```` ``` ```` or ``~~~``)."""
    return [m.group(2) for m in re.finditer(r"^(```|~~~)[^\n]*\n(.*?)^\1[ \t]*$", text, re.M | re.S)]


def inline_spans(text: str) -> list[str]:
    """Inline code spans of a Markdown file's prose (fenced blocks left out)."""
    prose = re.sub(r"^(```|~~~)[^\n]*\n.*?^\1[ \t]*$", "", text, flags=re.M | re.S)
    return re.findall(r"`([^`\n]+)`", re.sub(r"\n(?!\n)", " ", prose))


@dataclass(frozen=True)
class DocCommand:
    """One documented ``agpo.train`` invocation."""

    file: str
    """Where it is written, relative to the repository root."""
    where: str
    """``fenced`` (a code block), ``inline`` (a code span in the prose) or ``comment`` (a YAML header)."""
    text: str
    """The command as written (continuations joined, comment cut)."""
    launcher: tuple[str, ...]
    """``()`` for ``python -m agpo.train`` / ``agpo-train``; torchrun's flags otherwise (``torchrun`` first)."""
    args: tuple[str, ...]
    """agpo.train's own arguments."""

    @property
    def torchrun(self) -> bool:
        return bool(self.launcher)


def _split(span: str) -> list[str]:
    try:
        return shlex.split(span, comments=True)
    except ValueError:
        return span.split("#", 1)[0].split()


def parse_train_command(span: str) -> tuple[tuple[str, ...], tuple[str, ...]] | None:
    """``(launcher, args)`` of a shell fragment that runs agpo.train, else None."""
    tokens = _split(span)
    while tokens and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=\S*", tokens[0]):  # VAR=value before the command
        tokens.pop(0)
    if not tokens:
        return None
    if tokens[0] == "agpo-train":
        return (), tuple(tokens[1:])
    for i in range(len(tokens) - 1):
        if tokens[i] == "-m" and tokens[i + 1] == "agpo.train":
            head = tokens[:i]
            if head and head[0] == "torchrun":
                return tuple(head), tuple(tokens[i + 2:])
            if head and re.fullmatch(r"(\S*/)?python3?(\.\d+)?", head[0]):
                return (), tuple(tokens[i + 2:])
            return None
    return None


def _commands_in(lines, file: str, where: str) -> list[DocCommand]:
    out = []
    for line in lines:
        for span in re.split(r"&&|;|\|\|?", line):
            span = span.strip()
            parsed = parse_train_command(span)
            if parsed is not None:
                text = span.split(" #", 1)[0].strip()
                out.append(DocCommand(file, where, text, *parsed))
    return out


def train_commands(path: Path) -> list[DocCommand]:
    """The ``agpo.train`` commands ``path`` documents: in a Markdown file those of its fenced
    code blocks, then those of its inline code spans; in a YAML file those of its comments."""
    text = path.read_text()
    rel = str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)
    if path.suffix in (".yaml", ".yml"):
        comments = [line.lstrip()[1:] for line in text.splitlines() if line.lstrip().startswith("#")]
        return _commands_in(logical_lines("\n".join(comments)), rel, "comment")
    out = []
    for block in fenced_blocks(text):
        out += _commands_in(logical_lines(block), rel, "fenced")
    out += _commands_in(inline_spans(text), rel, "inline")
    return out
