"""End to end: `qwen2 synth rejection` (the CLI, in a subprocess) against our own server on the tiny
random checkpoint (conftest's start_server): every item sampled k times, logged once, and the outputs
readable by the post-training loaders."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from qwen2.data.conversations import load_preferences, load_sft, prompt_messages

ROOT = Path(__file__).resolve().parents[1]


def test_rejection_against_qwen2_serve(tmp_path, start_server, tok):
    srv = start_server()
    rows = [{"id": f"p{i}", "question": f"What is {i} plus 1?", "answer": str(i + 1)} for i in range(3)]
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    cmd = [
        sys.executable,
        "-m",
        "qwen2.cli",
        "synth",
        "rejection",
        str(inp),
        "--out",
        str(out),
        "--base-url",
        srv.url + "/v1",
        "--k",
        "2",
        "--max-tokens",
        "8",
        "--chunk",
        "2",
    ]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    manifest = json.loads((out / "manifest.json").read_text())
    assert (
        manifest["model"] == "tiny"
        and manifest["counts"]["items"] == 3
        and manifest["counts"]["samples"] == 6
    )
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert sorted(rec["id"] for rec in log) == ["p0", "p1", "p2"]
    assert all(
        len(rec["samples"]) == 2 and all(isinstance(s["text"], str) for s in rec["samples"]) for rec in log
    )
    # a random model is rarely right; whatever it kept is valid post-training data
    sft = load_sft(out / "sft.jsonl", tok) if (out / "sft.jsonl").read_text() else []
    assert len(sft) == manifest["counts"]["sft"] == manifest["counts"]["correct"]
    if (out / "preference.jsonl").read_text():
        load_preferences(out / "preference.jsonl", tok)


def synth(pipeline: str, inp: Path, out: Path, *args: str) -> dict:
    """Run `qwen2 synth PIPELINE` in a subprocess; assert exit 0; return the manifest it wrote."""
    cmd = [sys.executable, "-m", "qwen2.cli", "synth", pipeline, str(inp), "--out", str(out), *args]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, f"{pipeline}: {r.stderr[-2000:]}"
    return json.loads((out / "manifest.json").read_text())


def write_rows(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def log_ids(out: Path) -> list[str]:
    return sorted(rec["id"] for rec in jsonl(out / "log.jsonl"))


def served(srv) -> list[str]:
    return ["--base-url", srv.url + "/v1", "--max-tokens", "8", "--chunk", "2"]


def test_execution_against_qwen2_serve(tmp_path, start_server, tok):
    srv = start_server()
    rows = [
        {"id": "add", "prompt": "Write add(a, b) returning a + b.", "tests": "assert add(1, 2) == 3\n"},
        {"id": "neg", "prompt": "Write neg(x) returning -x.", "tests": "assert neg(2) == -2\n"},
        {"id": "sq", "prompt": "Write sq(x) returning x * x."},  # no tests: the model writes them
    ]
    out = tmp_path / "out"
    m = synth(
        "execution", write_rows(tmp_path / "in.jsonl", rows), out, *served(srv),
        "--feedback-retries", "1", "--run-timeout", "5",
    )  # fmt: skip
    assert m["pipeline"] == "execution" and m["model"] == "tiny" and m["counts"]["items"] == 3
    log = jsonl(out / "log.jsonl")
    assert log_ids(out) == ["add", "neg", "sq"]
    for rec in log:  # every attempt has a sandbox status; a failed first try was retried once
        assert 1 <= len(rec["attempts"]) <= 2 and all(a["status"] for a in rec["attempts"])
        assert rec["passed"] == (rec["attempts"][-1]["status"] == "passed")
        assert rec["passed"] or len(rec["attempts"]) == 2
    assert {r["id"]: r["tests"] for r in log}["add"] == rows[0]["tests"]
    assert m["counts"]["attempts"] == sum(len(r["attempts"]) for r in log)
    sft = load_sft(out / "sft.jsonl", tok) if (out / "sft.jsonl").read_text() else []
    assert len(sft) == m["counts"]["sft"] == m["counts"]["passed"] == sum(r["passed"] for r in log)


def test_execution_constraints_against_qwen2_serve(tmp_path, start_server, tok):
    srv = start_server()
    rows = [
        {"id": "a", "prompt": "Say hi.", "constraints": [{"type": "max_words", "value": 50}]},
        {"id": "b", "prompt": "Name a fruit.", "constraints": [{"type": "keywords", "value": ["apple"]}]},
    ]
    out = tmp_path / "out"
    m = synth(
        "execution", write_rows(tmp_path / "in.jsonl", rows), out, *served(srv), "--constraints", "--k", "2"
    )
    assert m["pipeline"] == "instructions" and m["counts"]["items"] == 2 and m["counts"]["samples"] == 4
    log = jsonl(out / "log.jsonl")
    assert log_ids(out) == ["a", "b"] and all(len(r["samples"]) == 2 for r in log)
    # 8 tokens are at most 8 words: max_words 50 always holds
    assert all(s["failed"] == [] for s in log[0]["samples"])
    sft = load_sft(out / "sft.jsonl", tok)
    assert len(sft) == m["counts"]["sft"] == sum(not s["failed"] for r in log for s in r["samples"])
    if (out / "preference.jsonl").read_text():
        load_preferences(out / "preference.jsonl", tok)


def test_evolve_against_qwen2_serve(tmp_path, start_server):
    srv = start_server()
    rows = [{"id": f"e{i}", "prompt": f"Explain why the sky is blue, part {i}."} for i in range(3)]
    out = tmp_path / "out"
    m = synth("evolve", write_rows(tmp_path / "in.jsonl", rows), out, *served(srv), "--rounds", "1")
    assert m["counts"]["items"] == 3
    log = jsonl(out / "log.jsonl")
    assert log_ids(out) == ["e0", "e1", "e2"]
    assert all(len(r["steps"]) == 1 and r["steps"][0]["op"] in ("deepen", "broaden") for r in log)
    kept = jsonl(out / "prompts.jsonl") if (out / "prompts.jsonl").read_text() else []
    dropped = m["counts"]["dropped"]
    # every item is kept or dropped with a reason, exactly once
    assert len(kept) + sum(dropped.values()) == 3 == m["counts"]["kept"] + sum(dropped.values())
    assert set(dropped) <= {"refusal", "copy", "too_short"}
    assert sorted(k["source_id"] for k in kept) == sorted(
        r["id"] for r in log if not r["steps"][0]["dropped"]
    )
    assert all(prompt_messages(k, "prompts.jsonl")[0]["role"] == "user" for k in kept)


def test_tag_then_select_against_qwen2_serve(tmp_path, start_server):
    srv = start_server()
    rows = [{"id": f"t{i}", "prompt": f"Sort a list of {i + 2} numbers in Python."} for i in range(3)]
    out = tmp_path / "tag"
    m = synth("tag", write_rows(tmp_path / "in.jsonl", rows), out, *served(srv))
    c = m["counts"]
    assert c["items"] == 3 and c["tagged"] + c["unparsed"] == 3
    log = jsonl(out / "log.jsonl")
    assert log_ids(out) == ["t0", "t1", "t2"] and all(isinstance(r["raw"], str) for r in log)
    tagged = jsonl(out / "tagged.jsonl") if (out / "tagged.jsonl").read_text() else []
    assert [t["id"] for t in tagged] == [r["id"] for r in log if r["tags"] is not None]
    assert len(tagged) == c["tagged"] and all(isinstance(t["tags"], list) for t in tagged)
    # random text rarely parses as a JSON list: select also gets a hand-tagged file, plus what tag wrote
    extra = [{"id": "h0", "prompt": "Reverse a string.", "tags": ["string", "python"]},
             {"id": "h1", "prompt": "Add two numbers.", "tags": ["math"]}]  # fmt: skip
    sel_in = write_rows(tmp_path / "tagged_plus.jsonl", tagged + extra)
    sm = synth("select", sel_in, tmp_path / "sel", "--size", "2")
    selected = jsonl(tmp_path / "sel" / "selected.jsonl")
    assert sm["counts"]["items"] == len(tagged) + 2 and sm["counts"]["selected"] == len(selected) == 2
    assert len({s["id"] for s in selected}) == 2
    assert all(prompt_messages(s, "selected.jsonl")[0]["role"] == "user" for s in selected)


def test_constitutional_against_qwen2_serve(tmp_path, start_server, tok):
    srv = start_server()
    principles = tmp_path / "principles.txt"
    principles.write_text("Be honest.\nBe brief.\n")
    rows = [
        {"id": "c0", "prompt": "How do I boil an egg?", "response": "Put it in a microwave."},
        {"id": "c1", "prompt": "What is the capital of France?"},  # no response: one is sampled
    ]
    out = tmp_path / "out"
    m = synth(
        "constitutional", write_rows(tmp_path / "in.jsonl", rows), out, *served(srv),
        "--principles", str(principles),
    )  # fmt: skip
    assert m["params"]["principles"] == str(principles) and m["counts"]["items"] == 2
    log = jsonl(out / "log.jsonl")
    assert log_ids(out) == ["c0", "c1"]
    assert {r["id"]: r["original"] for r in log}["c0"] == "Put it in a microwave."
    revised = [r for r in log if r["revised"]]
    sft = load_sft(out / "sft.jsonl", tok) if (out / "sft.jsonl").read_text() else []
    assert len(sft) == m["counts"]["sft"] == m["counts"]["revised"] == len(revised)
    pref = load_preferences(out / "preference.jsonl", tok) if (out / "preference.jsonl").read_text() else []
    assert (
        len(pref)
        == m["counts"]["preference"]
        == sum(r["revised"].strip() != r["original"].strip() for r in revised)
    )


def test_constitutional_missing_principles_is_one_line_error(tmp_path, start_server):
    srv = start_server()
    inp = write_rows(tmp_path / "in.jsonl", [{"prompt": "hi"}])
    missing = str(tmp_path / "nope.txt")
    cmd = [sys.executable, "-m", "qwen2.cli", "synth", "constitutional", str(inp),
           "--out", str(tmp_path / "o"), *served(srv), "--principles", missing]  # fmt: skip
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "--principles" in r.stderr and "Traceback" not in r.stderr


def test_decontaminate_cli(tmp_path):
    """No server: decontaminate uses no endpoint (no --base-url flag); the CLI end to end."""
    evald = tmp_path / "eval"
    evald.mkdir()
    leak = "the quick brown fox jumps over the lazy dog near the quiet river bank at dawn"
    write_rows(evald / "task.jsonl", [{"question": leak, "answer": "x"}])
    rows = [
        {"id": "d0", "messages": [{"role": "user", "content": "Q: " + leak + " today?"}]},
        {"id": "d1", "messages": [{"role": "user", "content": "What is two plus two?"}]},
    ]
    out = tmp_path / "out"
    m = synth("decontaminate", write_rows(tmp_path / "in.jsonl", rows), out, "--eval-data", str(evald))
    clean, dropped = jsonl(out / "clean.jsonl"), jsonl(out / "dropped.jsonl")
    assert [r["id"] for r in clean] == ["d1"] and [r["id"] for r in dropped] == ["d0"]
    report = json.loads((out / "report.json").read_text())
    assert [d["id"] for d in report["dropped"]] == ["d0"] and m["pipeline"] == "decontaminate"
