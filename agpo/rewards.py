"""Final-answer extraction and normalisation: the one implementation the rewards and the
controllers' vote entropy share (SPEC section 1, step 1).

``answer_key(text)`` returns the final answer of a completion, normalised so that
equivalent spellings compare equal as strings ("1,000" and "1000", "0.5", "1/2" and
"\\frac{1}{2}", "$18." and "18"): the last ``\\boxed{...}`` (nested braces allowed), else
the text after the last ``####``, else the last number, else the whitespace-normalised
lower-cased text; "" for an empty text.
"""

from __future__ import annotations

import re
from fractions import Fraction

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:/\d+)?|-?\.\d+")
_TEXT_CMD = re.compile(r"\\(?:text|textbf|mathrm|mbox)\{([^{}]*)\}")
_FRAC = re.compile(r"\\[dt]?frac\{([^{}]*)\}\{([^{}]*)\}")


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
    numbers = _NUMBER.findall(text)
    return numbers[-1] if numbers else None


def _canonical_number(s: str) -> str | None:
    """Exact rational form of a plain number / fraction / percentage, else None."""
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
    s = ans.strip()
    s = _TEXT_CMD.sub(r"\1", s)
    s = s.replace("\\left", "").replace("\\right", "").replace("\\!", "").replace("\\,", "")
    s = _FRAC.sub(r"(\1)/(\2)", s)
    s = s.replace("\\%", "").replace("%", "").replace("\\$", "").replace("$", "")
    s = re.sub(r"\s+", " ", s).strip().rstrip(".").strip()
    s = re.sub(r"\s*([()\[\]{}])\s*", r"\1", s)
    s = re.sub(r"\s*,\s*", ", ", s)
    compact = s.replace(" ", "")
    plain = re.fullmatch(r"\(?(-?[\d.,]+)\)?/\(?([\d.,]+)\)?", compact)
    if plain:
        compact = f"{plain.group(1)}/{plain.group(2)}"
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
