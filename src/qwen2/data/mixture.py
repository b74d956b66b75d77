"""Weighted mixtures of shard sets, as an endless, seekable order of documents.

The paper (section 3.1) tunes the mixture of its pre-training sources (more code and mathematics than
Qwen1.5) and gives the long-context stage a mixture of its own; the weights are not published. Here a
weight is the fraction of the *tokens* a source contributes (separators included), not of documents: a
source of long documents is drawn proportionally less often.

The order is built in blocks. Each source s has an endless stream of its documents: epoch after epoch,
each epoch a fresh permutation drawn from (seed, s, epoch). Block e takes the next
n_s(e) = floor((e+1) N q_s) - floor(e N q_s) documents from each source's stream, where q_s is the share
of documents that gives source s its share of tokens and N is the block's size in documents, and
interleaves them in a random order drawn from (seed, e). Any block is computed directly from (seed, e),
without replaying the ones before it, which is what makes the loader resumable in O(1); and each block
holds the exact proportions up to one document per source, so weights hold in expectation and also in
every block. With one source, N is its document count and block e is exactly its epoch e.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from qwen2.data.shards import ShardSet


class Mixture:
    """Shard sets with weights: `Mixture({"code": a, "prose": b}, weights={"code": 0.7, "prose": 0.3})`,
    `Mixture([(a, 0.7), (b, 0.3)])`, or `Mixture([a, b])` (weights by size: every document once an epoch).
    Weights are normalised; a source of weight 0 is left out."""

    def __init__(
        self,
        sources: Mapping[str, ShardSet] | Sequence,
        weights: Mapping[str, float] | Sequence[float] | None = None,
    ):
        if isinstance(sources, Mapping):
            names, sets = list(sources), list(sources.values())
        else:
            items = list(sources)
            if items and all(isinstance(x, tuple) for x in items):
                if weights is not None:
                    raise ValueError(
                        "Mixture: give weights either in (shards, weight) pairs or as `weights`, not both"
                    )
                sets, weights = [x[0] for x in items], [x[1] for x in items]
            else:
                sets = items
            names = [
                getattr(getattr(s, "path", None), "name", "") or f"source{i}" for i, s in enumerate(sets)
            ]
            if len(set(names)) != len(names):
                names = [f"{n}#{i}" for i, n in enumerate(names)]
        if not sets:
            raise ValueError("Mixture: no sources")
        for n, s in zip(names, sets):
            if not isinstance(s, ShardSet):
                raise TypeError(f"Mixture: source {n!r} is a {type(s).__name__}, not a ShardSet")
        if weights is None:
            w = np.array([s.n_tokens + len(s) for s in sets], np.float64)
        elif isinstance(weights, Mapping):
            unknown = set(weights) - set(names)
            if unknown:
                raise ValueError(
                    f"Mixture: weights for unknown sources {sorted(unknown)}; sources are {names}"
                )
            w = np.array([float(weights.get(n, 0.0)) for n in names])
        else:
            w = np.array([float(x) for x in weights])
            if len(w) != len(sets):
                raise ValueError(f"Mixture: {len(w)} weights for {len(sets)} sources")
        if (w < 0).any() or not np.isfinite(w).all() or w.sum() <= 0:
            raise ValueError(
                f"Mixture: weights must be finite, >= 0 and not all 0, got {dict(zip(names, w.tolist()))}"
            )
        for n, s, x in zip(names, sets, w):
            if x > 0 and len(s) == 0:
                raise ValueError(f"Mixture: source {n!r} has weight {x} but no documents")
        keep = w > 0
        self.names = [n for n, k in zip(names, keep) if k]
        self.sets: list[ShardSet] = [s for s, k in zip(sets, keep) if k]
        self.weights = w[keep] / w[keep].sum()
        # Documents per token of each source (separator included): q_s ∝ weight / mean document length.
        mean_len = np.array([(s.n_tokens + len(s)) / len(s) for s in self.sets])
        q = self.weights / mean_len
        self.doc_share = q / q.sum()
        total_docs = sum(len(s) for s in self.sets)
        self.block_docs = total_docs if len(self.sets) == 1 else max(total_docs, 64 * len(self.sets))
        self._perm_cache: dict[tuple, np.ndarray] = {}

    def __repr__(self) -> str:
        parts = ", ".join(f"{n}: {w:.3f}" for n, w in zip(self.names, self.weights))
        return f"Mixture({parts}; {self.block_docs} docs a block)"

    @property
    def meta(self) -> dict:
        """The sources' common shard metadata (`endoftext_id`, ...): keys on which they all agree."""
        metas = [s.meta for s in self.sets]
        return {k: v for k, v in metas[0].items() if all(m.get(k) == v for m in metas[1:])}

    def fingerprint(self) -> dict:
        """What identifies the document order, for checking a resumed loader reads the same data."""
        return {
            "sources": self.names,
            "docs": [len(s) for s in self.sets],
            "tokens": [s.n_tokens for s in self.sets],
            "weights": [round(float(w), 12) for w in self.weights],
        }

    def tokens(self, source: int, doc: int) -> np.ndarray:
        return self.sets[source][doc]

    def lengths(self, src: np.ndarray, doc: np.ndarray) -> np.ndarray:
        """Token counts of documents (src[i], doc[i])."""
        out = np.empty(len(doc), np.int64)
        for s, ss in enumerate(self.sets):
            m = src == s
            out[m] = ss.lengths[doc[m]]
        return out

    def _source_docs(self, s: int, start: int, stop: int, seed: int, shuffle: bool) -> np.ndarray:
        """Documents at positions [start, stop) of source s's endless stream (epoch after epoch)."""
        n = len(self.sets[s])
        pos = np.arange(start, stop, dtype=np.int64)
        if not shuffle:
            return pos % n
        out = np.empty(len(pos), np.int64)
        epochs = pos // n
        for ep in np.unique(epochs):
            key = (seed, s, int(ep))
            perm = self._perm_cache.get(key)
            if perm is None:
                if len(self._perm_cache) > 8:
                    self._perm_cache.clear()
                perm = self._perm_cache[key] = np.random.default_rng([seed, s, int(ep)]).permutation(n)
            m = epochs == ep
            out[m] = perm[pos[m] % n]
        return out

    def block(self, e: int, seed: int = 0, shuffle: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """Block e: (source index, document index) arrays, in reading order."""
        N = self.block_docs
        srcs, docs, keys = [], [], []
        for s, q in enumerate(self.doc_share):
            lo, hi = int(np.floor(e * N * q)), int(np.floor((e + 1) * N * q))
            srcs.append(np.full(hi - lo, s, np.int64))
            docs.append(self._source_docs(s, lo, hi, seed, shuffle))
            keys.append((np.arange(hi - lo) + 0.5) / max(hi - lo, 1))  # evenly spread, for shuffle=False
        src, doc = np.concatenate(srcs), np.concatenate(docs)
        if len(self.sets) > 1:
            order = (
                np.random.default_rng([seed, 0x313, e]).permutation(len(src))
                if shuffle
                else np.argsort(np.concatenate(keys), kind="stable")
            )
            src, doc = src[order], doc[order]
        return src, doc
