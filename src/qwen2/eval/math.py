"""MATH (Hendrycks et al.; paper section 5.1.1: 4-shot), in the Minerva format lm-evaluation-harness's
`minerva_math` uses: "Problem:\n{problem}\n\nSolution:" after Minerva's 4 worked examples, greedy
decoding stopped at "Problem:", the boxed (or "The final answer is") answer compared with the
reference's boxed answer by answers.math_equal (equivalence of normalised expressions).

Data (hendrycks MATH / EleutherAI/hendrycks_math): DATA/math/test/**/*.json (one problem a file, the
original release), or DATA/math/**/test-*.parquet / DATA/math/test*.jsonl; fields problem, solution.
"""

from __future__ import annotations

import json
import re

from qwen2.eval.harness import find_data, read_rows

KIND = "generate"
SHOTS = 4
METRICS = ("exact_match",)
STOP = ["Problem:", "</s>", "<|im_end|>"]
MAX_TOKENS = 512
WHAT = "hendrycks MATH's test problems (fields problem, solution)"
PATTERNS = ["math/test/**/*.json", "math/**/test-*.parquet", "math/test*.jsonl", "math/**/test*.jsonl"]
SHOT_EXAMPLES = [  # Minerva's 4 (Lewkowycz et al. 2022), as lm-eval's minerva_math holds them
    (
        "Find the domain of the expression  $\\frac{\\sqrt{x-2}}{\\sqrt{5-x}}$.",
        "The expressions inside each square root must be non-negative. Therefore, $x-2 \\g"
        "e 0$, so $x\\ge2$, and $5 - x \\ge 0$, so $x \\le 5$. Also, the denominator cannot "
        "be equal to zero, so $5-x>0$, which gives $x<5$. Therefore, the domain of the ex"
        "pression is $\\boxed{[2,5)}$.\nFinal Answer: The final answer is $[2,5)$. I hope i"
        "t is correct.",
    ),
    (
        "If $\\det \\mathbf{A} = 2$ and $\\det \\mathbf{B} = 12,$ then find $\\det (\\mathbf{A}"
        " \\mathbf{B}).$",
        "We have that $\\det (\\mathbf{A} \\mathbf{B}) = (\\det \\mathbf{A})(\\det \\mathbf{B}) "
        "= (2)(12) = \\boxed{24}.$\nFinal Answer: The final answer is $24$. I hope it is co"
        "rrect.",
    ),
    (
        "Terrell usually lifts two 20-pound weights 12 times. If he uses two 15-pound wei"
        "ghts instead, how many times must Terrell lift them in order to lift the same to"
        "tal weight?",
        "If Terrell lifts two 20-pound weights 12 times, he lifts a total of $2\\cdot 12\\c"
        "dot20=480$ pounds of weight.  If he lifts two 15-pound weights instead for $n$ t"
        "imes, he will lift a total of $2\\cdot15\\cdot n=30n$ pounds of weight.  Equating "
        "this to 480 pounds, we can solve for $n$:\n\\begin{align*}\n30n&=480\\\\\n\\Rightarrow\\"
        "qquad n&=480/30=\\boxed{16}\n\\end{align*}\nFinal Answer: The final answer is $16$. "
        "I hope it is correct.",
    ),
    (
        "If the system of equations\n\n\\begin{align*}\n6x-4y&=a,\\\\\n6y-9x &=b.\n\\end{align*}ha"
        "s a solution $(x, y)$ where $x$ and $y$ are both nonzero,\nfind $\\frac{a}{b},$ as"
        "suming $b$ is nonzero.",
        "If we multiply the first equation by $-\\frac{3}{2}$, we obtain\n\n$$6y-9x=-\\frac{3"
        "}{2}a.$$Since we also know that $6y-9x=b$, we have\n\n$$-\\frac{3}{2}a=b\\Rightarrow"
        "\\frac{a}{b}=\\boxed{-\\frac{2}{3}}.$$\nFinal Answer: The final answer is $-\\frac{2}"
        "{3}$. I hope it is correct.",
    ),
]


def question(problem: str) -> str:
    return f"Problem:\n{problem}\n\nSolution:"


def final_answer(output: str) -> str | None:
    """The boxed answer, else Minerva's "Final Answer: The final answer is X. I hope it is correct."."""
    from qwen2.eval.answers import extract_boxed

    boxed = extract_boxed(output)
    if boxed is not None:
        return boxed
    m = re.search(r"final answer is \$?(.*?)\$?\. I hope", output)
    return m.group(1).strip() if m else None


def load(data_dir, shots: int) -> list[dict]:
    from qwen2.eval.answers import extract_boxed

    rows = []
    for f in find_data(data_dir, "math", PATTERNS, WHAT):
        if f.suffix == ".json":  # the original release: one problem a file, its name the stable id
            rows.append(dict(json.loads(f.read_text()), _id=f"{f.parent.name}/{f.stem}"))
        else:
            rows += [dict(r, _id=f"{f.stem}/{i}") for i, r in enumerate(read_rows(f))]
    prefix = "".join(f"{question(p)} {s}\n\n" for p, s in SHOT_EXAMPLES[:shots])
    docs = []
    for r in rows:
        docs.append(
            {
                "id": r["_id"],
                "prompt": prefix + question(r["problem"]),
                "reference": r.get("answer") or extract_boxed(r["solution"]),
            }
        )
    return docs


def score(doc: dict, output: str) -> dict:
    from qwen2.eval.answers import math_equal

    got = final_answer(output)
    return {"exact_match": float(bool(math_equal(got, doc["reference"]))), "extracted": got}
