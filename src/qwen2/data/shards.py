"""Tokenized shards: documents as uint32 ids with an index of document boundaries, memory-mapped.

A shard set is a folder:

    manifest.json              {"format": "qwen2-shards", "version": 1, "n_docs", "n_tokens", "shards": [...],
                                "meta": {"endoftext_id", "tokenizer", ...}}; written last
    shard_00000.tokens.npy     uint32[n_tokens]   the documents' ids back to back, no separators
    shard_00000.offsets.npy    uint64[n_docs + 1] document d is tokens[offsets[d]:offsets[d + 1]]
    ...

uint32 because Qwen2's 151,646 ids do not fit 16 bits. Documents are stored without `<|endoftext|>`:
the loader puts it between documents when it packs them (loader.py), so shards can be reordered,
mixed and selected by length. A document never straddles two shards. Every file is written under a
temporary name, fsynced and renamed, and the manifest comes last: a folder without manifest.json is
an unfinished write and is refused on reading, never read half-written.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from qwen2.files import atomic_open

MANIFEST = "manifest.json"
FORMAT, VERSION = "qwen2-shards", 1


def write_json(path: str | os.PathLike, obj) -> None:
    """JSON, atomically (atomic_open)."""
    with atomic_open(path, "w") as f:
        json.dump(obj, f, indent=1)
        f.write("\n")


class ShardWriter:
    """Append tokenized documents; a shard is written each time `shard_tokens` ids have gathered (a
    document is never split, so a shard may be one document longer). `close()` writes the manifest.

        with ShardWriter(out_dir, meta={"endoftext_id": tok.endoftext_id}) as w:
            for ids in tok.encode_batch(texts):
                w.add(ids)
        shards = ShardSet(out_dir)

    Opening a writer on an existing shard set removes its manifest first (the folder is unfinished
    until `close()`), and `close()` deletes shard files the new manifest does not list.
    """

    def __init__(self, out_dir: str | os.PathLike, shard_tokens: int = 1 << 24, meta: dict | None = None):
        if shard_tokens < 1:
            raise ValueError(f"ShardWriter: shard_tokens must be >= 1, not {shard_tokens}")
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        (self.out_dir / MANIFEST).unlink(missing_ok=True)
        self.shard_tokens, self.meta = shard_tokens, dict(meta or {})
        self.shards: list[dict] = []
        self._pending: list[np.ndarray] = []
        self._pending_tokens = 0
        self.n_docs = self.n_tokens = 0
        self.closed = False

    def add(self, ids: Sequence[int] | np.ndarray) -> None:
        """Append one document's ids (an empty document is skipped: it would only add a separator)."""
        a = np.asarray(ids)
        if a.size == 0:
            return
        if a.ndim != 1 or not np.issubdtype(a.dtype, np.integer):
            raise ValueError(
                f"ShardWriter: a document must be a 1-D sequence of integer ids, got {a.dtype}{list(a.shape)}"
            )
        if int(a.min()) < 0 or int(a.max()) >= 1 << 32:
            raise ValueError(f"ShardWriter: ids must lie in [0, 2^32), got [{int(a.min())}, {int(a.max())}]")
        self._pending.append(a.astype(np.uint32, copy=False))
        self._pending_tokens += a.size
        if self._pending_tokens >= self.shard_tokens:
            self._flush()

    def _flush(self) -> None:
        if not self._pending:
            return
        name = f"shard_{len(self.shards):05d}"
        lengths = np.fromiter((len(a) for a in self._pending), np.uint64, len(self._pending))
        offsets = np.zeros(len(lengths) + 1, np.uint64)
        np.cumsum(lengths, out=offsets[1:])
        with atomic_open(self.out_dir / f"{name}.tokens.npy") as f:
            np.save(f, np.concatenate(self._pending))
        with atomic_open(self.out_dir / f"{name}.offsets.npy") as f:
            np.save(f, offsets)
        self.shards.append({"name": name, "n_docs": len(lengths), "n_tokens": int(offsets[-1])})
        self.n_docs += len(lengths)
        self.n_tokens += int(offsets[-1])
        self._pending, self._pending_tokens = [], 0

    def close(self) -> dict:
        """Write the last shard and the manifest; returns the manifest."""
        if self.closed:
            raise ValueError(f"{self.out_dir}: ShardWriter already closed")
        self._flush()
        manifest = {
            "format": FORMAT,
            "version": VERSION,
            "dtype": "uint32",
            "n_docs": self.n_docs,
            "n_tokens": self.n_tokens,
            "shards": self.shards,
            "meta": self.meta,
        }
        write_json(self.out_dir / MANIFEST, manifest)
        listed = {f"{s['name']}.{kind}.npy" for s in self.shards for kind in ("tokens", "offsets")}
        for stale in self.out_dir.glob("shard_*.npy"):
            if stale.name not in listed:
                stale.unlink()
        self.closed = True
        return manifest

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, *_) -> None:
        if exc_type is None:
            self.close()


def write_shards(
    docs: Iterable[Sequence[int]],
    out_dir: str | os.PathLike,
    shard_tokens: int = 1 << 24,
    meta: dict | None = None,
) -> ShardSet:
    """Write lists of ids as a shard set and open it."""
    with ShardWriter(out_dir, shard_tokens, meta) as w:
        for ids in docs:
            w.add(ids)
    return ShardSet(out_dir)


class ShardSet:
    """A shard set, memory-mapped: `len(s)` documents, `s[i]` a uint32 view of document i, `s.lengths`
    their token counts. `select()` and `split()` give views over a subset of the documents (no copy).

    `s.meta` is what the writer recorded: `endoftext_id` (the loader's separator), the tokenizer, ...
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        manifest_path = self.path / MANIFEST
        if not manifest_path.is_file():
            raise FileNotFoundError(
                f"{manifest_path}: missing, so {self.path} is not a finished shard set (an interrupted write "
                "leaves none); run prepare_corpus / ShardWriter again"
            )
        m = json.loads(manifest_path.read_text())
        if m.get("format") != FORMAT or m.get("version") != VERSION:
            raise ValueError(
                f"{manifest_path}: format {m.get('format')!r} v{m.get('version')}, "
                f"expected {FORMAT!r} v{VERSION}"
            )
        self.manifest, self.meta = m, m.get("meta", {})
        self._tokens, offsets = [], []
        for s in m["shards"]:
            tok = np.load(self.path / f"{s['name']}.tokens.npy", mmap_mode="r")
            off = np.load(self.path / f"{s['name']}.offsets.npy")
            if (
                tok.dtype != np.uint32
                or len(tok) != s["n_tokens"]
                or len(off) != s["n_docs"] + 1
                or off[-1] != len(tok)
            ):
                raise ValueError(
                    f"{self.path}/{s['name']}: shard files disagree with {MANIFEST} (sizes or dtype)"
                )
            self._tokens.append(tok)
            offsets.append(off.astype(np.int64))
        self._offsets = offsets
        # Global document g lives in shard _shard[g] at local index g - _first[_shard[g]].
        counts = np.array([len(o) - 1 for o in offsets], np.int64)
        self._first = np.concatenate([[0], np.cumsum(counts)])
        self._shard = np.repeat(np.arange(len(offsets)), counts)
        all_lengths = np.concatenate([np.diff(o) for o in offsets]) if offsets else np.zeros(0, np.int64)
        self._ids: np.ndarray | None = None  # a view's global document ids; None = every document
        self.lengths: np.ndarray = all_lengths  # int64[len(self)]

    # ---- reading -------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.lengths)

    @property
    def n_tokens(self) -> int:
        return int(self.lengths.sum())

    def __getitem__(self, i: int) -> np.ndarray:
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"document {i} of {n} in {self.path}")
        g = int(self._ids[i]) if self._ids is not None else i % n
        s = int(self._shard[g])
        local = g - int(self._first[s])
        off = self._offsets[s]
        return self._tokens[s][off[local] : off[local + 1]]

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    def __repr__(self) -> str:
        view = "" if self._ids is None else " (view)"
        return f"ShardSet({str(self.path)!r}{view}: {len(self)} docs, {self.n_tokens} tokens)"

    # ---- views ---------------------------------------------------------------------------------
    def _view(self, keep: np.ndarray) -> ShardSet:
        """A view of the documents at positions `keep` (sorted) of this set."""
        v = object.__new__(ShardSet)
        v.__dict__.update(self.__dict__)
        base = self._ids if self._ids is not None else np.arange(len(self))
        v._ids, v.lengths = base[keep], self.lengths[keep]
        return v

    def select(self, min_tokens: int = 0, max_tokens: int | None = None) -> ShardSet:
        """The documents with min_tokens <= length (<= max_tokens): long documents for the long-context
        stage, e.g. `shards.select(min_tokens=4 * seq_len)`."""
        keep = self.lengths >= min_tokens
        if max_tokens is not None:
            keep &= self.lengths <= max_tokens
        return self._view(np.flatnonzero(keep))

    def split(
        self, val_fraction: float = 0.01, seed: int = 0, min_val_docs: int = 1
    ) -> tuple[ShardSet, ShardSet]:
        """(train, val): a held-out set of about `val_fraction` of the documents (at least `min_val_docs`),
        chosen at random from `seed`; the two are disjoint and cover the set."""
        n = len(self)
        n_val = min(n - 1, max(min_val_docs, round(val_fraction * n)))
        if n < 2 or n_val < 1:
            raise ValueError(f"{self.path}: {n} document(s) cannot be split into train and val")
        val = np.zeros(n, bool)
        val[np.random.default_rng([seed, 0x5A1]).permutation(n)[:n_val]] = True
        return self._view(np.flatnonzero(~val)), self._view(np.flatnonzero(val))
