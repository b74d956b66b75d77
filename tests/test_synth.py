"""qwen2.synth against a scripted OpenAI-compatible server (tests/synth_server.py): each pipeline keeps
exactly what its checker accepts, writes records data.conversations reads back, resumes after kill -9
without redoing finished items, and survives a 429 / 500 / timeout storm without losing or duplicating
an item."""

from __future__ import annotations

import functools
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from qwen2.data.conversations import load_preferences, load_sft
from qwen2.eval.harness import Endpoint
from qwen2.synth.constitutional import constitutional
from qwen2.synth.decontaminate import decontaminate
from qwen2.synth.evolve import evolve
from qwen2.synth.execution import execution, instructions
from qwen2.synth.rejection import rejection
from qwen2.synth.tagging import select, select_items, tag
from synth_server import Scripted

ROOT = Path(__file__).resolve().parents[1]


def write(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@functools.cache
def qwen2_tokenizer():
    from qwen2.tokenizer.bpe import load_tokenizer

    return load_tokenizer("Qwen2")


def client(srv, **kw) -> Endpoint:
    return Endpoint(srv.url, qwen2_tokenizer(), concurrency=kw.pop("concurrency", 4), **kw)


def user_text(prompt: str) -> str:
    """The user turn of a ChatML prompt."""
    return prompt.split("<|im_start|>user\n", 1)[1].split("<|im_end|>", 1)[0]


# ---- rejection sampling ---------------------------------------------------------------------------
PROBLEMS = [{"id": f"q{i}", "question": f"What is {i} plus {i}?", "answer": str(2 * i)} for i in range(6)]


def math_reply(prompt, body):
    """Sample r of question i answers i*2 + (r % 3): exactly every third sample is correct."""
    i = int(re.search(r"What is (\d+) plus", prompt).group(1))
    return [f"Adding them. The answer is {2 * i + r % 3}." for r in range(body["n"])]


def test_rejection_keeps_exactly_the_correct_answers(tmp_path, tok):
    inp = write(tmp_path / "in.jsonl", PROBLEMS)
    with Scripted(math_reply) as srv:
        m = rejection(client(srv), inp, tmp_path / "out", k=6, chunk=4)
    sft = read(tmp_path / "out/sft.jsonl")
    assert m["counts"]["samples"] == 36 and m["counts"]["correct"] == 12 and len(sft) == 12
    for rec in sft:
        q = int(re.search(r"What is (\d+) plus", rec["messages"][0]["content"]).group(1))
        assert rec["messages"][1]["content"] == f"Adding them. The answer is {2 * q}."
    pref = read(tmp_path / "out/preference.jsonl")
    assert len(pref) == 6
    assert all(p["chosen"][0]["content"] != p["rejected"][0]["content"] for p in pref)
    # the post-training loaders read both files back
    assert len(load_sft(tmp_path / "out/sft.jsonl", tok)) == 12
    assert len(load_preferences(tmp_path / "out/preference.jsonl", tok)) == 6
    manifest = json.loads((tmp_path / "out/manifest.json").read_text())
    assert manifest["model"] == "scripted" and manifest["params"]["k"] == 6 and manifest["seed"] == 1234


def test_rejection_shortest_keeps_one_per_problem(tmp_path):
    inp = write(tmp_path / "in.jsonl", PROBLEMS[:2])

    def reply(prompt, body):
        i = int(re.search(r"What is (\d+) plus", prompt).group(1))
        return [f"Long working here. The answer is {2 * i}.", f"The answer is {2 * i}.", "The answer is 999."]

    with Scripted(reply) as srv:
        rejection(client(srv), inp, tmp_path / "out", k=3, keep="shortest")
    sft = read(tmp_path / "out/sft.jsonl")
    assert [r["messages"][1]["content"] for r in sft] == ["The answer is 0.", "The answer is 2."]


# ---- execution feedback ----------------------------------------------------------------------------
GOOD = "```python\ndef add(a, b):\n    return a + b\n```"
BAD = "```python\ndef add(a, b):\n    return a - b\n```"


def test_execution_keeps_exactly_the_passing_programs_and_contains_a_malicious_one(tmp_path):
    target = tmp_path / "pwned"
    evil = (
        f"```python\nimport os\nopen({str(target)!r}, 'w').write('x')\nos.system('touch {target}')\n"
        "def add(a, b):\n    return a + b\n```"
    )
    loop = "```python\nwhile True:\n    pass\n```"
    script = {"good": [GOOD], "fixed": [BAD, GOOD], "bad": [BAD, BAD, BAD], "evil": [evil], "loop": [loop]}

    def reply(prompt, body):
        name = re.search(r"Task (\w+):", prompt).group(1)
        tries = script[name]
        attempt = prompt.count("failed its tests") and len(re.findall(r"return a - b", prompt))
        return [tries[min(attempt, len(tries) - 1)]]

    tests = "assert add(2, 3) == 5\n"
    items = [{"id": n, "prompt": f"Task {n}: write add(a, b).", "tests": tests} for n in script]
    inp = write(tmp_path / "in.jsonl", items)
    with Scripted(reply) as srv:
        m = execution(client(srv), inp, tmp_path / "out", retries=2, timeout=3.0)
    log = {r["id"]: r for r in read(tmp_path / "out/log.jsonl")}
    assert {k for k, r in log.items() if r["passed"]} == {"good", "fixed"}
    assert [a["status"] for a in log["fixed"]["attempts"]] == ["failed", "passed"]
    assert len(log["bad"]["attempts"]) == 3  # the first try + 2 rounds of feedback
    assert (
        log["evil"]["attempts"][0]["status"] == "failed"
        and "PermissionError" in log["evil"]["attempts"][0]["error"]
    )
    assert log["loop"]["attempts"][0]["status"] == "timeout"
    assert not target.exists()
    sft = read(tmp_path / "out/sft.jsonl")
    assert m["counts"]["passed"] == 2 and len(sft) == 2
    assert all("return a + b" in r["messages"][1]["content"] for r in sft)


def test_execution_without_tests_asks_the_model_for_them(tmp_path):
    def reply(prompt, body):
        return ["```python\nassert add(1, 1) == 2\n```"] if "assert statements" in prompt else [GOOD]

    inp = write(tmp_path / "in.jsonl", [{"id": "a", "prompt": "Task a: write add."}])
    with Scripted(reply) as srv:
        execution(client(srv), inp, tmp_path / "out")
    (rec,) = read(tmp_path / "out/log.jsonl")
    assert rec["passed"] and rec["tests"] == "assert add(1, 1) == 2\n"


def test_instruction_following_keeps_replies_meeting_every_constraint(tmp_path, tok):
    replies = ["apples are red", "APPLES ARE RED", "pears are green and long and boring", "apples"]
    items = [
        {
            "id": "x",
            "prompt": "Describe apples in at most five words, lowercase.",
            "constraints": [
                {"type": "max_words", "value": 5},
                {"type": "lowercase"},
                {"type": "keywords", "value": ["apples"]},
            ],
        }
    ]
    inp = write(tmp_path / "in.jsonl", items)
    with Scripted(lambda p, b: replies[: b["n"]]) as srv:
        instructions(client(srv), inp, tmp_path / "out", k=4)
    kept = [r["messages"][1]["content"] for r in read(tmp_path / "out/sft.jsonl")]
    assert kept == ["apples are red", "apples"]
    assert len(load_preferences(tmp_path / "out/preference.jsonl", tok)) == 1


# ---- evolution, tagging, selection, constitutional ---------------------------------------------------
def test_evolve_drops_refusals_copies_and_short_ones(tmp_path):
    src = {
        "a": "Write a poem about the sea.",
        "b": "Explain how rainbows form.",
        "c": "List three prime numbers.",
        "d": "Summarize the water cycle.",
    }
    out = {
        "a": "Write a sonnet about the sea at night, in iambic pentameter, with a volta.",
        "b": "I'm sorry, but I cannot help with that request.",
        "c": "List three prime numbers.",
        "d": "Summarize.",
    }

    def reply(prompt, body):
        text = user_text(prompt)
        return [next(out[k] for k, v in src.items() if v in text)]

    inp = write(tmp_path / "in.jsonl", [{"id": k, "prompt": v} for k, v in src.items()])
    with Scripted(reply) as srv:
        m = evolve(client(srv), inp, tmp_path / "out")
    kept = read(tmp_path / "out/prompts.jsonl")
    assert [r["source_id"] for r in kept] == ["a"] and kept[0]["prompt"][0]["content"] == out["a"]
    assert m["counts"]["dropped"] == {"refusal": 1, "copy": 1, "too_short": 1}


TAGGED = [
    {"id": "a", "prompt": "pa", "tags": ["x", "y", "z"]},
    {"id": "b", "prompt": "pb", "tags": ["x", "y"]},
    {"id": "c", "prompt": "pc", "tags": ["w"]},
    {"id": "d", "prompt": "pd", "tags": ["x"]},
    {"id": "e", "prompt": "pe", "tags": ["y", "w"]},
]


def test_selection_prefers_new_tags_then_complexity(tmp_path):
    # a (3 tags) first; b adds nothing; e adds w; c, d add nothing -> then the most complex left: b
    assert [it["id"] for it in select_items(TAGGED, 2)] == ["a", "e"]
    assert [it["id"] for it in select_items(TAGGED, 3)] == ["a", "e", "b"]
    assert [it["id"] for it in select_items(TAGGED, 5)] == ["a", "e", "b", "c", "d"]
    m = select(write(tmp_path / "tagged.jsonl", TAGGED), tmp_path / "sel", size=2)
    assert [r["id"] for r in read(tmp_path / "sel/selected.jsonl")] == ["a", "e"]
    assert m["counts"]["tags_covered"] == 4


def test_tag_parses_the_models_json_and_feeds_select(tmp_path):
    tags = {
        "pa": '[{"tag": "X", "explanation": "."}, {"tag": "y"}, {"tag": "Z"}]',
        "pb": 'Sure: ["x", "y"]',
        "pc": "no json here",
    }

    def reply(prompt, body):
        return [tags[user_text(prompt).strip().rsplit("\n", 1)[1]]]

    inp = write(tmp_path / "in.jsonl", [{"prompt": k} for k in tags])  # ids default to line numbers
    with Scripted(reply) as srv:
        m = tag(client(srv), inp, tmp_path / "out")
    tagged = read(tmp_path / "out/tagged.jsonl")
    assert [(r["id"], r["tags"]) for r in tagged] == [("0", ["x", "y", "z"]), ("1", ["x", "y"])]
    assert m["counts"]["unparsed"] == 1
    select(tmp_path / "out/tagged.jsonl", tmp_path / "sel", size=1)
    assert [r["id"] for r in read(tmp_path / "sel/selected.jsonl")] == ["0"]


def test_constitutional_writes_original_and_revision_as_a_pair(tmp_path, tok):
    principles = write(tmp_path / "p.txt", [])
    principles.write_text("Never insult the user.\n")

    def reply(prompt, body):
        if "Critique:" in prompt:
            return ["Here is a polite answer: 4."]
        if "Critique the reply" in prompt:
            assert "Never insult the user." in prompt
            return ["It insults the user."]
        return ["4, obviously, you fool."]

    inp = write(
        tmp_path / "in.jsonl",
        [{"prompt": "What is 2+2?"}, {"prompt": "Hi", "response": "4, obviously, you fool."}],
    )
    with Scripted(reply) as srv:
        constitutional(client(srv), inp, tmp_path / "out", principles=principles)
    pref = read(tmp_path / "out/preference.jsonl")
    assert len(pref) == 2
    assert all(p["chosen"][0]["content"] == "Here is a polite answer: 4." for p in pref)
    assert all(p["rejected"][0]["content"] == "4, obviously, you fool." for p in pref)
    assert len(load_preferences(tmp_path / "out/preference.jsonl", tok)) == 2


# ---- decontamination ------------------------------------------------------------------------------------
def test_decontaminate_drops_exactly_the_overlapping_items(tmp_path):
    q = "Natalia sold clips to forty eight of her friends in April and then she sold half as many in May"
    (tmp_path / "eval/gsm8k").mkdir(parents=True)
    write(tmp_path / "eval/gsm8k/test.jsonl", [{"question": q, "answer": "72"}])
    words = q.split()
    train = [
        {"id": "copy", "messages": [{"role": "user", "content": "Q: " + q.upper() + "!"}]},
        {"id": "twelve", "messages": [{"role": "user", "content": " ".join(words[:12]) + " bananas"}]},
        {"id": "part", "messages": [{"role": "user", "content": "x " + " ".join(words[5:18]) + " y"}]},
        {"id": "other", "messages": [{"role": "user", "content": "Write a haiku about autumn leaves."}]},
    ]
    m = decontaminate(write(tmp_path / "train.jsonl", train), tmp_path / "eval", tmp_path / "out")
    assert [r["id"] for r in read(tmp_path / "out/clean.jsonl")] == ["twelve", "other"]
    report = json.loads((tmp_path / "out/report.json").read_text())
    assert [d["id"] for d in report["dropped"]] == ["copy", "part"]
    assert report["dropped"][0]["eval_file"].endswith("gsm8k/test.jsonl")
    assert m["counts"] == {"items": 4, "kept": 2, "dropped": 2, "eval_ngrams": len(words) - 12}
    # a long common substring catches what 13 words miss
    decontaminate(tmp_path / "train.jsonl", tmp_path / "eval", tmp_path / "out2", min_chars=40)
    assert [r["id"] for r in read(tmp_path / "out2/clean.jsonl")] == ["other"]


# ---- resumability and faults ------------------------------------------------------------------------
def test_resume_after_kill_9_skips_finished_items(tmp_path):
    inp = write(tmp_path / "in.jsonl", PROBLEMS)
    out = tmp_path / "out"
    with Scripted(math_reply, delay=0.3) as srv:
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
            srv.url,
            "--k",
            "3",
            "--chunk",
            "1",
        ]
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        log = out / "log.jsonl"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and (not log.exists() or log.read_text().count("\n") < 2):
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        done = [r["id"] for r in read(log)]
        assert 2 <= len(done) < len(PROBLEMS), "the run must be killed mid-way"
        before = {p["id"]: srv.count(p["question"]) for p in PROBLEMS}
        m = rejection(client(srv), inp, out, k=3, chunk=1)
        after = {p["id"]: srv.count(p["question"]) for p in PROBLEMS}
    assert all(after[i] == before[i] for i in done)  # finished items are not asked again
    assert all(after[p["id"]] > before[p["id"]] or p["id"] in done for p in PROBLEMS)
    assert sorted(r["id"] for r in read(log)) == sorted(p["id"] for p in PROBLEMS)
    assert m["counts"]["items"] == 6 and m["counts"]["correct"] == 6  # one correct of 3 each, once


def test_a_429_500_timeout_storm_is_retried_without_loss_or_duplicates(tmp_path):
    kinds = [429, 500, "timeout", 503, None]

    def fault(prompt, attempt):
        i = int(re.search(r"What is (\d+) plus", prompt).group(1))
        return kinds[i % len(kinds)] if attempt < 1 + i % 2 else None

    problems = [
        {"id": f"q{i}", "question": f"What is {i} plus {i}?", "answer": str(2 * i)} for i in range(10)
    ]
    inp = write(tmp_path / "in.jsonl", problems)
    with Scripted(math_reply, fault=fault) as srv:
        m = rejection(client(srv, timeout=1.0, concurrency=8), inp, tmp_path / "out", k=3, chunk=10)
    sft = read(tmp_path / "out/sft.jsonl")
    got = sorted(r["messages"][0]["content"] for r in sft)
    assert got == sorted(r["prompt"] for r in read(tmp_path / "out/log.jsonl"))  # one each
    assert len(sft) == 10 and m["counts"]["samples"] == 30
    for r in sft:
        q = int(re.search(r"What is (\d+) plus", r["messages"][0]["content"]).group(1))
        assert r["messages"][1]["content"].endswith(f"is {2 * q}.")


def test_user_mistakes_are_one_line_errors(tmp_path):
    bad = write(tmp_path / "in.jsonl", [{"question": "no answer field"}])
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "qwen2.cli",
            "synth",
            "select",
            str(bad),
            "--out",
            str(tmp_path / "o"),
            "--size",
            "1",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2 and "no field 'prompt'" in r.stderr and r.stderr.count("\n") == 1
    with pytest.raises(ValueError, match="--checker"):
        rejection(None, bad, tmp_path / "o", checker="nope")
