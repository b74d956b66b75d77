"""Perplexity and bits-per-byte on any text corpus (paper section 5 reports losses beside benchmarks):
documents read by qwen2.data's corpus readers (.txt / .py / .jsonl / .parquet files under --data, or the
standard library's files, the speedrun's default corpus), each cut into windows of at most WINDOW
tokens scored from <|endoftext|> (non-overlapping, so every token is scored once).

bits_per_byte = -sum log p / ln 2 / UTF-8 bytes (comparable across tokenizers); token_perplexity =
exp(-sum log p / tokens). One sample per document in OUT/samples/perplexity.jsonl (resumable).
"""

from __future__ import annotations

import math
from pathlib import Path

KIND = "custom"
SHOTS = 0
WINDOW = 1024
DEFAULT_DOCS = 50


def documents(data_dir, limit):
    from qwen2.data.corpus import default_corpus_files, list_files, read_file

    files = list_files([data_dir]) if data_dir is not None else default_corpus_files(include_tests=False)
    n = limit or DEFAULT_DOCS
    for f in files:
        for i, doc in enumerate(read_file(Path(f))):
            if doc.text.strip():
                yield f"{doc.origin or f}#{i}", doc.text
                n -= 1
                if n <= 0:
                    return


def windows(tokenizer, text: str, window: int) -> list[str]:
    """The text cut at token boundaries into pieces of at most `window` tokens (decoded back to text, so
    either backend scores them; byte-level BPE round-trips except at a split UTF-8 character, so a cut
    moves forward to a boundary that decodes cleanly)."""
    ids = tokenizer.encode(text)
    out, start = [], 0
    while start < len(ids):
        end = min(len(ids), start + window)
        while end < len(ids) and "\ufffd" in tokenizer.decode(ids[end - 1 : end + 1]):
            end += 1
        out.append(tokenizer.decode(ids[start:end]))
        start = end
    return out


def run(backend, *, out=None, data_dir=None, limit=None, shots=None) -> dict:
    from tqdm import tqdm

    from qwen2.eval.harness import SampleLog

    log = SampleLog(Path(out) / "samples" / "perplexity.jsonl") if out else None
    done = dict(log.done) if log else {}
    recs = []
    for key, text in tqdm(list(documents(data_dir, limit)), desc="perplexity", unit="doc"):
        if key not in done:
            pieces = windows(backend.tokenizer, text, WINDOW)
            lls = backend.loglikelihood([("", p) for p in pieces])
            rec = {
                "id": key,
                "ll": sum(x[0] for x in lls),
                "bytes": len(text.encode()),
                "tokens": len(backend.tokenizer.encode(text)),
            }
            done[key] = rec
            log and log.write(rec)
        recs.append(done[key])
    if log:
        log.close()
    ll = sum(r["ll"] for r in recs)
    nbytes, ntok = sum(r["bytes"] for r in recs), sum(r["tokens"] for r in recs)
    return {
        "bits_per_byte": -ll / math.log(2) / max(1, nbytes),
        "token_perplexity": math.exp(-ll / max(1, ntok)),
        "n": len(recs),
    }
