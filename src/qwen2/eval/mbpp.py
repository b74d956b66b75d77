"""MBPP (Austin et al. 2021, arXiv 2108.07732; the paper's section 5 code benchmarks), in
lm-evaluation-harness's `mbpp` format: 3-shot with prompts 2-4 of the paper's prompt split, each shot
"You are an expert Python programmer, and here is your task: {text} Your code should pass these
tests:\\n\\n{test 1}\\n{test 2}\\n{test 3}\\n[BEGIN]\\n{code}\\n[DONE]", shots joined by "\\n\\n", then the
question's own text up to "[BEGIN]\\n"; greedy decoding until "[DONE]"; the raw completion, after the
problem's test_setup_code, run against its test_list in the sandbox: pass@1 (pass@k with --samples).
lm-eval leaves test_setup_code out; it is empty for all but a handful of problems, and those need it.

Data (Hugging Face google-research-datasets/mbpp, "full"): DATA/mbpp/full/{test,prompt}-*.parquet (or
.jsonl), columns task_id, text, code, test_list, test_setup_code; or the original mbpp.jsonl of all 974
problems at DATA/mbpp/mbpp.jsonl (test = task_ids 11-510, prompts = 1-10, as the paper splits it).
"""

from __future__ import annotations

from qwen2.eval.harness import find_data, read_rows

KIND = "generate"
SHOTS = 3
METRICS = ("pass@1",)
PASS_KS = (1, 10, 100)
STOP = ["[DONE]"]
MAX_TOKENS = 512
TIMEOUT = 10.0
WHAT = "google-research-datasets/mbpp's full files (columns task_id, text, code, test_list)"
TEST_IDS, PROMPT_IDS = range(11, 511), range(1, 11)  # the paper's split of the 974 problems
FIRST_SHOT = 2  # lm-eval and the paper's prompts: task_ids 2, 3, 4


def _split(data_dir, split: str, ids: range) -> list[dict]:
    pats = [f"mbpp/full/{split}-*.{e}" for e in ("parquet", "jsonl")]
    pats += [f"mbpp/{split}-*.{e}" for e in ("parquet", "jsonl")] + ["mbpp/mbpp.jsonl"]
    files = find_data(data_dir, "mbpp", pats, WHAT)
    rows = [r for f in files for r in read_rows(f)]
    if files[0].name == "mbpp.jsonl":  # the original single file: the paper's task_id ranges
        rows = [r for r in rows if int(r["task_id"]) in ids]
    for r in rows:
        missing = [k for k in ("task_id", "text", "code", "test_list") if k not in r]
        if missing:
            raise ValueError(f"mbpp: {files[0]}: a row lacks field(s) {', '.join(missing)} ({WHAT})")
    return sorted(rows, key=lambda r: int(r["task_id"]))


def question(doc: dict) -> str:
    tests = "\n".join(doc["test_list"][:3])
    return (
        f"You are an expert Python programmer, and here is your task: {doc['text']} "
        f"Your code should pass these tests:\n\n{tests}\n[BEGIN]\n"
    )


def load(data_dir, shots: int) -> list[dict]:
    test = _split(data_dir, "test", TEST_IDS)
    pool = (
        [r for r in _split(data_dir, "prompt", PROMPT_IDS) if int(r["task_id"]) >= FIRST_SHOT]
        if shots
        else []
    )
    if len(pool) < shots:
        raise ValueError(
            f"mbpp: {shots} shots need the prompt split's task_ids {FIRST_SHOT}.. ({len(pool)} found)"
        )
    prefix = "".join(f"{question(s)}{s['code']}\n[DONE]\n\n" for s in pool[:shots])
    return [
        {"id": str(d["task_id"]), "prompt": prefix + question(d), "reference": d["code"], "problem": d}
        for d in test
    ]


def program(problem: dict, completion: str) -> str:
    """The setup code, the completion, and the problem's asserts: the program the sandbox runs."""
    setup = problem.get("test_setup_code") or ""
    return "\n".join([setup, completion, *problem["test_list"]]) + "\n"


def _check(problem: dict, completion: str) -> tuple[bool, str]:
    from qwen2.eval.sandbox import run_program

    r = run_program(program(problem, completion), timeout=TIMEOUT)
    return r.status == "passed", r.status


def score(doc: dict, output: str) -> dict:
    passed, status = _check(doc["problem"], output)
    return {"pass@1": float(passed), "result": status}


def score_samples(doc: dict, outputs: list[str]) -> dict:
    """pass@k (k in PASS_KS, k <= len(outputs)) of one problem's sampled completions."""
    import os
    from concurrent.futures import ThreadPoolExecutor

    from qwen2.eval.humaneval import pass_at_k

    with ThreadPoolExecutor(min(4, os.cpu_count() or 1)) as pool:
        results = list(pool.map(lambda o: _check(doc["problem"], o), outputs))
    n, c = len(outputs), sum(p for p, _ in results)
    return {
        **{f"pass@{k}": pass_at_k(n, c, k) for k in PASS_KS if k <= n},
        "passed": [p for p, _ in results],
        "result": [s for _, s in results],
    }
