"""Final-answer extraction, normalisation, equivalence and the reward functions, on
real-style GSM8K and MATH completions."""

import math
import threading

import pytest

from agpo.tasks.rewards import (
    REWARDS,
    RewardError,
    answer_key,
    correctness_reward,
    correctness_with_format,
    digits_format_reward,
    extract_answer,
    format_reward,
    is_correct,
    is_equivalent,
    last_boxed,
    load_reward,
    reference_answer,
    score,
    verifier_stats,
)
from agpo.tasks.verifier import MathVerifier, math_verify_installed

needs_math_verify = pytest.mark.skipif(not math_verify_installed(), reason="math-verify not installed")

GSM8K = ("Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
         "Natalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\n#### 72")
MATH = (r"We have $\frac{a}{b} = \boxed{\frac{3}{4}}$ after simplifying, "
        r"and the area is $\boxed{\dfrac{\sqrt{3}}{2}}$.")


@pytest.mark.parametrize("text,key", [
    (GSM8K, "72"),
    ("The total is #### 1,234", "1234"),
    ("#### -5", "-5"),
    (r"So the answer is \boxed{1,000}.", "1000"),
    (r"\boxed{0.5}", "1/2"),
    (r"\boxed{\frac{1}{2}}", "1/2"),
    (r"\boxed{\dfrac{6}{4}}", "3/2"),
    (r"\boxed{\frac12}", "1/2"),
    (r"\boxed{\$18.}", "18"),
    (r"\boxed{18 \text{ dollars}}", "18"),
    (r"\boxed{50\%}", "50"),
    (r"\boxed{90^\circ}", "90"),
    (r"\boxed{1{,}000}", "1000"),
    (r"\boxed{x = 5}", "5"),
    ("the result is \u22123", "-3"),
    (r"\boxed{\left( 1, 2 \right)}", "(1, 2)"),
    (r"first \boxed{3} then \boxed{{x}^{2}+1}", "{x}^{2}+1"),
    ("I think it costs 12 dollars, no wait, 15.", "15"),
    ("The answer is -3.50", "-7/2"),
    ("No idea at ALL   here", "no idea at all here"),
    ("", ""),
    ("   \n ", ""),
])
def test_answer_key(text, key):
    assert answer_key(text) == key


def test_equivalent_spellings_share_a_key():
    assert answer_key(r"\boxed{2.50}") == answer_key("#### 5/2") == answer_key(r"\boxed{\frac{5}{2}}")
    assert answer_key("#### 1,000") == answer_key("so 1000") != answer_key("#### 100")


def test_nested_and_unbalanced_boxes():
    assert last_boxed(MATH) == r"\dfrac{\sqrt{3}}{2}"
    assert last_boxed(r"\boxed{a{b{c}}d}") == "a{b{c}}d"
    assert last_boxed(r"\boxed{unclosed") is None
    assert extract_answer("nothing numeric") is None


def test_reference_answer_reads_full_solutions():
    assert reference_answer(GSM8K) == "72"
    assert reference_answer(r"so $x = \boxed{\frac{\pi}{2}}$.") == r"\frac{\pi}{2}"
    assert reference_answer("  42 ") == "42"


# Completions as models write them, against official-style references.
GSM8K_CASES = [
    ("Each box has 12 eggs, 3 boxes give 3*12 = 36 eggs.\n#### 36", "36", True),
    ("She pays 1,250 + 250 = 1,500 dollars in total.\n#### $1,500", "1500", True),
    ("The temperature drops to 4 - 11 = -7.\nThe answer is \\boxed{-7}.", "-7", True),
    ("The temperature drops to 4 - 11 = -7.\nThe answer is \\boxed{7}.", "-7", False),
    ("Half of 9 is 4.5, so each gets \\boxed{4.50}", "9/2", True),
    ("So the final answer is 18 dollars.", "18", True),
    ("He has 5 apples, buys 3 more: 8. Then gives 2 away, leaving 6", "6", True),
    ("I am not sure how to solve this problem.", "12", False),
    ("", "12", False),
    ("\\boxed{}", "12", False),
]
MATH_CASES = [
    (r"Simplify: $\frac{6}{8} = \boxed{\frac{3}{4}}$.", r"\frac{3}{4}", True),
    (r"So the ratio is \boxed{0.75}.", r"\frac{3}{4}", True),
    (r"So the ratio is \boxed{0.7}.", r"\frac{3}{4}", False),
    (r"Thus \boxed{\dfrac{3}{4}}.", "0.75", True),
    (r"The answer is \boxed{\left( 2, 1 \right)}.", r"(2, 1)", True),
    (r"The answer is \boxed{\text{(B)}}.", r"\text{(B)}", True),
]


@pytest.mark.parametrize("completion,reference,ok", GSM8K_CASES + MATH_CASES)
def test_is_correct_without_a_symbolic_check(completion, reference, ok):
    assert is_correct(completion, reference) is ok
    assert correctness_reward("q", completion, reference) == float(ok)


@needs_math_verify
@pytest.mark.parametrize("pred,ref,ok", [
    (r"\frac{\sqrt3}{2}", r"\dfrac{\sqrt{3}}{2}", True),
    ("1+x^2", "x^2+1", True),
    (r"2\sqrt{2}", r"\sqrt{8}", True),
    (r"\frac{\pi}{2}", r"\pi/2", True),
    ("x^2-1", "x^2+1", False),
])
def test_symbolic_equivalence_with_math_verify(pred, ref, ok):
    before = verifier_stats()["calls"]
    assert is_equivalent(pred, ref) is ok
    assert is_correct(f"so the answer is $\\boxed{{{pred}}}$", ref) is ok
    assert verifier_stats()["calls"] > before


def test_plain_numbers_never_reach_the_verifier():
    before = verifier_stats()
    assert is_correct("#### 1,000", "1000") and not is_correct("#### 1001", "1000")
    assert is_correct(r"\boxed{-0.25}", r"-\frac{1}{4}")
    assert is_correct("The capital is \\boxed{Paris}", "Paris") and not is_correct(r"\boxed{ab}", "ba")
    assert verifier_stats()["calls"] == before["calls"]


@needs_math_verify
def test_verifier_works_in_threads():
    results = []
    threads = [threading.Thread(target=lambda: results.append(is_equivalent(r"\sqrt{8}", r"2\sqrt{2}")))
               for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [True, True, True]


@needs_math_verify
def test_verifier_timeout_scores_zero_and_is_counted():
    v = MathVerifier(timeout=0.5)
    try:
        huge = r"(2^{2^{2^{2^{2^{10}}}}})!"  # sympy would work on this for ever
        result = []
        t = threading.Thread(target=lambda: result.append(is_correct(rf"\boxed{{{huge}}}", "3", verifier=v)))
        t.start()
        t.join(30)
        assert result == [False]
        stats = v.stats.snapshot()
        assert stats["timeouts"] == 1 and stats["failures"] == 1
        assert v.equivalent(r"\frac{1}{2}", "0.5") is True  # the worker was restarted
    finally:
        v.close()


def test_verifier_rejects_a_bad_timeout():
    with pytest.raises(ValueError, match="timeout"):
        MathVerifier(timeout=0)


def test_format_rewards():
    assert format_reward("", r"so \boxed{4}", "4") == 1.0
    assert format_reward("", "#### 4", "4") == 1.0
    assert format_reward("", "####", "4") == 0.0
    assert format_reward("", "it is 4", "4") == 0.0
    assert digits_format_reward("", "46", "46") == 1.0 and digits_format_reward("", "4 6", "46") == 0.0
    assert correctness_with_format("", r"\boxed{4}", "4") == pytest.approx(1.1)
    assert correctness_with_format("", "4", "4") == pytest.approx(1.0)


def test_load_reward_builtin_module_and_file(tmp_path):
    assert load_reward("correct") is correctness_reward
    assert set(REWARDS) >= {"correct", "format", "correct+format"}
    assert load_reward("agpo.tasks.rewards:format_reward") is format_reward
    f = tmp_path / "my_reward.py"
    f.write_text("def length_penalty(prompt, completion, reference):\n    return -len(completion) / 100\n")
    fn = load_reward(f"{f}:length_penalty")
    assert fn("p", "abcd", "r") == pytest.approx(-0.04)
    assert load_reward(fn) is fn


@pytest.mark.parametrize("spec,match", [
    ("nonsense", "not a built-in reward"),
    ("no_such_module_xyz:f", "cannot import module"),
    ("agpo.tasks.rewards:no_such_function", "no callable named"),
    ("/no/such/file.py:f", "not found"),
    ("", "expected a name"),
])
def test_load_reward_errors(spec, match):
    with pytest.raises(ValueError, match=match):
        load_reward(spec)


def test_score_checks_values():
    assert score(correctness_reward, ["q", "q"], ["#### 3", "#### 4"], ["3", "3"]) == [1.0, 0.0]
    with pytest.raises(RewardError, match="row 0.*finite"):
        score(lambda p, c, r: math.nan, ["q"], ["c"], ["r"])
    with pytest.raises(RewardError, match="expected a float"):
        score(lambda p, c, r: "high", ["q"], ["c"], ["r"])
    with pytest.raises(RewardError, match="raised on row 1: ZeroDivisionError.*completion '0'"):
        score(lambda p, c, r: 1 / int(c), ["q", "q"], ["1", "0"], ["r", "r"])
    with pytest.raises(ValueError, match="lengths differ"):
        score(correctness_reward, ["q"], [], ["r"])
