"""Needle in a haystack (paper section 5.2, the long-context figure): a passkey sentence hidden at depth
d (0 = the start, 1 = the end) of a haystack of L tokens built from corpus text, the model asked for it
after the haystack; accuracy per (L, d) cell over TRIALS random passkeys, drawn as the paper's heat map
(OUT/needle.png). Plus loss by position over long documents (OUT/loss_by_position.png): the mean token
loss in position buckets, for the model cut to each context length of the grid (in-process only).

The haystack is any text corpus: files under --data, else the standard library's modules (qwen2.data's
long-document reader). The grid's lengths are powers of two from 1K up to the model's context
(--limit caps them); depths are DEPTHS.
"""

from __future__ import annotations

import random
from pathlib import Path

KIND = "custom"
DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)
TRIALS = 2
NEEDLE = "\nThe pass key is {key}. Remember it. {key} is the pass key.\n"
QUESTION = "\nWhat is the pass key? The pass key is"


def haystack_ids(tokenizer, data_dir, need: int) -> list[int]:
    """At least `need` tokens of corpus text (repeated if the corpus is short)."""
    from qwen2.data.corpus import Source, long_source

    source = Source("needle", [data_dir]) if data_dir is not None else long_source(include_tests=False)
    ids: list[int] = []
    while len(ids) < need:
        before = len(ids)
        for doc in source.docs():
            ids += tokenizer.encode(doc.text)
            if len(ids) >= need:
                break
        if len(ids) == before:
            raise FileNotFoundError(f"needle: no text under {data_dir} to build a haystack from")
    return ids[:need]


def lengths_for(context: int, cap: int | None) -> list[int]:
    top = min(context, cap or context)
    out = [n for n in (2**k for k in range(10, 18)) if n <= top]
    return out or [top]


def prompt(tokenizer, hay: list[int], length: int, depth: float, key: str) -> str:
    needle = tokenizer.encode(NEEDLE.format(key=key))
    room = length - len(needle) - len(tokenizer.encode(QUESTION)) - 8  # 8: the answer's tokens
    body = hay[: max(0, room)]
    cut = int(depth * len(body))
    return tokenizer.decode(body[:cut]) + NEEDLE.format(key=key) + tokenizer.decode(body[cut:]) + QUESTION


def heat_map(cells: dict, lengths, depths, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grid = [[cells[(n, d)] for n in lengths] for d in depths]
    fig, ax = plt.subplots(figsize=(1.2 * len(lengths) + 2, 0.6 * len(depths) + 1.5))
    im = ax.imshow(grid, cmap="RdYlGn", vmin=0, vmax=1, aspect="auto")
    ax.set_xticks(range(len(lengths)), [f"{n // 1024}K" if n >= 1024 else str(n) for n in lengths])
    ax.set_yticks(range(len(depths)), [f"{int(d * 100)}%" for d in depths])
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("needle depth")
    ax.set_title("Needle in a haystack: passkey retrieval accuracy")
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def loss_by_position(backend, hay: list[int], lengths, path: Path, buckets: int = 32) -> dict:
    """Mean token loss per position bucket of the first `n` haystack tokens, for each length n."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = {}
    fig, ax = plt.subplots(figsize=(7, 4))
    for n in lengths:
        losses = backend.token_losses(hay[:n])
        k = min(buckets, len(losses))
        edges = [round(i * len(losses) / k) for i in range(k + 1)]
        xs = edges[1:]
        ys = [losses[a:b].mean().item() for a, b in zip(edges, edges[1:], strict=False)]
        curves[n] = ys
        ax.plot(xs, ys, label=f"{n} tokens")
    ax.set_xlabel("position")
    ax.set_ylabel("loss (nats / token)")
    ax.set_xscale("log")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return curves


def run(backend, *, out=None, data_dir=None, limit=None, shots=None) -> dict:
    from tqdm import tqdm

    from qwen2.eval.harness import SampleLog

    tok = backend.tokenizer
    lengths = lengths_for(backend.context, limit)
    hay = haystack_ids(tok, data_dir, max(lengths))
    rnd = random.Random(0)
    jobs = [
        (n, d, t, str(rnd.randrange(10_000, 100_000))) for n in lengths for d in DEPTHS for t in range(TRIALS)
    ]
    log = SampleLog(Path(out) / "samples" / "needle.jsonl") if out else None
    done = dict(log.done) if log else {}
    todo = [j for j in jobs if f"{j[0]}/{j[1]}/{j[2]}" not in done]
    for s in tqdm(range(0, len(todo), 4), desc="needle", unit="batch"):
        batch = todo[s : s + 4]
        texts = backend.generate([prompt(tok, hay, n, d, key) for n, d, _, key in batch], ["\n"], 8)
        for (n, d, t, key), text in zip(batch, texts, strict=False):
            rec = {
                "id": f"{n}/{d}/{t}",
                "length": n,
                "depth": d,
                "key": key,
                "output": text,
                "correct": float(key in text),
            }
            done[rec["id"]] = rec
            log and log.write(rec)
    if log:
        log.close()
    cells = {
        (n, d): sum(done[f"{n}/{d}/{t}"]["correct"] for t in range(TRIALS)) / TRIALS
        for n in lengths
        for d in DEPTHS
    }
    result = {
        "accuracy": sum(cells.values()) / len(cells),
        "n": len(jobs),
        "cells": {f"{n}/{d}": v for (n, d), v in cells.items()},
    }
    if out:
        heat_map(cells, lengths, DEPTHS, Path(out) / "needle.png")
        if hasattr(backend, "token_losses"):
            curves = loss_by_position(backend, hay, lengths, Path(out) / "loss_by_position.png")
            result["loss_by_position"] = {str(n): c for n, c in curves.items()}
    return result
