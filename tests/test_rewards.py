"""Final-answer extraction and normalisation on real-style GSM8K and MATH completions."""

import pytest

from agpo.rewards import answer_key, extract_answer, last_boxed

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
    (r"\boxed{\$18.}", "18"),
    (r"\boxed{18 \text{ dollars}}", "18"),
    (r"\boxed{50\%}", "50"),
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
