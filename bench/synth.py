"""Synthesis throughput: `qwen2 synth rejection` (k samples per problem, the heaviest realistic
pipeline) against `qwen2 serve` at client concurrency 1, 8 and 32 (the Endpoint's thread pool, the
CLI's --concurrency), on one server started once.

The checkpoint is the 'tiny' preset widened to Qwen2's vocabulary with an untied output layer (as
tests/conftest.py's tiny_chat_checkpoint: a tied random model repeats its last token), random weights,
saved with the built-in Qwen2 tokenizer into a temporary folder. Random text rarely reaches the answer,
so the figure is the synthesis loop's cost (prompt rendering, HTTP, the server's batching), not a
model's: a larger model makes each request dearer and concurrency pay more. Each level runs the
pipeline in this process (rejection() with make_client's Endpoint) on the same problems into a fresh
output folder, with --chunk at least the concurrency, after one untimed warm-up run. Figures: HTTP
requests (one per problem: k <= the server's n cap), seconds, requests/s, generated tokens/s (the
samples' text re-encoded with the tokenizer; within a token or so of the server's count), and the
ratio of requests/s to concurrency 1 in the same run.

    .venv/bin/python bench/synth.py                       # ~3 minutes on 2 cores
    .venv/bin/python bench/synth.py --items 16 --levels 1,8 --out /tmp/synth_bench.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))

from common import table  # noqa: E402
from qwen2.checkpoint import save_model  # noqa: E402
from qwen2.config import ModelConfig  # noqa: E402
from qwen2.model import build_model  # noqa: E402
from qwen2.synth.rejection import rejection  # noqa: E402
from qwen2.synth.runner import make_client  # noqa: E402
from qwen2.tokenizer.bpe import load_tokenizer  # noqa: E402
from qwen2.tokenizer.save import save_tokenizer  # noqa: E402


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build_checkpoint(path: Path, tok) -> None:
    config = ModelConfig.preset("tiny").replace(vocab_size=151936, tie_word_embeddings=False)
    save_model(build_model(config, seed=0), path)
    save_tokenizer(tok, path)


def start_server(ckpt: Path, port: int, max_seqs: int, max_len: int, log: Path) -> subprocess.Popen:
    cmd = [
        sys.executable, "-m", "qwen2.cli", "serve", "--model", str(ckpt), "--port", str(port),
        "--served-model-name", "tiny", "--max-num-seqs", str(max_seqs), "--max-model-len", str(max_len),
    ]  # fmt: skip
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    server = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=log.open("w"))
    for _ in range(600):  # bounded wait for the model to load
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as r:
                if r.status == 200:
                    return server
        except OSError:
            pass
        if server.poll() is not None:
            raise SystemExit(f"qwen2 serve exited: {log.read_text()[-2000:]}")
        time.sleep(0.5)
    server.kill()
    raise SystemExit(f"qwen2 serve did not answer /health in 300 s; its log: {log}")


def measure(url: str, tok, inp: Path, out: Path, a, concurrency: int) -> dict:
    client = make_client(url, concurrency=concurrency, timeout=300.0, retries=2)
    t0 = time.perf_counter()
    m = rejection(
        client,
        inp,
        out,
        k=a.k,
        max_tokens=a.max_tokens,
        top_p=a.top_p,
        chunk=max(a.chunk, concurrency),
        seed=a.seed,
    )
    secs = time.perf_counter() - t0
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    tokens = sum(len(tok.encode(s["text"])) for rec in log for s in rec["samples"])
    requests = m["counts"]["items"] * -(-a.k // client.max_n)
    return {
        "concurrency": concurrency,
        "requests": requests,
        "samples": m["counts"]["samples"],
        "seconds": round(secs, 2),
        "requests/s": round(requests / secs, 2),
        "gen tok/s": round(tokens / secs, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--levels", default="1,8,32", help="client concurrency per run")
    ap.add_argument("--items", type=int, default=24, help="problems per run (one request each)")
    ap.add_argument("--k", type=int, default=4, help="samples per problem (the request's n)")
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--chunk", type=int, default=32, help="items per round (raised to the concurrency)")
    ap.add_argument("--top-p", type=float, default=0.95, help="the pipeline's default")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--out", default=str(ROOT / "docs/synth_bench.json"), help="JSON results")
    a = ap.parse_args()
    levels = [int(x) for x in a.levels.split(",")]

    tok = load_tokenizer("Qwen2")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        build_checkpoint(tmp / "ckpt", tok)
        rows = [{"id": f"q{i}", "question": f"What is {i} plus {i + 3}?", "answer": str(2 * i + 3)}
                for i in range(a.items)]  # fmt: skip
        inp = tmp / "items.jsonl"
        inp.write_text("".join(json.dumps(r) + "\n" for r in rows))
        port = free_port()
        server = start_server(tmp / "ckpt", port, max(levels) * a.k, 1024, tmp / "serve.log")
        url = f"http://127.0.0.1:{port}/v1"
        try:
            warm = tmp / "warm.jsonl"
            warm.write_text("".join(json.dumps(r) + "\n" for r in rows[:4]))
            measure(url, tok, warm, tmp / "out-warm", a, 4)  # untimed: first-call costs
            results = []
            for c in levels:
                results.append(measure(url, tok, inp, tmp / f"out-{c}", a, c))
                print(f"  concurrency {c:>3}: {results[-1]['requests/s']} requests/s", flush=True)
        finally:
            server.terminate()
            try:
                server.wait(timeout=60)
            except subprocess.TimeoutExpired:
                server.kill()
    base = results[0]["requests/s"]
    for r in results:
        r["x c=1"] = round(r["requests/s"] / base, 2)
    print(
        f"\nqwen2 synth rejection vs qwen2 serve (random tiny, {a.items} problems, k={a.k}, "
        f"max_tokens={a.max_tokens}, top_p={a.top_p}, {os.cpu_count()} CPU cores)"
    )
    print(table(results, ["concurrency", "requests", "seconds", "requests/s", "gen tok/s", "x c=1"]))
    config = {"pipeline": "rejection", "model": "random tiny (vocab 151936, untied)", "items": a.items,
              "k": a.k, "max_tokens": a.max_tokens, "top_p": a.top_p, "chunk": a.chunk,
              "levels": levels, "server_max_num_seqs": max(levels) * a.k}  # fmt: skip
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps({"config": config, "results": results}, indent=2) + "\n")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
