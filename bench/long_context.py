"""Long context on this machine: prefill time, peak memory and decode speed from 4K to 131,072 tokens.

The real Qwen2-0.5B shape (random weights, bf16) with Dual Chunk Attention as `qwen2 generate
--dual-chunk-attention` adds it (config.with_dual_chunk_attention: chunk 24,576, local 2,048, 4x the
trained 32K), and plain attention beside it where it fits. Each (length, attention) point runs in its own
process, so its peak RSS (ru_maxrss) is its own: the prompt is prefilled in chunks of --chunk tokens
into a static KV cache sized to the request (prompt + decode tokens), then --decode tokens are decoded.

Attention costs O(T^2) at any memory: on 2 cores the full 24 layers at 64K+ take hours, so lengths of at
least --subset-from run the first --subset-layers layers only and the output says so; their prefill
time is extrapolated linearly in layers (every layer does the same work) and their full-model peak
memory as measured + the KV cache of the layers not run (the activations of one chunk do not grow with
layers). Memory must grow linearly with length (weights + KV cache + one chunk's activations): the plot
(docs/long_context_memory.png) shows the measured points beside that line.

    .venv/bin/python bench/long_context.py [--lengths 4096,16384,32768,65536,131072] [--chunk 4096]
                                           [--decode 8] [--subset-from 32768] [--subset-layers 1]
    .venv/bin/python bench/long_context.py --quick     # a smoke run: short lengths, 2 layers
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import table  # noqa: E402
from qwen2.config import ModelConfig, kv_cache_bytes_per_token  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def build(length: int, attention: str, layers: int, extra: int):
    from qwen2.generation import KVCache
    from qwen2.model import build_model

    config = ModelConfig.preset("Qwen2-0.5B").replace(num_hidden_layers=layers)
    if attention == "dca":
        config = config.with_dual_chunk_attention(context=max(131072, length + extra))
    else:
        config = config.replace(max_position_embeddings=max(config.max_position_embeddings, length + extra))
    model = build_model(config, dtype=torch.bfloat16).eval()
    return model, KVCache(config, 1, length + extra, dtype=torch.bfloat16)  # sized to the request


def prefill_point(length: int, attention: str, layers: int, chunk: int) -> dict:
    """In a fresh process: prefill `length` random tokens in chunks of `chunk`; time and peak RSS."""
    from qwen2.generation import prefill

    model, cache = build(length, attention, layers, 1)
    ids = torch.randint(0, model.config.vocab_size, (1, length), generator=torch.Generator().manual_seed(0))
    t0 = time.perf_counter()
    for s in range(0, length, chunk):
        prefill(model, ids[:, s : s + chunk], cache, start=s)
    return {
        "prefill_s": time.perf_counter() - t0,
        "peak_mib": rss_mib(),
        "kv_mib": kv_cache_bytes_per_token(model.config, 2) * (length + 1) / 2**20,
    }


def decode_point(length: int, attention: str, tokens: int) -> dict:
    """In a fresh process: the whole model decoding `tokens` tokens after `length` cached ones. A step's
    cost does not depend on the cached values, so the cache is filled with random keys and values instead
    of a prefill that would take hours here at 131K."""
    from qwen2.generation import decode_one

    model, cache = build(length, attention, ModelConfig.preset("Qwen2-0.5B").num_hidden_layers, tokens)
    g = torch.Generator().manual_seed(0)
    for buf in cache.k + cache.v:
        buf[:, :, :length].copy_(torch.randn(buf[:, :, :length].shape, generator=g))
    token = torch.tensor([[0]])
    decode_one(model, token, torch.tensor([[length]]), cache)  # warm-up
    t0 = time.perf_counter()
    for i in range(tokens):
        token = decode_one(model, token, torch.tensor([[length + i]]), cache).argmax(-1, keepdim=True)
    return {"decode_tok_s": tokens / (time.perf_counter() - t0), "decode_peak_mib": rss_mib()}


def run_point(what: str, length: int, attention: str, layers: int, args) -> dict | None:
    cmd = [sys.executable, __file__, "--one", f"{what},{length},{attention},{layers}"]
    cmd += ["--chunk", str(args.chunk), "--decode", str(args.decode)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        print(
            f"  {what} {attention} at {length:,}: failed ({r.stderr.strip().splitlines()[-1:]})",
            file=sys.stderr,
        )
        return None
    return json.loads(r.stdout.strip().splitlines()[-1])


def plot(rows: list[dict], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install -e '.[plot]')")
        return
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for attention, marker in (("dca", "o"), ("plain", "s")):
        pts = [r for r in rows if r["attention"] == attention]
        if pts:
            x = [r["tokens"] for r in pts]
            ax.plot(x, [r["peak_24_gib"] for r in pts], marker=marker, label=f"peak RSS, {attention}")
    dca = [r for r in rows if r["attention"] == "dca"]
    if dca:
        x = [r["tokens"] for r in dca]
        line = [(dca[0]["peak_24_gib"] - dca[0]["kv_24_gib"]) + r["kv_24_gib"] for r in dca]
        ax.plot(x, line, "k--", lw=1, label="weights + one chunk + KV cache (linear)")
    ax.set_xlabel("prompt tokens")
    ax.set_ylabel("GiB (24 layers; extrapolated where marked)")
    ax.set_title("Qwen2-0.5B shape, bf16: peak memory by length")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    print(f"plot: {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lengths", default="4096,16384,32768,65536,131072")
    ap.add_argument("--chunk", type=int, default=4096, help="prefill chunk (tokens per forward)")
    ap.add_argument("--decode", type=int, default=8, help="tokens decoded after the prompt")
    ap.add_argument("--subset-from", type=int, default=32768, help="from this length, a subset of layers")
    ap.add_argument("--subset-layers", type=int, default=1)
    ap.add_argument("--plain-up-to", type=int, default=32768, help="plain attention up to this length")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--quick", action="store_true", help="smoke run: 1K-4K tokens, 2 layers")
    ap.add_argument("--plot", default=str(ROOT / "docs" / "long_context_memory.png"))
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.one:
        what, length, attention, layers = args.one.split(",")
        if what == "prefill":
            print(json.dumps(prefill_point(int(length), attention, int(layers), args.chunk)))
        else:
            print(json.dumps(decode_point(int(length), attention, args.decode)))
        return
    full = ModelConfig.preset("Qwen2-0.5B").num_hidden_layers
    lengths = [int(x) for x in args.lengths.split(",")]
    if args.quick:
        lengths, args.chunk, args.decode, args.subset_from = [1024, 4096], 1024, 2, 4096
        args.subset_layers, full_layers = 1, 2
    else:
        full_layers = full
    rows = []
    for length in lengths:
        for attention in ("dca", "plain"):
            if attention == "plain" and length > args.plain_up_to:
                continue
            layers = args.subset_layers if length >= args.subset_from else full_layers
            print(f"{attention} at {length:,}, {layers}/{full} layers ...", file=sys.stderr, flush=True)
            r = run_point("prefill", length, attention, layers, args)
            d = run_point("decode", length, attention, full, args)
            if r is None:
                continue
            kv_24 = r["kv_mib"] * full / layers
            t24 = r["prefill_s"] * full / layers
            rows.append(
                {
                    "tokens": length,
                    "attention": attention,
                    "prefill layers run": f"{layers}/{full}",
                    "prefill s (24 layers)": round(t24, 1),
                    "prefill tok/s": round(length / t24, 1),
                    "prefill peak GiB (run)": round(r["peak_mib"] / 1024, 2),
                    "peak_24_gib": round((r["peak_mib"] + kv_24 - r["kv_mib"]) / 1024, 2),
                    "kv_24_gib": round(kv_24 / 1024, 2),
                    "decode tok/s": round(d["decode_tok_s"], 2) if d else "failed",
                    "decode peak GiB": round(d["decode_peak_mib"] / 1024, 2) if d else "failed",
                }
            )
    shown = [
        {
            **{k: v for k, v in r.items() if not k.endswith("_gib")},
            "prefill peak GiB (24 layers)": r["peak_24_gib"],
            "KV GiB (24 layers)": r["kv_24_gib"],
        }
        for r in rows
    ]
    print(table(shown, list(shown[0]) if shown else []))
    print(
        "Prefill rows with fewer layers run: time scaled by 24 / layers run, peak memory = measured + the KV "
        "cache of the layers not run. Decode: the whole model, the cache filled with random values."
    )
    if rows and not args.quick:
        plot(rows, Path(args.plot))


if __name__ == "__main__":
    main()
