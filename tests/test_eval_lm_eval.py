"""Agreement with lm-evaluation-harness (issue 13): on a small Qwen2 checkpoint saved by our code and
small MMLU-, ARC- and GSM8K-format files, the prompts our tasks build are the very strings lm-eval's
own task configs build (its installed YAML templates, pointed at the local files), our per-choice
log-likelihoods equal lm-eval's `hf` model (HFLM.loglikelihood on its own requests) within 1e-4, and
the accuracies are identical. Offline: nothing is downloaded."""

import re

import pytest

lm_eval = pytest.importorskip("lm_eval", reason="lm-eval is in the `test` extra: pip install -e '.[test]'")

from eval_data import write_data  # noqa: E402

TEMPLATES = lm_eval.__path__[0] + "/tasks"


def _with_local_files(yaml_text: str, fmt: str, files: dict) -> str:
    """lm-eval's task YAML with its dataset_path / dataset_name replaced by local data files."""
    text = re.sub(r"(?m)^dataset_(path|name):.*\n", "", yaml_text)
    lines = "".join(f"    {split}: {path}\n" for split, path in files.items())
    return f"dataset_path: {fmt}\ndataset_kwargs:\n  data_files:\n{lines}" + text


@pytest.fixture(scope="module")
def lm_tasks(tmp_path_factory):
    """Our data files, and lm-eval tasks over them built from lm-eval's installed YAML templates."""
    root = write_data(tmp_path_factory.mktemp("eval-data"))
    cfg = tmp_path_factory.mktemp("lm-eval-tasks")
    mmlu = open(f"{TEMPLATES}/mmlu/default/_default_template_yaml").read()
    subject = open(f"{TEMPLATES}/mmlu/default/mmlu_high_school_biology.yaml").read()
    desc = re.search(r'"description": (".*?\\n\\n")', subject.replace("\\\n  \\", ""), re.S).group(1)
    (cfg / "mmlu_local.yaml").write_text(
        "task: mmlu_local\n"
        + f"description: {desc}\n"
        + _with_local_files(
            mmlu, "parquet", {s: str(root / f"mmlu/all/{s}-00000-of-00001.parquet") for s in ("dev", "test")}
        )
    )
    arc = open(f"{TEMPLATES}/arc/arc_easy.yaml").read().replace("task: arc_easy", "task: arc_local")
    (cfg / "arc_local.yaml").write_text(
        _with_local_files(
            arc,
            "json",
            {
                s: str(root / f"ARC-Challenge/{s}-00000-of-00001.jsonl")
                for s in ("train", "validation", "test")
            },
        )
    )
    gsm = open(f"{TEMPLATES}/gsm8k/gsm8k.yaml").read().replace("task: gsm8k", "task: gsm8k_local")
    (cfg / "gsm8k_local.yaml").write_text(
        _with_local_files(
            gsm, "json", {s: str(root / f"gsm8k/main/{s}-00000-of-00001.jsonl") for s in ("train", "test")}
        )
    )
    from lm_eval.tasks import TaskManager, get_task_dict

    tasks = get_task_dict(["mmlu_local", "arc_local", "gsm8k_local"], TaskManager(include_path=str(cfg)))
    return root, tasks


def _requests(task, shots):
    """lm-eval's requests for every doc, as simple_evaluate builds them (fewshot seed 1234)."""
    task.set_config("num_fewshot", shots)
    task.set_fewshot_seed(1234)
    task.build_all_requests(rank=0, world_size=1)
    by_doc = {}
    for inst in task.instances:
        by_doc.setdefault(inst.doc_id, []).append(inst)
    return [sorted(v, key=lambda i: i.idx) for _, v in sorted(by_doc.items())]


@pytest.mark.slow
@pytest.mark.parametrize("name,ours,shots", [("mmlu_local", "mmlu", 5), ("arc_local", "arc_challenge", 5)])
def test_loglikelihoods_prompts_and_accuracy_equal_lm_eval_hf(
    name, ours, shots, lm_tasks, tiny_chat_checkpoint, monkeypatch
):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from lm_eval.models.huggingface import HFLM

    from qwen2.checkpoint import load_model
    from qwen2.eval.harness import InProcess, choice_metrics, load_task
    from qwen2.tokenizer.bpe import load_tokenizer

    root, tasks = lm_tasks
    task = tasks[name]
    reqs = _requests(task, shots)
    _, module = load_task(ours)
    docs = module.load(root, shots)
    assert len(docs) == len(reqs)
    for d, insts in zip(docs, reqs, strict=False):  # the exact prompt strings and continuations
        assert [i.args for i in insts] == [(d["prompt"], c) for c in d["continuations"]]

    hf = HFLM(pretrained=str(tiny_chat_checkpoint), device="cpu", dtype="float32", batch_size=1)
    theirs = hf.loglikelihood([i for insts in reqs for i in insts])
    backend = InProcess(load_model(tiny_chat_checkpoint), load_tokenizer(tiny_chat_checkpoint), batch_size=4)
    mine = backend.loglikelihood([i.args for insts in reqs for i in insts])
    for (a, ga), (b, gb) in zip(mine, theirs, strict=False):
        assert a == pytest.approx(b, abs=1e-4)
        assert ga == gb
    k, acc_theirs, acc_mine = 0, [], []
    for d, insts, doc in zip(docs, reqs, task.eval_docs, strict=False):
        res = theirs[k : k + len(insts)]
        acc_theirs.append(task.process_results(doc, res))
        acc_mine.append(choice_metrics(d, mine[k : k + len(insts)]))
        k += len(insts)
    for metric in module.METRICS:
        assert [m[metric] for m in acc_mine] == [float(m[metric]) for m in acc_theirs], metric


@pytest.mark.slow
def test_gsm8k_prompts_equal_lm_eval(lm_tasks):
    from qwen2.eval.harness import load_task

    root, tasks = lm_tasks
    reqs = _requests(tasks["gsm8k_local"], 5)
    docs = load_task("gsm8k")[1].load(root, 5)
    assert [r[0].args[0] for r in reqs] == [d["prompt"] for d in docs]
    assert set(reqs[0][0].args[1]["until"]) <= set(load_task("gsm8k")[1].STOP)
