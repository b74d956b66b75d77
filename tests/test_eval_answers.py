"""GSM8K and MATH answer checkers (qwen2.eval.answers) against lm-evaluation-harness's hendrycks_math
is_equiv / last_boxed_only_string, the Hendrycks MATH normalisation, on a table of cases."""

import importlib.util
import os

import pytest

from qwen2.eval.answers import (
    extract_boxed,
    extract_gsm8k,
    gsm8k_correct,
    math_equal,
    normalize_math,
    normalize_number,
)


@pytest.fixture(scope="module")
def lm_math():
    """lm_eval/tasks/hendrycks_math/utils.py, loaded from its file (the lm_eval.tasks package is heavy)."""
    spec = importlib.util.find_spec("lm_eval")
    if spec is None:
        pytest.skip("lm_eval is not installed")
    path = os.path.join(list(spec.submodule_search_locations)[0], "tasks", "hendrycks_math", "utils.py")
    module_spec = importlib.util.spec_from_file_location("lm_eval_hendrycks_math_utils", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def test_gsm8k_extraction_order_and_cleanup():
    assert extract_gsm8k("She pays 3 * 6 = 18 dollars. The answer is $1,018.") == "1018"
    # the phrase beats the last number
    assert extract_gsm8k("The answer is 42. Next question: 7 apples") == "42"
    assert extract_gsm8k("5 + 3 = 8\n#### 8") == "8"
    assert extract_gsm8k("#### 8 then 9") == "8"
    assert extract_gsm8k("first 3, then 4.5, finally -12.") == "-12"
    assert extract_gsm8k("no digits here") is None
    assert extract_gsm8k("the answer is: 0.50") == "0.5"


def test_normalize_number():
    assert normalize_number("$1,234.50.") == "1234.5"
    assert normalize_number("18.00") == "18"
    assert normalize_number("-7") == "-7"
    assert normalize_number(" twelve ") == "twelve"


def test_gsm8k_correct_takes_a_number_or_a_full_reference():
    reference = "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n48+24 = <<48+24=72>>72\n#### 72"
    assert gsm8k_correct("48 + 24 = 72. The answer is 72.", reference)
    assert gsm8k_correct("So she sold 72.00 clips", "72")
    assert not gsm8k_correct("The answer is 71.", reference)
    assert not gsm8k_correct("I do not know", reference)
    assert gsm8k_correct("The answer is 1,000,000", "#### 1000000")


BOXED = [
    "so the answer is $\\boxed{\\frac{1}{2}}$.",
    "first \\boxed{3} then \\boxed{\\{1, 2\\}}",
    "nested \\boxed{\\sqrt{\\frac{a}{b}}} done",
    "\\fbox{7}",
    "\\boxed 5$ is it",
    "unclosed \\boxed{3",
    "nothing boxed",
]


@pytest.mark.parametrize("text", BOXED)
def test_extract_boxed_matches_lm_eval(lm_math, text):
    theirs = lm_math.last_boxed_only_string(text)
    if theirs is not None and theirs.startswith("\\fbox{"):
        theirs = "\\boxed{" + theirs[len("\\fbox{") :]  # lm_eval's remove_boxed asserts on \fbox
    expected = None if theirs is None else lm_math.remove_boxed(theirs)
    assert extract_boxed(text) == expected


MATH_CASES = [
    ("\\frac{1}{2}", "0.5"),
    ("\\dfrac{1}{2}", "\\frac12"),
    ("\\tfrac{3}{4}", "3/4"),
    ("\\frac1{72}", "\\frac{1}{72}"),
    ("\\left( 3, 4 \\right)", "(3,4)"),
    ("x = 5", "5"),
    ("k=\\sqrt3", "\\sqrt{3}"),
    (".5", "0.5"),
    ("10\\%", "10"),
    ("90^\\circ", "90"),
    ("90^{\\circ}", "90"),
    ("\\$5", "5"),
    ("5 \\text{ cm}", "5"),
    ("1 \\text{ m} + 2 \\text{ m}", "3"),
    ("\\frac{2}{3}", "\\frac{3}{2}"),
    ("a\\!b", "ab"),
    ("2\n3", "23"),
    ("\\sqrt", "\\sqrt"),
    ("5", "6"),
    ("{.5}", "{0.5}"),
    ("\\\\frac{1}{2}", "\\frac{1}{2}"),
    ("\\frac", "\\frac"),
    ("", ""),
    ("-3/4", "\\frac{-3}{4}"),
    ("\\pi", "\\pi"),
    ("12/4/2", "12/4/2"),
]


@pytest.mark.parametrize("a,b", MATH_CASES)
def test_math_equal_matches_lm_eval(lm_math, a, b):
    assert math_equal(a, b) == lm_math.is_equiv(a, b)
    assert math_equal(b, a) == lm_math.is_equiv(b, a)


@pytest.mark.parametrize("s", ["\\left(\\dfrac{1}{2}, 3\\right)", "x = \\frac12", "0.5", " .3", "\\sqrt2+1"])
def test_normalize_math_is_strip_string(lm_math, s):
    assert normalize_math(s) == lm_math.strip_string(s)


def test_departures_from_lm_eval_are_the_documented_ones(lm_math):
    # trailing .0: equal here, not in strip_string
    assert math_equal("5.0", "5") and not lm_math.is_equiv("5.0", "5")
    # one "/" between non-integers: Hendrycks' bare except leaves it to normalise; lm_eval's narrowed except
    # raises and falls back to the raw strings
    assert math_equal("\\left(x/2\\right)", "(x/2)") and not lm_math.is_equiv("\\left(x/2\\right)", "(x/2)")
    assert math_equal(None, None) and not math_equal("1", None)
