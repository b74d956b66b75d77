"""The eval harness (issue 13): a kill -9 of `qwen2 eval` resumes without re-scoring finished samples;
--base-url against our own server gives the scores of the in-process backend; the shared-prefix
log-likelihood equals a plain forward pass; a missing data file is a one-line error naming the place."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from eval_data import write_data

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_data(tmp_path_factory.mktemp("eval-data"))


@pytest.fixture(scope="module")
def backend(tiny_chat_checkpoint):
    from qwen2.checkpoint import load_model
    from qwen2.eval.harness import InProcess
    from qwen2.tokenizer.bpe import load_tokenizer

    return InProcess(load_model(tiny_chat_checkpoint), load_tokenizer(tiny_chat_checkpoint), batch_size=4)


def test_shared_prefix_loglikelihood_equals_a_full_forward(backend):
    from qwen2.eval.harness import encode_pair

    pairs = [
        ("The capital of France is", " Paris"),
        ("The capital of France is", " a big city"),
        ("The capital of Spain is", " Madrid and more"),
        ("The capital of Spain is ", "Madrid"),
    ]
    got = backend.loglikelihood(pairs)
    for (ctx, cont), (ll, greedy) in zip(pairs, got, strict=False):
        c, x = encode_pair(backend.tokenizer, ctx, cont)
        with torch.no_grad():
            lp = torch.log_softmax(backend.model(torch.tensor([c + x]))[0].float(), -1)[len(c) - 1 : -1]
        want = lp[torch.arange(len(x)), torch.tensor(x)]
        assert ll == pytest.approx(want.sum().item(), abs=1e-4)
        assert greedy == bool((lp.argmax(-1) == torch.tensor(x)).all())


def test_missing_data_is_one_line_naming_the_place(tmp_path, backend):
    from qwen2.eval.harness import evaluate

    with pytest.raises(FileNotFoundError) as e:
        evaluate(backend.model, "mmlu", data_dir=tmp_path, tokenizer=backend.tokenizer)
    assert "\n" not in str(e.value) and "mmlu/all/dev-*.parquet" in str(e.value)


def _lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.slow
def test_kill_9_resumes_without_rescoring(tiny_chat_checkpoint, tmp_path, monkeypatch):
    from eval_data import write_jsonl
    from qwen2.eval import harness

    rows = [
        {
            "question": f"question number {i} about cells?",
            "subject": "anatomy",
            "choices": ["a", "b", "c", "d"],
            "answer": i % 4,
        }
        for i in range(40)
    ]
    write_jsonl(tmp_path / "data/mmlu/dev/anatomy.jsonl", rows[:5])
    write_jsonl(tmp_path / "data/mmlu/test/anatomy.jsonl", rows[5:])
    out = tmp_path / "out"
    # The child scores at most a question per 0.5 s, so the kill below lands mid-run on any machine
    # (unslowed, a fast machine finished all 35 between two polls).
    slow = (
        "import sys, time; from qwen2.eval import harness; from qwen2.cli.eval import main; "
        "real = harness.InProcess.loglikelihood; "
        "harness.InProcess.loglikelihood = lambda self, pairs: time.sleep(0.5) or real(self, pairs); "
        "sys.exit(main())"
    )
    cmd = [
        sys.executable,
        "-c",
        slow,
        "--model",
        str(tiny_chat_checkpoint),
        "--tasks",
        "mmlu",
        "--data",
        str(tmp_path / "data"),
        "--out",
        str(out),
    ]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    samples = out / "samples/mmlu.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and not (samples.exists() and samples.read_text().count("\n") >= 1):
        time.sleep(0.2)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    before = _lines(samples)
    assert 1 <= len(before) < 35, "the run was killed while scoring"

    scored = []
    real = harness.InProcess.loglikelihood
    monkeypatch.setattr(
        harness.InProcess, "loglikelihood", lambda self, pairs: scored.extend(pairs) or real(self, pairs)
    )
    results = harness.evaluate(str(tiny_chat_checkpoint), "mmlu", data_dir=tmp_path / "data", out=out)
    after = _lines(samples)
    assert after[: len(before)] == before  # finished samples kept as written
    assert sorted(r["id"] for r in after) == sorted({r["id"] for r in after})  # each sample once
    assert len(after) == 35 and results["mmlu"]["n"] == 35
    assert len(scored) == 4 * (35 - len(before))  # only the unfinished ones were scored
    assert json.loads((out / "results.json").read_text())["mmlu"]["acc"] == pytest.approx(
        sum(r["acc"] for r in after) / 35
    )
    assert (out / "report.md").read_text().count("| mmlu | acc |") == 1


@pytest.mark.slow
def test_base_url_gives_the_in_process_scores(start_server, data, tmp_path, monkeypatch):
    from qwen2.eval import gsm8k
    from qwen2.eval.harness import evaluate

    monkeypatch.setattr(gsm8k, "MAX_TOKENS", 12)
    srv = start_server()
    kw = dict(data_dir=data, limit=3, shots=2, tokenizer=srv.tokenizer)
    local = evaluate(srv.model, "mmlu,arc_challenge,gsm8k", out=tmp_path / "local", **kw)
    remote = evaluate(srv.url, "mmlu,arc_challenge,gsm8k", out=tmp_path / "remote", concurrency=4, **kw)
    assert local == remote
    for task in ("mmlu", "arc_challenge"):
        for a, b in zip(
            _lines(tmp_path / f"local/samples/{task}.jsonl"),
            _lines(tmp_path / f"remote/samples/{task}.jsonl"),
            strict=False,
        ):
            assert a["lls"] == pytest.approx(b["lls"], abs=1e-3)
            assert a["pred"] == b["pred"]
    outs = [[r["output"] for r in _lines(tmp_path / f"{w}/samples/gsm8k.jsonl")] for w in ("local", "remote")]
    assert outs[0] == outs[1]
