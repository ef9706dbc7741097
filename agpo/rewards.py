"""Verifiable rewards: final-answer extraction, normalisation, equivalence, reward functions.

One implementation of "the final answer of a text" serves the rewards, the evaluation and
the controllers' vote entropy (SPEC section 1, step 1):

- ``extract_answer(text)``: the last ``\\boxed{...}`` (nested braces allowed), else the
  text after the last ``####``, else the last number; None when there is none of these.
- ``normalize_answer(ans)``: a canonical string so equivalent spellings compare equal
  ("1,000" and "1000"; "0.5", "1/2" and "\\frac{1}{2}"; "$18." and "18"; "50\\%" and "50";
  "\\left( 1, 2 \\right)" and "(1, 2)"); plain numbers become exact fractions ("-7/2").
- ``answer_key(text)``: normalised final answer, else the whitespace-normalised
  lower-cased text; "" for an empty text.

Equivalence (``is_equivalent``): equal keys match; two plain numbers are compared exactly
(no tolerance), two plain words as text; anything else goes to ``math-verify`` (``agpo.verifier``: a worker process
with a deadline, safe in any thread). A verifier failure (timeout, error, not installed)
scores 0 and is counted in ``verifier_stats()``.

Rewards are small pure functions ``(prompt, completion, reference) -> float`` where
``reference`` is the reference final answer (a full GSM8K/MATH solution also works: its
``####`` / ``\\boxed{}`` part is taken). ``load_reward`` resolves ``--reward`` values: a
built-in name (``REWARDS``) or ``module:function`` / ``path/to/file.py:function``.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import re
from collections.abc import Callable
from fractions import Fraction
from pathlib import Path

from agpo.verifier import MathVerifier

RewardFn = Callable[[str, str, str], float]

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:/\d+)?|-?\.\d+")
_TEXT_CMD = re.compile(r"\\(?:text|textbf|textrm|mathrm|mathbf|mbox)\s*\{([^{}]*)\}")
_FRAC = re.compile(r"\\[dt]?frac\s*\{([^{}]*)\}\s*\{([^{}]*)\}")
_FRAC_DIGITS = re.compile(r"\\[dt]?frac\s*(\d)\s*(\d)")  # \frac12
_DEGREES = re.compile(r"\^\s*\{?\\circ\}?|\\degree|°")
_WORDS = re.compile(r"[a-z][a-z ]*")
_VARIABLE_PREFIX = re.compile(r"^[a-zA-Z]\s*=\s*(?=\S)")  # "x = 5"


# -- extraction --------------------------------------------------------------------------
def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (or ``\\fbox{...}``), braces balanced."""
    start = max(text.rfind("\\boxed{"), text.rfind("\\fbox{"))
    if start < 0:
        return None
    i = text.index("{", start) + 1
    depth, j = 1, i
    while j < len(text) and depth:
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        j += 1
    return text[i:j - 1] if depth == 0 else None


def extract_answer(text: str) -> str | None:
    """The raw final answer of a completion, or None when it has none of the markers."""
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed
    if "####" in text:
        tail = text.rsplit("####", 1)[1].strip()
        return tail.splitlines()[0] if tail else ""
    numbers = _NUMBER.findall(text.replace("\u2212", "-"))
    return numbers[-1] if numbers else None


def reference_answer(reference: str) -> str:
    """The final answer inside a reference: a full solution's ``\\boxed{}`` / ``####`` part,
    else the reference itself (already a bare answer), stripped."""
    boxed = last_boxed(reference)
    if boxed is not None:
        return boxed.strip()
    if "####" in reference:
        return reference.rsplit("####", 1)[1].strip()
    return reference.strip()


# -- normalisation -----------------------------------------------------------------------
def _canonical_number(s: str) -> str | None:
    """Exact rational form of a plain number / fraction, else None."""
    s = s.replace(",", "").rstrip(".")
    try:
        if "/" in s:
            num, den = s.split("/")
            value = Fraction(Fraction(num), Fraction(den))
        else:
            value = Fraction(s)
    except (ValueError, ZeroDivisionError):
        return None
    return str(value.numerator) if value.denominator == 1 else f"{value.numerator}/{value.denominator}"


def normalize_answer(ans: str) -> str:
    """Canonical string of an extracted answer (see the module docstring)."""
    s = ans.strip().replace("\u2212", "-").replace("{,}", ",")
    s = _TEXT_CMD.sub(r"\1", s)
    for junk in ("\\left", "\\right", "\\!", "\\,", "\\;", "\\ ", "\\displaystyle"):
        s = s.replace(junk, "")
    s = _DEGREES.sub("", s)
    s = _FRAC_DIGITS.sub(r"(\1)/(\2)", s)
    s = _FRAC.sub(r"(\1)/(\2)", s)
    s = s.replace("\\%", "").replace("%", "").replace("\\$", "").replace("$", "")
    s = re.sub(r"\s+", " ", s).strip().rstrip(".").strip()
    s = _VARIABLE_PREFIX.sub("", s)
    s = re.sub(r"\s*([()\[\]{}])\s*", r"\1", s)
    s = re.sub(r"\s*,\s*", ", ", s)
    compact = s.replace(" ", "")
    plain = re.fullmatch(r"(-?)\(?(-?[\d.,]+)\)?/\(?([\d.,]+)\)?", compact)  # "-(1)/(4)"
    if plain:
        sign, num, den = plain.groups()
        num = num[1:] if sign and num.startswith("-") else sign + num
        compact = f"{num}/{den}"
    number = _canonical_number(compact)
    if number is not None:
        return number
    lead = re.match(r"(-?\d[\d,]*(?:\.\d+)?)\s*[a-zA-Z]", s)  # "18 dollars", "5cm"
    if lead and (n := _canonical_number(lead.group(1))) is not None:
        return n
    return s.lower()


def answer_key(text: str) -> str:
    """Normalised final answer of ``text`` (SPEC's vote-entropy key); "" for empty text."""
    if not text or not text.strip():
        return ""
    raw = extract_answer(text)
    if raw is None:
        return " ".join(text.split()).lower()
    return normalize_answer(raw)


def numeric_value(key: str) -> Fraction | None:
    """The exact value of a normalised key that is a plain number ("-7/2"), else None."""
    if not re.fullmatch(r"-?\d+(?:/\d+)?", key):
        return None
    return Fraction(key)


# -- equivalence -------------------------------------------------------------------------
DEFAULT_VERIFIER = MathVerifier(timeout=5.0)


def verifier_stats(verifier: MathVerifier | None = None) -> dict[str, int]:
    """Counters of the (default) math-verify worker: calls, equal, timeouts, errors,
    unavailable, failures. Log their increase per step: failures scored 0."""
    return (verifier or DEFAULT_VERIFIER).stats.snapshot()


def is_equivalent(pred: str, reference: str, *, verifier: MathVerifier | None = None) -> bool:
    """Whether the bare answer ``pred`` equals the bare answer ``reference``."""
    if not pred.strip() or not reference.strip():
        return False
    pk, rk = normalize_answer(pred), normalize_answer(reference)
    if pk == rk:
        return True
    if numeric_value(pk) is not None and numeric_value(rk) is not None:
        return False  # two exact numbers that differ
    if _WORDS.fullmatch(pk) and _WORDS.fullmatch(rk):
        return False  # plain words ("paris", "b"): math-verify would read them as products of symbols
    return bool((verifier or DEFAULT_VERIFIER).equivalent(reference, pred))


def is_correct(completion: str, reference: str, *, verifier: MathVerifier | None = None) -> bool:
    """Whether the completion's final answer matches the reference's.

    A completion with no marked or numeric answer matches only when its whole normalised
    text equals the reference's key (short free-text answers such as a name)."""
    ref = reference_answer(reference)
    raw = extract_answer(completion)
    if raw is None:
        return bool(completion.strip()) and answer_key(completion) == normalize_answer(ref).lower()
    return is_equivalent(raw, ref, verifier=verifier)


# -- reward functions --------------------------------------------------------------------
def correctness_reward(prompt: str, completion: str, reference: str) -> float:
    """1.0 when the completion's final answer is equivalent to the reference, else 0.0."""
    return 1.0 if is_correct(completion, reference) else 0.0


def format_reward(prompt: str, completion: str, reference: str) -> float:
    """1.0 when the completion marks a final answer (``\\boxed{...}`` or ``#### ...``)."""
    if last_boxed(completion) is not None:
        return 1.0
    return 1.0 if "####" in completion and completion.rsplit("####", 1)[1].strip() else 0.0


def digits_format_reward(prompt: str, completion: str, reference: str) -> float:
    """1.0 when the completion is a bare integer (the embedded arithmetic task's format)."""
    return 1.0 if re.fullmatch(r"-?\d+", completion.strip()) else 0.0


def weighted_reward(*parts: tuple[RewardFn, float]) -> RewardFn:
    """A reward that sums ``weight * fn(...)`` over ``(fn, weight)`` pairs."""
    if not parts:
        raise ValueError("weighted_reward: needs at least one (function, weight) pair")

    def reward(prompt: str, completion: str, reference: str) -> float:
        return float(sum(w * fn(prompt, completion, reference) for fn, w in parts))

    reward.__name__ = "+".join(f"{w:g}*{getattr(fn, '__name__', 'reward')}" for fn, w in parts)
    return reward


def correctness_with_format(prompt: str, completion: str, reference: str) -> float:
    """Correctness plus 0.1 for a marked final answer (at most 1.1)."""
    return correctness_reward(prompt, completion, reference) + 0.1 * format_reward(prompt, completion, reference)


REWARDS: dict[str, RewardFn] = {
    "correct": correctness_reward,
    "format": format_reward,
    "correct+format": correctness_with_format,
    "digits": digits_format_reward,
}
"""Built-in rewards by ``--reward`` name."""


def load_reward(spec: str | RewardFn) -> RewardFn:
    """A reward function from a built-in name, ``module:function`` or ``file.py:function``
    (or a callable, returned as is). Raises ValueError with what was wrong."""
    if callable(spec):
        return spec
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"--reward: expected a name or module:function, got {spec!r}")
    spec = spec.strip()
    if spec in REWARDS:
        return REWARDS[spec]
    if ":" not in spec:
        raise ValueError(f"--reward {spec!r}: not a built-in reward ({', '.join(REWARDS)}) "
                         "and not of the form module:function or path/to/file.py:function")
    target, _, name = spec.rpartition(":")
    if target.endswith(".py"):
        path = Path(target)
        if not path.is_file():
            raise ValueError(f"--reward {spec!r}: file {target} not found")
        mod_spec = importlib.util.spec_from_file_location(f"agpo_user_reward_{path.stem}", path)
        module = importlib.util.module_from_spec(mod_spec)
        try:
            mod_spec.loader.exec_module(module)
        except Exception as e:
            raise ValueError(f"--reward {spec!r}: importing {target} failed: {type(e).__name__}: {e}") from e
    else:
        try:
            module = importlib.import_module(target)
        except ImportError as e:
            raise ValueError(f"--reward {spec!r}: cannot import module {target!r}: {e}") from e
    fn = getattr(module, name, None)
    if not callable(fn):
        raise ValueError(f"--reward {spec!r}: {target} has no callable named {name!r}")
    return fn


def score(reward_fn: RewardFn, prompts, completions, references) -> list[float]:
    """``reward_fn`` over aligned lists; checks each value is a finite number and names
    the function and the row when it is not (or when the function raises)."""
    if not len(prompts) == len(completions) == len(references):
        raise ValueError(f"score: lengths differ (prompts {len(prompts)}, completions "
                         f"{len(completions)}, references {len(references)})")
    name = getattr(reward_fn, "__name__", repr(reward_fn))
    out = []
    for i, (p, c, r) in enumerate(zip(prompts, completions, references)):
        try:
            value = reward_fn(p, c, r)
        except Exception as e:
            raise RuntimeError(f"reward {name} raised on row {i}: {type(e).__name__}: {e}") from e
        try:
            value = float(value)
        except (TypeError, ValueError):
            raise TypeError(f"reward {name} returned {value!r} on row {i}; expected a float") from None
        if not math.isfinite(value):
            raise ValueError(f"reward {name} returned {value} on row {i}; rewards must be finite")
        out.append(value)
    return out
