"""MBPP (issue 13): the 3-shot prompt is the very string lm-evaluation-harness's `mbpp` task builds (its
installed YAML, pointed at a small data file this test writes); canonical solutions pass in the sandbox,
broken ones fail, pass@1 through the harness counts them; the original single-file mbpp.jsonl layout
splits by the paper's task_id ranges; a missing file is a one-line error."""

import ast
import json
import re

import pytest

PROBLEMS = [  # (task_id, text, code, tests, setup)
    (
        11,
        "Write a function to add two numbers.",
        "def add(a, b):\r\n  return a + b",
        ["assert add(1, 2) == 3", "assert add(0, 0) == 0", "assert add(-1, 1) == 0"],
        "",
    ),
    (
        12,
        "Write a function to reverse a string.",
        "def rev(s):\n    return s[::-1]",
        ["assert rev('ab') == 'ba'", "assert rev('') == ''", "assert rev('abc') == 'cba'"],
        "",
    ),
    (
        13,
        "Write a function that scales by the constant K.",
        "def scale(x):\n    return K * x",
        ["assert scale(2) == 6", "assert scale(0) == 0", "assert scale(-1) == -3"],
        "K = 3",
    ),
]
BROKEN = [
    "def add(a, b):\n    return a - b",
    "def rev(s):\n    while True: pass",
    "def scale(x):\n    return x",
]


def _lm_eval_shots():
    """lm-eval's own mbpp few-shot rows (utils.list_fewshot_samples), read without importing utils.py
    (it loads HF evaluate's code_eval metric at import)."""
    lm_eval = pytest.importorskip("lm_eval")
    src = open(lm_eval.__path__[0] + "/tasks/mbpp/utils.py").read()
    fn = next(n for n in ast.parse(src).body if getattr(n, "name", "") == "list_fewshot_samples")
    return ast.literal_eval(fn.body[0].value)


def _row(t):
    return {
        "task_id": t[0],
        "text": t[1],
        "code": t[2],
        "test_list": t[3],
        "test_setup_code": t[4],
        "challenge_test_list": [],
    }


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("mbpp-data")
    full = root / "mbpp/full"
    full.mkdir(parents=True)
    shots = [
        {k: v for k, v in s.items() if k != "is_fewshot"} | {"test_setup_code": ""} for s in _lm_eval_shots()
    ]
    first = {
        "task_id": 1,
        "text": "A first prompt the paper does not use.",
        "code": "x = 1",
        "test_list": ["assert x == 1"] * 3,
        "test_setup_code": "",
    }
    with open(full / "prompt-00000-of-00001.jsonl", "w") as f:
        for r in [first, *shots]:
            f.write(json.dumps(r) + "\n")
    with open(full / "test-00000-of-00001.jsonl", "w") as f:
        for t in PROBLEMS:
            f.write(json.dumps(_row(t)) + "\n")
    return root


def test_prompt_equals_lm_eval(data, tmp_path, monkeypatch):
    lm_eval = pytest.importorskip("lm_eval")
    evaluate = pytest.importorskip("evaluate")

    class NoMetric:  # lm-eval's mbpp utils.py loads code_eval (a download) at import; scoring is ours
        def compute(self, **kw):
            return [{"pass@1": 1.0}], None

    monkeypatch.setattr(evaluate, "load", lambda *a, **k: NoMetric())
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from lm_eval.tasks import TaskManager, get_task_dict

    from qwen2.eval import mbpp

    tdir = lm_eval.__path__[0] + "/tasks/mbpp"
    text = open(f"{tdir}/mbpp.yaml").read().replace("task: mbpp", "task: mbpp_local")
    text = re.sub(r"(?m)^dataset_(path|name):.*\n", "", text)
    text = (
        "dataset_path: json\ndataset_kwargs:\n  data_files:\n"
        + f"    test: {data}/mbpp/full/test-00000-of-00001.jsonl\n"
        + text
    )
    (tmp_path / "mbpp_local.yaml").write_text(text)
    (tmp_path / "utils.py").write_text(open(f"{tdir}/utils.py").read())
    task = get_task_dict(["mbpp_local"], TaskManager(include_path=str(tmp_path)))["mbpp_local"]
    task.set_config("num_fewshot", 3)
    task.build_all_requests(rank=0, world_size=1)
    theirs = [i.args for i in sorted(task.instances, key=lambda i: i.doc_id)]
    docs = mbpp.load(data, 3)
    assert [a[0] for a in theirs] == [d["prompt"] for d in docs]
    assert all(a[1]["until"] == mbpp.STOP for a in theirs)
    assert docs[0]["prompt"].count("[DONE]") == 3 and "A first prompt" not in docs[0]["prompt"]


def test_canonical_pass_broken_fail(data):
    from qwen2.eval import mbpp

    docs = mbpp.load(data, 3)
    assert [mbpp.score(d, d["reference"])["pass@1"] for d in docs] == [1.0, 1.0, 1.0]  # 13 needs its setup
    assert [mbpp.score(d, b) for d, b in zip(docs, BROKEN)] == [
        {"pass@1": 0.0, "result": "failed"},
        {"pass@1": 0.0, "result": "timeout"},
        {"pass@1": 0.0, "result": "failed"},
    ]


class Scripted:
    def __init__(self, answers):
        self.answers = answers

    def generate(self, prompts, stop, max_tokens):
        return [self.answers[p] for p in prompts]

    def sample(self, prompts, n, *, temperature, top_p=1.0, max_tokens, stop=(), seed=None):
        return [[self.answers[p], "pass"][:n] + ["pass"] * (n - 2) for p in prompts]


def test_pass_at_1_through_the_harness(data, tmp_path):
    from qwen2.eval import mbpp
    from qwen2.eval.harness import run_task

    docs = mbpp.load(data, 3)
    answers = {
        docs[0]["prompt"]: docs[0]["reference"],
        docs[1]["prompt"]: BROKEN[1],
        docs[2]["prompt"]: docs[2]["reference"],
    }
    r = run_task(Scripted(answers), "mbpp", mbpp, tmp_path / "a", data_dir=data)
    assert r["pass@1"] == pytest.approx(2 / 3) and r["n"] == 3 and r["shots"] == 3
    r = run_task(Scripted(answers), "mbpp", mbpp, tmp_path / "b", data_dir=data, samples=4)
    assert r["pass@1"] == pytest.approx((1 / 4 + 0 + 1 / 4) / 3)  # one good sample of 4 for 11 and 13


def test_original_single_file_layout_and_missing_data(tmp_path):
    from qwen2.eval import mbpp

    rows = [
        _row((i, f"task {i}", f"def f{i}(): return {i}", [f"assert f{i}() == {i}"] * 3, ""))
        for i in (1, 2, 3, 4, 5, 11, 12, 510, 511)
    ]
    (tmp_path / "mbpp").mkdir()
    (tmp_path / "mbpp/mbpp.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    docs = mbpp.load(tmp_path, 3)
    assert [d["id"] for d in docs] == ["11", "12", "510"]
    assert (
        "task 2" in docs[0]["prompt"] and "task 4" in docs[0]["prompt"] and "task 5" not in docs[0]["prompt"]
    )
    with pytest.raises(FileNotFoundError, match="mbpp/full/test-"):
        mbpp.load(tmp_path / "absent", 3)
