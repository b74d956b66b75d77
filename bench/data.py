"""Data pipeline: prepare_corpus on the default corpus (what each step removed, MB/s), and the packed
loader's batches/s beside a reference measured in the same run: nanoGPT-style random windows of one
flat memory-mapped token file (no documents, no resume or rank logic).

    .venv/bin/python bench/data.py [--tokenizer DIR] [--corpus PATH] [--seq-len 512] [--batch 8]
    .venv/bin/python bench/data.py --quick     # smoke run: every 20th file of the default corpus, 200 batches
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from qwen2.data import PackedLoader, Source, default_source, prepare_corpus
from qwen2.tokenizer.bpe import load_tokenizer

ROOT = Path(__file__).resolve().parents[1]


def reference_batches(tokens: np.ndarray, seq_len: int, batch: int, n: int, seed: int = 0):
    """nanoGPT's get_batch: random offsets into one flat token array."""
    rng = np.random.default_rng(seed)
    for _ in range(n):
        ix = rng.integers(0, len(tokens) - seq_len - 1, batch)
        yield torch.from_numpy(np.stack([tokens[i : i + seq_len + 1].astype(np.int64) for i in ix]))


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokenizer", default="Qwen2", help="a tokenizer folder, or Qwen2 (built in)")
    p.add_argument("--corpus", default=None, help="a folder or file (default: the Python standard library)")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument(
        "--quick", action="store_true", help="smoke run: every 20th default-corpus file, 200 batches"
    )
    a = p.parse_args()
    tok = load_tokenizer(a.tokenizer)
    if a.quick:
        from qwen2.data.corpus import default_corpus_files

        source, a.steps = Source("corpus", default_corpus_files()[::20]), 200
    else:
        source = default_source() if a.corpus is None else Source("corpus", [a.corpus])
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        report = prepare_corpus(source, tok, tmp, progress=False)
        seconds = time.perf_counter() - t0
        total = report["total"]
        mb = total["read"]["bytes"] / 1e6
        print(
            f"prepare_corpus: {total['read']['files']} files, {total['read']['docs']} docs, {mb:.1f} MB in "
            f"{seconds:.1f} s ({mb / seconds:.2f} MB/s); kept {total['kept']['docs']} docs, "
            f"{total['kept']['bytes'] / 1e6:.1f} MB, {total['kept']['tokens']:,} tokens\n"
        )
        print("| step | docs in | docs dropped | MB dropped | % of bytes dropped |")
        print("|---|---:|---:|---:|---:|")
        for r in total["steps"]:
            print(
                f"| {r['step']} | {r['docs_in']} | {r['docs_dropped']} | {r['bytes_dropped'] / 1e6:.2f} | "
                f"{100 * r['bytes_dropped'] / total['read']['bytes']:.1f} |"
            )

        shards = next(iter(report["sources"].values()))["dir"]
        from qwen2.data import ShardSet

        data = ShardSet(Path(tmp) / shards)
        flat = np.concatenate([np.append(d, tok.endoftext_id).astype(np.uint32) for d in data])
        np.save(Path(tmp) / "flat.npy", flat)
        flat = np.load(Path(tmp) / "flat.npy", mmap_mode="r")

        def rate(batches):
            t0 = time.perf_counter()
            for _ in batches:
                pass
            return a.steps / (time.perf_counter() - t0)

        loader = PackedLoader(data, a.seq_len, a.batch, seed=0)
        ours = rate(next(loader) for _ in range(a.steps))
        ref = rate(reference_batches(flat, a.seq_len, a.batch, a.steps))
        toks = a.batch * a.seq_len
        print(f"\nloader, batch {a.batch} x seq {a.seq_len}, {a.steps} batches:")
        print(f"  PackedLoader        {ours:8.0f} batches/s  ({ours * toks / 1e6:.1f} M tokens/s)")
        print(f"  random windows (ref) {ref:7.0f} batches/s  ({ref * toks / 1e6:.1f} M tokens/s)")
        print(f"  ratio ours/ref: {ours / ref:.2f}x")


if __name__ == "__main__":
    main()
