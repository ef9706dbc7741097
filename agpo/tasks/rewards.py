"""Verifiable rewards: final-answer extraction, normalisation, equivalence, reward functions.

One implementation of "the final answer of a text" serves the rewards, the evaluation and
the controllers' vote entropy (docs/algorithm.md#group-statistics):

- ``extract_answer(text)``: the last ``\\boxed{...}`` (nested braces allowed), else the
  text after the last ``####``, else the last number; None when there is none of these.
- ``normalize_answer(ans)``: a canonical string so equivalent spellings compare equal
  ("1,000" and "1000"; "0.5", "1/2" and "\\frac{1}{2}"; "$18." and "18"; "50\\%" and "50";
  "\\left( 1, 2 \\right)" and "(1, 2)"); plain numbers become exact fractions ("-7/2").
- ``answer_key(text)``: normalised final answer, else the whitespace-normalised
  lower-cased text; "" for an empty text.

Equivalence (``is_equivalent``): equal keys match; two plain numbers are compared exactly
(no tolerance), two plain words as text; anything else goes to ``math-verify``
(``agpo.tasks.verifier``: a pool of worker processes with deadlines, safe in any thread). A
verifier failure (timeout, error, not installed) scores 0 and is counted in
``verifier_stats()``.

Completions are untrusted input: every function here returns for any string, in time
linear in a bounded part of it. The final answer is looked for in the last
``MAX_SCAN_CHARS`` characters; an answer longer than ``MAX_ANSWER_CHARS`` or nested deeper
than ``MAX_NESTING`` is compared as text only (never read as a number, parsed or verified;
counted as ``oversized``); a number is read exactly only in plain decimal or fraction
form with at most a 3-digit exponent (``1e999999999`` stays text instead of becoming a
10^9-digit integer).

Rewards are small pure functions ``(prompt, completion, reference) -> float`` where
``reference`` is the reference final answer (a full GSM8K/MATH solution also works: its
``####`` / ``\\boxed{}`` part is taken). ``load_reward`` resolves ``--reward`` values: a
built-in name (``REWARDS``) or ``module:function`` / ``path/to/file.py:function``.

``score_batch`` scores a whole phase: the math-verify comparisons of a reward marked
``uses_verifier`` (the built-in correctness rewards; set the attribute on your own reward
if it calls ``is_correct``) go to the worker pool as one batch first, then the reward runs
row by row; a reward that raises or returns a non-finite value stops the run with the row
and its text (``on_error="raise"``) or scores 0 and is counted (``on_error="zero"``).
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib
import importlib.util
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

from agpo.tasks.verifier import MathVerifier

RewardFn = Callable[[str, str, str], float]

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:/\d+)?|-?\.\d+")
_TEXT_CMD = re.compile(r"\\(?:text|textbf|textrm|mathrm|mathbf|mbox)\s*\{([^{}]*)\}")
_FRAC = re.compile(r"\\[dt]?frac\s*\{([^{}]*)\}\s*\{([^{}]*)\}")
_FRAC_DIGITS = re.compile(r"\\[dt]?frac\s*(\d)\s*(\d)")  # \frac12
_DEGREES = re.compile(r"\^\s*\{?\\circ\}?|\\degree|°")
_WORDS = re.compile(r"[a-z][a-z ]*")
_VARIABLE_PREFIX = re.compile(r"^[a-zA-Z]\s*=\s*(?=\S)")  # "x = 5"
_PLAIN = r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)"
_EXP = r"(?:[eE][+-]?\d{1,3})?"  # "1e5"; never "1e999999999" (a 10^9-digit integer)
_RATIONAL = re.compile(rf"({_PLAIN}{_EXP})(?:/({_PLAIN}{_EXP}))?")  # what Fraction may read (no "inf", "1_0")

MAX_SCAN_CHARS = 100_000
"""The final answer is looked for in the last this-many characters of a text."""
MAX_ANSWER_CHARS = 500
"""Final answers longer than this are compared as text only (never parsed or verified)."""
MAX_NESTING = 24
"""Final answers whose brackets nest deeper than this are compared as text only."""
ON_ERROR = ("raise", "zero")


def _tail(text: str) -> str:
    return text[-MAX_SCAN_CHARS:] if len(text) > MAX_SCAN_CHARS else text


def _nesting(s: str) -> int:
    depth = deepest = 0
    for ch in s:
        if ch in "{([":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in "})]":
            depth = max(0, depth - 1)
    return deepest


def oversized(answer: str) -> bool:
    """Whether an extracted answer is over the size or nesting limit (compared as text only)."""
    return len(answer) > MAX_ANSWER_CHARS or _nesting(answer) > MAX_NESTING


# -- extraction --------------------------------------------------------------------------
def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (or ``\\fbox{...}``), braces balanced; None when
    there is none or it is not closed. A content still open after ``MAX_ANSWER_CHARS``
    characters is returned cut to ``MAX_ANSWER_CHARS + 1`` (over the limit: text only)."""
    text = _tail(text)
    start = max(text.rfind("\\boxed{"), text.rfind("\\fbox{"))
    if start < 0:
        return None
    i = text.index("{", start) + 1
    stop = min(len(text), i + MAX_ANSWER_CHARS + 1)
    depth, j = 1, i
    while j < stop and depth:
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        j += 1
    if depth == 0:
        return text[i:j - 1]
    return text[i:stop] if stop < len(text) else None


def extract_answer(text: str) -> str | None:
    """The raw final answer of a completion, or None when it has none of the markers."""
    text = _tail(text)
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
    reference = _tail(reference)
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
    m = _RATIONAL.fullmatch(s) if len(s) <= MAX_ANSWER_CHARS else None
    if m is None:
        return None
    num, den = m.groups()
    try:
        value = Fraction(num) if den is None else Fraction(Fraction(num), Fraction(den))
    except ZeroDivisionError:
        return None
    return str(value.numerator) if value.denominator == 1 else f"{value.numerator}/{value.denominator}"


def normalize_answer(ans: str) -> str:
    """Canonical string of an extracted answer (see the module docstring); an answer over
    the limits (``oversized``) gets its whitespace-normalised, lower-cased text."""
    if oversized(ans):
        return " ".join(_tail(ans).split()).lower()
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
    lead = re.match(r"(-?\d[\d,]*(?:\.\d+)?)\s*(?![eE][+-]?\d)[a-zA-Z]", s)  # "18 dollars", "5cm"; not "1e9"
    if lead and (n := _canonical_number(lead.group(1))) is not None:
        return n
    return s.lower()


def answer_key(text: str) -> str:
    """Normalised final answer of ``text`` (the vote-entropy key, docs/algorithm.md#group-statistics); "" for empty text."""
    text = _tail(text)
    if not text or not text.strip():
        return ""
    raw = extract_answer(text)
    if raw is None:
        return " ".join(text.split()).lower()
    return normalize_answer(raw)


def numeric_value(key: str) -> Fraction | None:
    """The exact value of a normalised key that is a plain number ("-7/2"), else None."""
    if len(key) > MAX_ANSWER_CHARS or not re.fullmatch(r"-?\d+(?:/\d+)?", key):
        return None
    try:
        return Fraction(key)
    except ZeroDivisionError:  # "1/0"
        return None


# -- equivalence -------------------------------------------------------------------------
DEFAULT_VERIFIER = MathVerifier(timeout=5.0)
_ACTIVE: contextvars.ContextVar[MathVerifier | None] = contextvars.ContextVar("agpo_verifier", default=None)


def _verifier(verifier: MathVerifier | None) -> MathVerifier:
    """``verifier``, else the one ``score_batch`` / ``correct_many`` is scoring with, else the default."""
    return verifier or _ACTIVE.get() or DEFAULT_VERIFIER


def verifier_stats(verifier: MathVerifier | None = None) -> dict[str, int]:
    """Counters of the (default) math-verify pool: calls, equal, timeouts, errors,
    unavailable, oversized, failures. Log their increase per step: failures scored 0."""
    return _verifier(verifier).stats.snapshot()


def _cheap_verdict(pred: str, reference: str) -> bool | str:
    """True / False when the answers can be compared without math-verify, "oversized"
    when one is over the limits (compared as text: not equal), else "verify"."""
    if not pred.strip() or not reference.strip():
        return False
    pk, rk = normalize_answer(pred), normalize_answer(reference)
    if pk == rk:
        return True
    if oversized(pred) or oversized(reference):
        return "oversized"
    if numeric_value(pk) is not None and numeric_value(rk) is not None:
        return False  # two exact numbers that differ
    if _WORDS.fullmatch(pk) and _WORDS.fullmatch(rk):
        return False  # plain words ("paris", "b"): math-verify would read them as products of symbols
    return "verify"


def is_equivalent(pred: str, reference: str, *, verifier: MathVerifier | None = None) -> bool:
    """Whether the bare answer ``pred`` equals the bare answer ``reference``."""
    verdict = _cheap_verdict(pred, reference)
    if verdict == "oversized":
        _verifier(verifier).stats.add("oversized")
        return False
    if verdict != "verify":
        return verdict
    return bool(_verifier(verifier).equivalent(reference, pred))


def verification_pair(completion: str, reference: str) -> tuple[str, str] | None:
    """The ``(gold, pred)`` pair ``is_correct(completion, reference)`` would ask math-verify
    about, or None when it decides without it (what ``MathVerifier.primed`` takes)."""
    ref, raw = reference_answer(reference), extract_answer(completion)
    if raw is None or _cheap_verdict(raw, ref) != "verify":
        return None
    return ref, raw


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


correctness_reward.uses_verifier = True


def correct_many(completions, references, *, verifier: MathVerifier | None = None) -> list[bool]:
    """``is_correct`` over aligned lists, the math-verify comparisons in one batch."""
    verifier = _verifier(verifier)
    pairs = [q for q in map(verification_pair, completions, references) if q is not None]
    with verifier.primed(pairs), _active(verifier):
        return [is_correct(c, r) for c, r in zip(completions, references)]


@contextlib.contextmanager
def _active(verifier: MathVerifier):
    token = _ACTIVE.set(verifier)
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def format_reward(prompt: str, completion: str, reference: str) -> float:
    """1.0 when the completion marks a final answer (``\\boxed{...}`` or ``#### ...``)."""
    completion = _tail(completion)
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
    reward.uses_verifier = any(getattr(fn, "uses_verifier", False) for fn, _ in parts)
    return reward


def correctness_with_format(prompt: str, completion: str, reference: str) -> float:
    """Correctness plus 0.1 for a marked final answer (at most 1.1)."""
    return correctness_reward(prompt, completion, reference) + 0.1 * format_reward(prompt, completion, reference)


correctness_with_format.uses_verifier = True


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


class RewardError(RuntimeError):
    """A reward function raised or returned something other than a finite number."""


@dataclass
class Scores:
    """What ``score_batch`` returns: one value per row, and the failed rows' messages
    (scored 0; only with ``on_error="zero"``)."""

    values: list[float]
    errors: list[str]


def _row_text(text) -> str:
    s = str(text)
    return f"{s[:200]!r}{f'... ({len(s)} chars)' if len(s) > 200 else ''}"


def _one(reward_fn, name: str, i: int, p, c, r) -> float:
    try:
        value = reward_fn(p, c, r)
    except Exception as e:
        raise RewardError(f"reward {name} raised on row {i}: {type(e).__name__}: {e}; "
                          f"completion {_row_text(c)}") from e
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise RewardError(f"reward {name} returned {value!r} on row {i}; expected a float; "
                          f"completion {_row_text(c)}") from None
    if not math.isfinite(value):
        raise RewardError(f"reward {name} returned {value} on row {i}; rewards must be finite; "
                          f"completion {_row_text(c)}")
    return value


def score_batch(reward_fn: RewardFn, prompts, completions, references, *, on_error: str = "raise",
                verifier: MathVerifier | None = None) -> Scores:
    """``reward_fn`` over aligned lists (one phase of a step). Its math-verify work goes to
    the pool in one batch when ``reward_fn.uses_verifier``. A row whose reward raises or is
    not a finite number raises ``RewardError`` naming the function, the row and its text
    (``on_error="raise"``), or scores 0 and is listed in ``Scores.errors`` (``"zero"``)."""
    if on_error not in ON_ERROR:
        raise ValueError(f"on_error: expected one of {ON_ERROR}, got {on_error!r}")
    if not len(prompts) == len(completions) == len(references):
        raise ValueError(f"score: lengths differ (prompts {len(prompts)}, completions "
                         f"{len(completions)}, references {len(references)})")
    name = getattr(reward_fn, "__name__", repr(reward_fn))
    verifier = _verifier(verifier)
    pairs = []
    if getattr(reward_fn, "uses_verifier", False):
        pairs = [q for q in map(verification_pair, completions, references) if q is not None]
    out = Scores([], [])
    with verifier.primed(pairs), _active(verifier):
        for i, row in enumerate(zip(prompts, completions, references)):
            try:
                out.values.append(_one(reward_fn, name, i, *row))
            except RewardError as e:
                if on_error == "raise":
                    raise
                out.values.append(0.0)
                out.errors.append(str(e))
    return out


def score(reward_fn: RewardFn, prompts, completions, references) -> list[float]:
    """``score_batch(...).values`` with failures raised (see there)."""
    return score_batch(reward_fn, prompts, completions, references).values
