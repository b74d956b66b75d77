"""End to end: `qwen2 synth rejection` (the CLI, in a subprocess) against our own server on the tiny
random checkpoint (conftest's start_server): every item sampled k times, logged once, and the outputs
readable by the post-training loaders."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from qwen2.data.conversations import load_preferences, load_sft

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
