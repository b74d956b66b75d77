"""`qwen2 generate` and `qwen2 chat` as a user runs them (a subprocess, stdin or a pseudo-terminal) on a
tiny random checkpoint with the real tokenizer: the streamed text equals qwen2.generate's for the same
settings, and bad input gets one line and a non-zero exit."""

import os
import re
import select
import shutil
import subprocess
import sys
import time

import pytest
import torch

from qwen2 import load_model, save_model
from qwen2.config import ModelConfig
from qwen2.generation import generate, texts_of
from qwen2.model import build_model
from qwen2.tokenizer.bpe import load_tokenizer
from qwen2.tokenizer.chat import encode_chat

N = 12  # new tokens per reply: enough to cross token boundaries, small enough to keep each run fast
STATS = r"\[(\d+) tokens, [0-9.]+ tokens/s\]\n"


def qwen2(*argv, stdin: str = "", check=True) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONIOENCODING="utf-8")
    proc = subprocess.run(
        [sys.executable, "-m", "qwen2.cli", *argv],
        input=stdin.encode(),
        capture_output=True,
        env=env,
        timeout=120,
    )
    if check:
        assert proc.returncode == 0, proc.stderr.decode()
    return proc


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, tokenizer_dir):
    """The 'tiny' preset with Qwen2's vocabulary and the fixture tokenizer, random weights at a scale
    (std 0.2) where replies vary with the prompt instead of repeating one token."""
    path = tmp_path_factory.mktemp("tiny-cli")
    model = build_model(ModelConfig.preset("tiny").replace(vocab_size=151936, torch_dtype="float32"), seed=0)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.2, generator=g)
    save_model(model, path)
    for f in tokenizer_dir.glob("*.json"):
        shutil.copy(f, path / f.name)
    return path, load_model(path), load_tokenizer(path)


def reference(model, tok, ids, stops, count=False):
    """What qwen2.generate streams for these ids, greedy, N tokens, stopping at `stops` (and, with count,
    how many tokens it sampled)."""
    gen = generate(model, ids, N, temperature=0, stop_token_ids=stops, tokenizer=tok)
    text = "".join(texts_of(gen))
    return (text, len(gen.sampled[0])) if count else text


def chat_reference(model, tok, messages, system=None, count=False):
    kw = {} if system is None else {"system_prompt": system}
    ids, _ = encode_chat(tok, messages, add_generation_prompt=True, **kw)
    return reference(
        model, tok, ids, sorted({tok.im_end_id, tok.endoftext_id, tok.eos_token_id} - {None}), count
    )


# ---- qwen2 generate -------------------------------------------------------------------------------
def test_generate_streams_what_qwen2_generate_gives(ckpt):
    path, model, tok = ckpt
    prompt = "def fibonacci(n):"
    want = reference(model, tok, tok.encode(prompt), [tok.eos_token_id])
    proc = qwen2(
        "generate", "--model", str(path), "--prompt", prompt, "--max-new-tokens", str(N), "--temperature", "0"
    )
    assert proc.stdout.decode() == want + "\n"
    assert re.search(r"prompt tokens in .*new tokens, [0-9.]+ tokens/s", proc.stderr.decode())


def test_generate_reads_the_prompt_from_stdin(ckpt):
    path, model, tok = ckpt
    prompt = "Once upon a time\nthere was"
    want = reference(model, tok, tok.encode(prompt), [tok.eos_token_id])
    proc = qwen2(
        "generate",
        "--model",
        str(path),
        "--max-new-tokens",
        str(N),
        "--temperature",
        "0",
        "--quiet",
        stdin=prompt,
    )
    assert proc.stdout.decode() == want + "\n" and proc.stderr.decode() == ""


# ---- qwen2 chat -----------------------------------------------------------------------------------
def test_chat_over_stdin_keeps_history_resets_and_exits(ckpt):
    path, model, tok = ckpt
    first, sampled = chat_reference(model, tok, [{"role": "user", "content": "Hi there"}], count=True)
    second = chat_reference(
        model,
        tok,
        [
            {"role": "user", "content": "Hi there"},
            {"role": "assistant", "content": first},
            {"role": "user", "content": "And then?"},
        ],
    )
    script = "Hi there\nAnd then?\n/reset\nHi there\n/exit\nnever read\n"
    proc = qwen2("chat", "--model", str(path), "--max-new-tokens", str(N), "--temperature", "0", stdin=script)
    out = proc.stdout.decode()
    pattern = (
        re.escape(first)
        + "\n"
        + STATS
        + re.escape(second)
        + "\n"
        + STATS
        + re.escape("(conversation cleared)\n")
        + re.escape(first)
        + "\n"
        + STATS
    )
    m = re.fullmatch(pattern, out)
    assert m, out
    assert int(m.group(1)) == int(m.group(3)) == sampled  # the reply's own tokens (a stop token included)


def test_chat_system_prompt_flag(ckpt):
    path, model, tok = ckpt
    system = "You are a pirate."
    want = chat_reference(model, tok, [{"role": "user", "content": "Hello"}], system=system)
    assert want != chat_reference(model, tok, [{"role": "user", "content": "Hello"}])  # the flag matters here
    proc = qwen2(
        "chat",
        "--model",
        str(path),
        "--system",
        system,
        "--max-new-tokens",
        str(N),
        "--temperature",
        "0",
        stdin="Hello\n",
    )
    assert re.fullmatch(re.escape(want) + "\n" + STATS, proc.stdout.decode())


def test_chat_in_a_terminal(ckpt):
    """Through a pseudo-terminal: the prompt, the streamed reply, tokens/s, /exit."""
    path, model, tok = ckpt
    want = chat_reference(model, tok, [{"role": "user", "content": "Hello"}])
    master, slave = os.openpty()
    env = dict(os.environ, PYTHONIOENCODING="utf-8", TERM="dumb")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "qwen2.cli",
            "chat",
            "--model",
            str(path),
            "--max-new-tokens",
            str(N),
            "--temperature",
            "0",
        ],
        stdin=slave,
        stdout=slave,
        stderr=slave,
        env=env,
    )
    os.close(slave)
    seen = b""

    def read_until(marker: bytes, timeout=60.0):
        nonlocal seen
        end = time.monotonic() + timeout
        while marker not in seen:
            ready, _, _ = select.select([master], [], [], max(0.0, end - time.monotonic()))
            assert ready, f"timed out waiting for {marker!r}; got {seen!r}"
            seen += os.read(master, 4096)

    try:
        read_until(b">>> ")
        assert b"/reset" in seen and b"/exit" in seen  # the banner tells the user how to leave
        os.write(master, b"Hello\n")
        read_until(b"tokens/s]")
        read_until(b">>> ")
        os.write(master, b"/exit\n")
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(master)
    text = seen.decode("utf-8", "replace").replace("\r\n", "\n")
    assert want.replace("\r\n", "\n") + "\n[" in text


# ---- bad input: one line, exit 2, no traceback ----------------------------------------------------------
def one_line_error(proc) -> str:
    err = proc.stderr.decode()
    assert proc.returncode == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert proc.stdout.decode().strip() == ""
    return err


def test_missing_directory(tmp_path):
    err = one_line_error(qwen2("generate", "--model", str(tmp_path / "nope"), "--prompt", "x", check=False))
    assert "nope: no such model directory" in err
    err = one_line_error(qwen2("chat", "--model", str(tmp_path / "nope"), check=False))
    assert "no such model directory" in err


def test_not_a_qwen2_checkpoint(tmp_path, tokenizer_dir):
    err = one_line_error(qwen2("generate", "--model", str(tmp_path), "--prompt", "x", check=False))
    assert "no config.json" in err
    for f in tokenizer_dir.glob("*.json"):
        (tmp_path / f.name).write_bytes(f.read_bytes())
    (tmp_path / "config.json").write_text('{"model_type": "llama", "hidden_size": 64}')
    err = one_line_error(qwen2("generate", "--model", str(tmp_path), "--prompt", "x", check=False))
    assert "config.json" in err and "not a Qwen2 model" in err


def test_prompt_longer_than_the_context(ckpt):
    path, model, tok = ckpt
    prompt = "word " * (model.config.max_position_embeddings + 10)
    assert len(tok.encode(prompt)) > model.config.max_position_embeddings
    err = one_line_error(
        qwen2("generate", "--model", str(path), "--max-new-tokens", "4", check=False, stdin=prompt)
    )
    assert "context" in err and "max_position_embeddings" in err
