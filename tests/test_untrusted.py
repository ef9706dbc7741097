"""Completions are untrusted input (issue 20): every built-in reward and the vote-entropy
answer keys return a value for any string, in bounded time.

A fuzz set of a few hundred generated pathological completions (huge numbers, exponents,
deep nesting, megabytes of text, NUL bytes, lone surrogates, power towers) goes through
the cheap paths one by one (answer keys, extraction, format rewards: a per-text bound)
and through ``score_batch`` with the correctness rewards on a pool of math-verify
workers (a bound for the whole batch). The bound is stated with margins both ways: it
holds on a loaded 2-core machine, and it fails if the per-comparison deadline is broken
(the batch would then run into its 120 s batch deadline) or if the pool were one process
(the towers alone would take N_TOWERS x DEADLINE seconds).
"""

from __future__ import annotations

import math
import random
import time

import pytest

from agpo.algo.stats import group_vote_entropy
from agpo.tasks.rewards import (
    MAX_ANSWER_CHARS,
    REWARDS,
    RewardError,
    answer_key,
    correctness_reward,
    correctness_with_format,
    extract_answer,
    is_correct,
    reference_answer,
    score_batch,
    verification_pair,
)
from agpo.tasks.verifier import MathVerifier, math_verify_installed

needs_math_verify = pytest.mark.skipif(not math_verify_installed(), reason="math-verify not installed")

DEADLINE = 1.0        # seconds per comparison
WORKERS = 6
CHEAP_BOUND_S = 0.5   # per text, the non-verifier paths (measured worst: 0.10 s on a loaded 2-core machine)
BATCH_BOUND_S = 25.0  # the whole fuzz batch through the pool (measured: see docs/operations.md)

REFERENCES = ["3", r"\frac{1}{2}", "x^2+1", "Natalia sold 48 clips.\n#### 72", r"so $\boxed{\dfrac{\sqrt{3}}{2}}$",
              "1" * 6000, "\\boxed{" + "{" * 50_000, "\x00", "\ud800"]


def towers() -> list[str]:
    """Answers math-verify gets to see (within the size limits) and works on for ever."""
    out = []
    for b in range(3, 9):
        out += [rf"\boxed{{{b}^{{{b}^{{{b}^{{{b}^{{{b}}}}}}}}}}}", rf"\boxed{{({b}^{{{b}^{{{b}^{{{b}^{{10}}}}}}}})!}}",
                rf"\boxed{{\binom{{{b}0^{{9}}}}{{{b}0^{{5}}}}}}", rf"The answer is \boxed{{{b}^{{{b}^{{3{b}}}}}}}",
                rf"\boxed{{10^{{10^{{10^{{{b}}}}}}}}}", rf"#### {b}^{{2^{{30}}}}"]
    return out


def pathological(seed: int = 0) -> list[str]:
    rnd = random.Random(seed)
    fixed = [
        # numbers: past Python's 4300-digit limit, exponents, huge fractions
        "#### " + "9" * 5000, "\\boxed{" + "1" * 100_000 + "}", "1" * 1_000_000, "#### 1e999999999",
        "#### -1e-999999999", "#### 1e999/1e-999", "#### " + "9" * 5000 + "/" + "7" * 5000,
        "#### 0." + "3" * 10_000, "\\boxed{" + "1," * 200_000 + "}", "#### inf", "#### nan", "#### 1_000",
        "\\boxed{1/0}", "#### 0/0", "1." * 500_000, "," * 1_000_000, "0" * 100_000 + "1", "\u2212" * 500_000 + "1",
        # repeats and nesting
        "#### " + "1/2 " * 50_000, "\\boxed{" + "\\frac{1}{" * 3000 + "2" + "}" * 3000 + "}", "\\boxed{" + "{" * 100_000,
        "\\boxed{" + "}" * 100_000, "(" * 100_000, "\\boxed{" + "\\sqrt{" * 5000 + "2" + "}" * 5000 + "}",
        "\\boxed{" + "x^{" * 3000 + "}" * 3000 + "}", "\\boxed{" + "[" * 30 + "1" + "]" * 30 + "}",
        "\\boxed{" + "\\left(" * 24 + "1" + "\\right)" * 24 + "}", "\\boxed{" + "a+" * 240 + "a}",
        "\\fbox{" + "9" * 499 + "}", "\\boxed{" + "9" * 501 + "}", "#### " + "\\frac12" * 60_000,
        "\\boxed{" + "\\dfrac{" * 100_000,
        # megabytes, markers by the thousand
        "a" * 4_000_000, " " * 4_000_000, "\n" * 1_000_000, "\\boxed{" * 200_000, "####" * 250_000,
        "\\boxed{}" * 100_000, "-" * 1_000_000, "\\left(" * 100_000, "\\text{" * 50_000,
        # NUL bytes, lone surrogates, BOM and bidi marks, astral characters
        "\x00" * 1_000_000, "\ud800" * 100_000, "\\boxed{\ud800\udfff}", "#### \x00 3", "\ufeff\u202e#### 3",
        "\\boxed{\\text{" + "\U0001F600" * 100_000 + "}}",
    ]
    pieces = ["\\boxed{", "}", "{", "####", "\\frac", "1", "9" * 50, "/", ".", ",", "-", "e", "^", "\\left(", "\\right)",
              "\x00", "\ud800", "\n", " ", "x", "\\sqrt", "(", ")", "%", "$", "\\text{", "=", "\\infty"]
    mixed = []
    for _ in range(250):
        n = rnd.choice([5, 50, 500, 5000])
        mixed.append("".join(rnd.choice(pieces) for _ in range(n)))
    return fixed + mixed


def test_cheap_paths_are_bounded_for_every_text():
    """Answer keys, extraction, the format rewards and the keys' vote entropy: a value of
    the right type for every text, each within CHEAP_BOUND_S (the verifier is not asked)."""
    texts = pathological() + towers() + REFERENCES
    worst, worst_text = 0.0, ""
    for text in texts:
        t0 = time.perf_counter()
        key, raw, ref = answer_key(text), extract_answer(text), reference_answer(text)
        f, d = REWARDS["format"]("q", text, "3"), REWARDS["digits"]("q", text, "3")
        pair = verification_pair(text, "3")
        elapsed = time.perf_counter() - t0
        if elapsed > worst:
            worst, worst_text = elapsed, text
        assert isinstance(key, str) and isinstance(ref, str) and (raw is None or isinstance(raw, str))
        assert f in (0.0, 1.0) and d in (0.0, 1.0)
        assert pair is None or (len(pair[1]) <= MAX_ANSWER_CHARS)  # nothing over the limit reaches math-verify
    print(f"\ncheap paths: {len(texts)} texts, worst {worst:.3f} s ({len(worst_text)} chars)")
    assert worst < CHEAP_BOUND_S, (worst, worst_text[:80])
    groups = [texts[i:i + 8] for i in range(0, len(texts) - 7, 8)]
    entropy = group_vote_entropy(groups)
    assert entropy.shape == (len(groups),) and bool(entropy.isfinite().all())
    assert float(entropy.max()) <= math.log(8) + 1e-12


def test_huge_numbers_are_compared_exactly_or_as_text():
    """No int-string limit, no 10^9-digit integer: huge numbers compare as text; exact
    plain numbers and short exponents still compare as values."""
    assert answer_key("#### " + "9" * 5000) == "9" * 5000  # was ValueError (4300-digit limit)
    assert answer_key("#### 1e999999999") == "1e999999999"  # was a 10^9-digit integer
    assert answer_key("#### 1e5") == "100000" and answer_key("#### 2.5e-3") == "1/400"
    assert is_correct("#### " + "7" * 5000, "7" * 5000) and not is_correct("#### " + "7" * 5000, "7" * 4999)
    assert is_correct(r"\boxed{" + "9" * 480 + "}", "9" * 480)
    assert not is_correct(r"\boxed{" + "9" * 501 + "}", "9" * 501 + "0")


@pytest.fixture(scope="module")
def pool():
    v = MathVerifier(timeout=DEADLINE, workers=WORKERS, batch_timeout=120.0)
    assert v.start(), "math-verify workers did not start"  # startup is not part of the timed batch
    yield v
    v.close()


@needs_math_verify
@pytest.mark.timeout(300)
def test_fuzz_batch_finishes_within_the_bound(pool):
    completions = pathological() + towers()
    refs = [REFERENCES[i % len(REFERENCES)] for i in range(len(pathological()))] + ["3"] * len(towers())
    before = pool.stats.snapshot()
    t0 = time.perf_counter()
    res = score_batch(correctness_with_format, ["q"] * len(completions), completions, refs, verifier=pool)
    elapsed = time.perf_counter() - t0
    after = pool.stats.snapshot()
    delta = {k: after[k] - before[k] for k in after}
    assert res.errors == []
    assert all(v in (0.0, 0.1, 1.0, 1.1) for v in res.values)
    assert elapsed < BATCH_BOUND_S, (elapsed, delta)
    # every tower that reached math-verify missed its deadline: counted, scored 0, never silent
    n = len(towers())
    assert len({verification_pair(c, r) for c, r in zip(completions[-n:], refs[-n:])} - {None}) == n
    assert all(v in (0.0, 0.1) for v in res.values[-n:])
    assert delta["timeouts"] + delta["errors"] >= n, delta
    assert delta["oversized"] > 0  # the size limits turned answers away before parsing
    # the same batch row by row gives the same rewards (one verdict per pair, cached or not)
    assert [correctness_reward("q", c, r) for c, r in zip(completions[:40], refs[:40])] == \
        [float(v >= 1.0) for v in res.values[:40]]
    print(f"\nfuzz: {len(completions)} completions, {len(towers())} towers, {WORKERS} workers, deadline {DEADLINE}s: "
          f"{elapsed:.2f}s, {delta}")


@needs_math_verify
@pytest.mark.timeout(120)
def test_batch_deadline_bounds_the_whole_batch(pool):
    """With the per-comparison deadline further away, the batch deadline still returns on
    time (not after 2 x 6 s); what is left counts as timed out, and the pool answers the
    next call once the abandoned comparisons hit their own deadline."""
    pool.configure(timeout=6.0)
    try:
        pairs = [("3", t.removeprefix(r"\boxed{")[:-1]) for t in towers()[:12:2]] * 2
        before = pool.stats.snapshot()["timeouts"]
        t0 = time.perf_counter()
        out = pool.verify_many(pairs, batch_timeout=1.5)
        elapsed = time.perf_counter() - t0
        print(f"\nbatch deadline 1.5 s: returned after {elapsed:.2f} s")
        assert out == [None] * len(pairs)
        assert elapsed < 5.0, elapsed
        assert pool.stats.snapshot()["timeouts"] - before == len(pairs)
    finally:
        pool.configure(timeout=DEADLINE)
    assert pool.verify_many([(r"\frac{1}{2}", "0.5"), ("x^2+1", "1+x^2"), ("2", "3")]) == [True, True, False]


def test_user_reward_errors_raise_or_score_zero():
    def fragile(prompt, completion, reference):
        return 1.0 / len(completion.strip())

    comps = ["#### 3", "   ", "#### 4"]
    with pytest.raises(RewardError, match=r"reward fragile raised on row 1: ZeroDivisionError.*completion '   '"):
        score_batch(fragile, ["q"] * 3, comps, ["3"] * 3)
    res = score_batch(fragile, ["q"] * 3, comps, ["3"] * 3, on_error="zero")
    assert res.values == [pytest.approx(1 / 6), 0.0, pytest.approx(1 / 6)]
    assert len(res.errors) == 1 and "row 1" in res.errors[0]
    res = score_batch(lambda p, c, r: math.inf if c == "   " else 1.0, ["q"] * 3, comps, ["3"] * 3, on_error="zero")
    assert res.values == [1.0, 0.0, 1.0] and "finite" in res.errors[0]
    with pytest.raises(ValueError, match="on_error"):
        score_batch(fragile, ["q"], ["x"], ["3"], on_error="ignore")
