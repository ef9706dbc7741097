"""``Problem``: one task instance with a verifiable reference answer.

Every source of ``agpo.tasks`` (files, packages, generators) produces these; the learner
and the evaluation read them. Imports nothing of the package.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(kw_only=True, frozen=True)
class Problem:
    """One task instance."""

    prompt: str
    """The question as a user would ask it (no template, no instruction)."""
    reference: str
    """The reference final answer (bare: "72", "\\frac{3}{4}")."""
    id: str
    """Stable identifier (file:line, dataset index or generator split/index)."""
    source: str
    """Where it came from ("gsm8k", "arith", "chain_sum", a file name...)."""
    verbatim: bool = False
    """Feed ``prompt`` to the model as is: no chat template, no instruction."""
