"""Answer checkers for the math benchmarks of SPEC section 8 (paper section 5.1.1: GSM8K few-shot,
MATH 4-shot).

GSM8K (Cobbe et al. 2021): the final answer is the number after "The answer is" (the chain-of-thought
few-shot format), else after "####" (the dataset's own format), else the last number in the text; numbers
are compared after removing commas, "$" and a trailing period, as values ("18.00" equals "18").

MATH (Hendrycks et al. 2021, arXiv 2103.03874): the answer is the content of the last \\boxed{...} or
\\fbox{...}; two answers are equal when their normalised strings are, with the normalisation of the
paper's is_equiv/strip_string (as lm-evaluation-harness's hendrycks_math task keeps it): no spaces, line
breaks, \\left/\\right, \\!, degrees, \\$ or \\%, trailing units after "\\text{ ", tfrac/dfrac -> frac,
\\frac12 -> \\frac{1}{2}, \\sqrt3 -> \\sqrt{3}, a leading "x =" dropped, ".5" -> "0.5", "0.5" -> \\frac{1}{2},
and "a/b" -> \\frac{a}{b} for integers a, b (left alone otherwise, as in Hendrycks' code; lm-eval's
copy narrowed that except clause and so compares such strings raw). Where the procedure fails on a
string (two "\\text{ " units, a bare trailing \\sqrt), the raw strings are compared, as is_equiv does.
Departure: a trailing ".0" ("5.0" vs "5") is also equal here, which strip_string misses; the test lists it.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

# a number as people write it: optional sign and $, thousands commas, decimals
_NUMBER = r"-?\$?\d[\d,]*(?:\.\d+)?|-?\$?\.\d+"
_ANSWER_IS = re.compile(rf"the (?:final )?answer is:?\s*({_NUMBER})", re.IGNORECASE)
_HASHES = re.compile(rf"####\s*({_NUMBER})")


def normalize_number(s: str) -> str:
    """'$1,234.50.' -> '1234.5'; '18.00' -> '18'; text that is not a number comes back stripped."""
    s = s.strip().replace(",", "").replace("$", "").rstrip(".")
    try:
        value = Decimal(s)
    except InvalidOperation:
        return s
    if not value.is_finite():
        return s
    if value == value.to_integral_value():
        return str(int(value))
    return format(value.normalize(), "f")


def extract_gsm8k(text: str) -> str | None:
    """The final answer of a GSM8K solution, normalised, or None when the text holds no number."""
    for pattern in (_ANSWER_IS, _HASHES):
        match = pattern.search(text)
        if match:
            return normalize_number(match.group(1))
    numbers = re.findall(_NUMBER, text)
    return normalize_number(numbers[-1]) if numbers else None


def gsm8k_correct(output: str, reference: str) -> bool:
    """Does the model's `output` reach `reference`: a number, or a whole GSM8K answer ending "#### N"?"""
    match = _HASHES.search(reference)
    gold = normalize_number(match.group(1) if match else reference)
    answer = extract_gsm8k(output)
    return answer is not None and answer == gold


def extract_boxed(text: str) -> str | None:
    """The content of the last \\boxed{...} or \\fbox{...} (nested braces kept), or of "\\boxed x"."""
    start = text.rfind("\\boxed")
    if start < 0:
        start = text.rfind("\\fbox")
        if start < 0:
            return None
    if text.startswith("\\boxed ", start):  # "\boxed 5$": up to the closing dollar
        return text[start + len("\\boxed ") :].split("$")[0]
    depth = 0
    for i in range(start, len(text)):
        if text[i] == "{":
            depth += 1
            if depth == 1:
                open_at = i
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return text[open_at + 1 : i]
    return None  # unclosed


def _fix_fracs(s: str) -> str:
    """\\frac12 -> \\frac{1}{2}, \\frac1{72} -> \\frac{1}{72}; braced fractions stay."""
    head, *parts = s.split("\\frac")
    out = [head]
    for part in parts:
        out.append("\\frac")
        if not part:
            raise IndexError("normalize_math: \\frac without arguments")  # strip_string's part[0] fails too
        if part.startswith("{"):
            out.append(part)
        elif len(part) < 2:
            return s
        elif part[1] == "{":
            out.append("{" + part[0] + "}" + part[1:])
        else:
            out.append("{" + part[0] + "}{" + part[1] + "}" + part[2:])
    return "".join(out)


def _fix_a_slash_b(s: str) -> str:
    parts = s.split("/")
    if (
        len(parts) == 2
        and re.fullmatch(r"-?\d+", parts[0])
        and re.fullmatch(r"-?\d+", parts[1])
        and s == f"{int(parts[0])}/{int(parts[1])}"
    ):
        return f"\\frac{{{int(parts[0])}}}{{{int(parts[1])}}}"
    return s


def _fix_sqrt(s: str) -> str:
    head, *parts = s.split("\\sqrt")
    # part[0] of an empty part raises IndexError, as strip_string does: the caller compares raw strings
    return head + "".join("\\sqrt" + (p if p[0] == "{" else "{" + p[0] + "}" + p[1:]) for p in parts)


def normalize_math(s: str) -> str:
    """Hendrycks' strip_string. Raises ValueError/IndexError where it does; math_equal handles that."""
    s = s.replace("\n", "").replace("\\!", "").replace("\\\\", "\\")
    s = s.replace("tfrac", "frac").replace("dfrac", "frac")
    s = s.replace("\\left", "").replace("\\right", "")
    s = s.replace("^{\\circ}", "").replace("^\\circ", "")
    s = s.replace("\\$", "")
    if "\\text{ " in s:  # units on the right
        units = s.split("\\text{ ")
        if len(units) != 2:
            raise ValueError(f"normalize_math: more than one unit in {s!r}")
        s = units[0]
    s = s.replace("\\%", "")
    s = s.replace(" .", " 0.").replace("{.", "{0.")
    if not s:
        return s
    if s[0] == ".":
        s = "0" + s
    sides = s.split("=")
    if len(sides) == 2 and len(sides[0]) <= 2:  # "k = 5" -> "5"
        s = sides[1]
    s = _fix_sqrt(s)
    s = s.replace(" ", "")
    s = _fix_fracs(s)
    if s == "0.5":
        s = "\\frac{1}{2}"
    return _fix_a_slash_b(s)


def _drop_trailing_zero(s: str) -> str:
    return re.sub(r"^(-?\d+)\.0+$", r"\1", s)


def math_equal(a: str | None, b: str | None) -> bool:
    """Are two MATH answers the same after normalisation (raw comparison where it fails)?"""
    if a is None or b is None:
        return a is None and b is None
    try:
        na, nb = normalize_math(a), normalize_math(b)
    except (ValueError, IndexError):
        return a == b
    return na == nb or _drop_trailing_zero(na) == _drop_trailing_zero(nb)
