"""lm-evaluation-harness's `local-completions` model scores a small log-likelihood task through the
server (echo + logprobs over token-id prompts), and its numbers equal a direct forward pass.

The task is built here (a YAML task over a JSONL file in a temporary folder); the tokenizer lm-eval
uses is the checkpoint folder's, read by transformers' AutoTokenizer offline. Nothing is downloaded.
"""

import json

import pytest
import torch

lm_eval = pytest.importorskip("lm_eval", reason="lm-eval is in the `test` extra: pip install -e '.[test]'")

DOCS = [
    {"context": "The capital of France is", "continuation": " Paris"},
    {"context": "Two plus two equals", "continuation": " four"},
    {"context": "def add(a, b):\n    return", "continuation": " a + b"},
    {"context": "Once upon a time, there", "continuation": " was a princess who lived in a castle."},
    {"context": "日本の首都は", "continuation": "東京です。"},
]


def direct_loglikelihood(model, tokenizer, context: str, continuation: str) -> tuple[float, bool]:
    """As lm-eval splits a pair (whole text encoded, context prefix removed), scored by one forward."""
    whole = tokenizer.encode(context + continuation)
    ctx = tokenizer.encode(context)
    cont = whole[len(ctx) :]
    with torch.no_grad():
        lp = torch.log_softmax(model(torch.tensor([whole]))[0].float(), -1)  # [T, V]
    rows = lp[len(ctx) - 1 : len(whole) - 1]  # position p predicts token p + 1
    picked = rows[torch.arange(len(cont)), torch.tensor(cont)]
    return picked.sum().item(), bool((rows.argmax(-1) == torch.tensor(cont)).all())


@pytest.mark.slow  # ~40 s, most of it lm-eval's own start-up
def test_local_completions_loglikelihood_matches_a_forward_pass(
    start_server, tiny_chat_checkpoint, tmp_path, monkeypatch
):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    srv = start_server()
    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    (tmp_path / "tiny_ll.yaml").write_text(
        "task: qwen2_tiny_loglikelihood\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\n"
        "output_type: loglikelihood\n"
        'doc_to_text: "{{context}}"\n'
        'doc_to_target: "{{continuation}}"\n'
        "metric_list:\n  - metric: perplexity\n  - metric: acc\n"
    )
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    results = simple_evaluate(
        model="local-completions",
        model_args={
            "base_url": f"{srv.url}/v1/completions",
            "model": "tiny",
            "tokenizer": str(tiny_chat_checkpoint),
            "tokenizer_backend": "huggingface",
            "tokenized_requests": True,
            "batch_size": 2,
            "max_retries": 1,
            "max_length": 2048,
        },
        tasks=["qwen2_tiny_loglikelihood"],
        task_manager=TaskManager(include_path=str(tmp_path)),
        log_samples=True,
    )
    samples = results["samples"]["qwen2_tiny_loglikelihood"]
    assert len(samples) == len(DOCS)
    for s in samples:
        resp = s["resps"][0]  # this request's response: (loglikelihood, is_greedy), maybe wrapped once
        ll, greedy = resp[0] if isinstance(resp[0], (list, tuple)) else resp
        want_ll, want_greedy = direct_loglikelihood(
            srv.model, srv.tokenizer, s["doc"]["context"], s["doc"]["continuation"]
        )
        assert ll == pytest.approx(want_ll, abs=1e-3), s["doc"]
        assert greedy == want_greedy
    assert not srv.engine.seqs  # every scoring request finished and freed its blocks
