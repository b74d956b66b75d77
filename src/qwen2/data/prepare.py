"""One call from raw corpora to tokenized shards: read -> filter -> dedup -> tokenize -> shards.

`prepare_corpus` streams each source's documents through the quality filters and the deduplicators
(shared across sources, so a document already kept from an earlier source is a duplicate in a later
one), tokenizes the survivors in batches and writes one shard set per source under `out_dir/<name>/`.
It writes `out_dir/report.json` last, saying what every step removed (documents and bytes) per source
and in total. Rerunning with the same inputs, tokenizer and settings returns that report without
redoing the work; the report's `fingerprint` decides.

`open_corpus(out_dir)` opens the result for the loader: the ShardSet of a single source, or a Mixture
of all sources with the weights their `Source`s gave.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from tqdm.auto import tqdm

from qwen2.data.corpus import Source, as_sources
from qwen2.data.dedup import default_dedup
from qwen2.data.filters import FilterStats, apply_filters, default_filters, describe, filter_names
from qwen2.data.mixture import Mixture
from qwen2.data.shards import MANIFEST, ShardSet, ShardWriter, write_json

REPORT = "report.json"
_PROBE = "Hello, world!\n\ndef f(x):\n    return x ** 2  # 12345 üñïcødé 中文\n"


def tokenizer_fingerprint(tok) -> dict:
    """What identifies a tokenizer well enough to reuse shards made with it."""
    return {
        "name": str(getattr(tok, "name", type(tok).__name__)),
        "endoftext_id": int(tok.endoftext_id),
        "probe": hashlib.sha256(json.dumps(list(tok.encode(_PROBE))).encode()).hexdigest()[:16],
    }


def files_digest(files: Sequence[Path]) -> str:
    """A short hash of the files' paths, sizes and modification times: changes when any of them does."""
    h = hashlib.sha256()
    for f in files:
        st = f.stat()
        h.update(f"{f}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def _resolve(steps, default: Callable[[], list], what: str) -> list:
    if steps == "default" or steps is True:
        return default()
    if steps is None or steps is False:
        return []
    steps = list(steps)
    for s in steps:
        if not callable(s):
            raise TypeError(f"prepare_corpus: {what} must be callables text -> bool, got {type(s).__name__}")
    return steps


def prepare_corpus(
    sources,
    tokenizer,
    out_dir: str | os.PathLike,
    filters="default",
    dedup="default",
    *,
    shard_tokens: int = 1 << 24,
    batch_docs: int = 256,
    progress: bool = True,
    overwrite: bool = False,
) -> dict:
    """Read, filter, deduplicate, tokenize and shard `sources` into `out_dir`; returns the report (also in
    `out_dir/report.json`).

    sources:  a path, a list of paths (one source "default"), a `Source`, a list of Sources, or
              {name: paths | Source}; see corpus.py
    tokenizer: anything with `encode(text)`, `encode_batch(texts)` and `endoftext_id`
    filters:  "default" (filters.default_filters()), a list of callables text -> bool, or None
    dedup:    "default" (exact, then MinHash at Jaccard 0.8), a list of such stateful callables (fresh ones:
              they remember every document they kept), or None
    """
    sources = as_sources(sources)
    filters = _resolve(filters, default_filters, "filters")
    dedup = _resolve(dedup, default_dedup, "dedup")
    steps = filters + dedup
    names = filter_names(steps)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {s.name: s.files() for s in sources}
    fingerprint = {
        "sources": [
            {
                "name": s.name,
                "kind": s.kind,
                "weight": s.weight,
                "text_field": s.text_field,
                "max_chars": s.max_chars,
                "files": len(files[s.name]),
                "files_digest": files_digest(files[s.name]),
            }
            for s in sources
        ],
        "filters": describe(filters),
        "dedup": describe(dedup),
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "shard_tokens": shard_tokens,
    }
    cached = _cached_report(out_dir, fingerprint) if not overwrite else None
    if cached is not None:
        return cached
    (out_dir / REPORT).unlink(missing_ok=True)

    started = time.perf_counter()
    report = {"format": "qwen2-corpus", "version": 1, "fingerprint": fingerprint, "sources": {}}
    for source in sources:
        report["sources"][source.name] = _prepare_source(
            source,
            files[source.name],
            tokenizer,
            out_dir / source.name,
            steps,
            names,
            fingerprint["tokenizer"],
            shard_tokens,
            batch_docs,
            progress,
        )
    report["total"] = _total(report["sources"].values(), names)
    report["seconds"] = round(time.perf_counter() - started, 3)
    write_json(out_dir / REPORT, report)
    return report


def _prepare_source(
    source: Source,
    files: list[Path],
    tok,
    shard_dir: Path,
    steps,
    names,
    tok_fp,
    shard_tokens,
    batch_docs,
    progress,
) -> dict:
    t0 = time.perf_counter()
    stats = FilterStats(names)
    bar = tqdm(
        total=sum(f.stat().st_size for f in files),
        unit="B",
        unit_scale=True,
        disable=not progress,
        desc=f"prepare {source.name}",
        dynamic_ncols=True,
    )

    def read():
        for doc in source.docs(files):
            bar.update(len(doc.text.encode("utf-8")))
            yield doc

    meta = {"endoftext_id": int(tok.endoftext_id), "tokenizer": tok_fp, "source": source.name}
    tokens, kept, batch = 0, 0, []
    with ShardWriter(shard_dir, shard_tokens, meta) as writer:

        def flush():
            nonlocal tokens, kept
            for ids in tok.encode_batch(batch):
                writer.add(ids)
                tokens += len(ids)
            kept += len(batch)
            batch.clear()
            bar.set_postfix(docs=kept, tokens=tokens, refresh=False)

        for doc in apply_filters(read(), steps, stats):
            batch.append(doc.text)
            if len(batch) >= batch_docs:
                flush()
        flush()
    bar.close()
    kept_docs = stats.docs_in - sum(stats.dropped_docs.values())
    kept_bytes = stats.bytes_in - sum(stats.dropped_bytes.values())
    return {
        "dir": source.name,
        "kind": source.kind,
        "weight": source.weight,
        "read": {
            "files": len(files),
            "skipped_files": len(source.skipped),
            "skipped_examples": source.skipped[:10],
            "docs": stats.docs_in,
            "bytes": stats.bytes_in,
        },
        "steps": stats.report(),
        "kept": {
            "docs": kept_docs,
            "bytes": kept_bytes,
            "tokens": writer.n_tokens,
            "shards": len(writer.shards),
            "docs_written": writer.n_docs,
        },
        "seconds": round(time.perf_counter() - t0, 3),
    }


def _total(per_source, names) -> dict:
    per_source = list(per_source)
    rows = []
    for i, n in enumerate(names):
        rows.append(
            {
                k: (n if k == "step" else sum(s["steps"][i][k] for s in per_source))
                for k in per_source[0]["steps"][i]
            }
        )
    return {
        "read": {
            k: sum(s["read"][k] for s in per_source) for k in ("files", "skipped_files", "docs", "bytes")
        },
        "steps": rows,
        "kept": {
            k: sum(s["kept"][k] for s in per_source)
            for k in ("docs", "bytes", "tokens", "shards", "docs_written")
        },
    }


def _cached_report(out_dir: Path, fingerprint: dict) -> dict | None:
    path = out_dir / REPORT
    if not path.is_file():
        return None
    try:
        report = json.loads(path.read_text())
    except json.JSONDecodeError:
        return None
    # Compare through JSON so tuples and lists, ints and floats read back alike.
    if report.get("fingerprint") != json.loads(json.dumps(fingerprint)):
        return None
    if not all((out_dir / s["dir"] / MANIFEST).is_file() for s in report["sources"].values()):
        return None
    return report


def open_corpus(path: str | os.PathLike, weights: dict[str, float] | None = None) -> ShardSet | Mixture:
    """A prepared corpus for the loader: a shard set folder -> ShardSet; a `prepare_corpus` folder -> the
    ShardSet of its one source, or a Mixture of its sources weighted as prepared (or by `weights`)."""
    path = Path(path)
    if (path / MANIFEST).is_file():
        return ShardSet(path)
    if not (path / REPORT).is_file():
        raise FileNotFoundError(
            f"{path}: neither a shard set ({MANIFEST}) nor a prepared corpus ({REPORT}); "
            "run prepare_corpus first"
        )
    report = json.loads((path / REPORT).read_text())
    sets = {name: ShardSet(path / s["dir"]) for name, s in report["sources"].items()}
    if len(sets) == 1 and weights is None:
        return next(iter(sets.values()))
    if weights is None:
        weights = {name: s["weight"] for name, s in report["sources"].items()}
    return Mixture(sets, weights)
