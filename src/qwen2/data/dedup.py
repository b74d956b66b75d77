"""Deduplication: exact (hash of normalised text) and near-duplicate (MinHash + LSH), streaming.

The paper (section 3.1) deduplicates pre-training data without details; this is the usual recipe
(Broder 1997; Lee et al. 2022): documents are sets of word 5-grams, a MinHash signature of
`num_perm` hash functions estimates the Jaccard similarity of two such sets, and locality-sensitive
hashing over `bands` x `rows` of the signature finds candidate pairs without comparing all pairs.
A candidate whose estimated Jaccard similarity reaches `threshold` is a duplicate.

Both deduplicators are filters in the sense of filters.py (`text -> bool`, True keeps) with state:
the first document of a duplicate group is kept and later ones are dropped, so the result depends on
the order of the stream, which corpus.py makes deterministic. Memory grows with the kept documents
(16 bytes each for exact, 8 x num_perm for MinHash): fine for corpora of millions of documents on one
machine; larger corpora are deduplicated per shard of the input first.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
import zlib

import numpy as np

_MULT = np.uint64(0x100000001B3)  # FNV-1a 64-bit prime: an odd multiplier for the n-gram polynomial
_WORDS = re.compile(r"\w+")
_trapezoid = getattr(np, "trapezoid", None) or np.trapz  # numpy < 2 has only trapz


def normalize(text: str) -> str:
    """NFKC, lower case, runs of whitespace -> one space, stripped: what "the same text" means here."""
    return " ".join(unicodedata.normalize("NFKC", text).lower().split())


class ExactDedup:
    """Drop a document whose normalised text was seen before (a 128-bit BLAKE2b of it)."""

    name = "exact_dedup"

    def __init__(self):
        self.seen: set[bytes] = set()

    def config(self) -> dict:
        return {}

    def __call__(self, text: str) -> bool:
        key = hashlib.blake2b(normalize(text).encode("utf-8"), digest_size=16).digest()
        if key in self.seen:
            return False
        self.seen.add(key)
        return True


class MinHash:
    """MinHash signatures of word n-gram sets. An n-gram is a 64-bit polynomial hash of its words' crc32;
    hash i maps it through the SplitMix64 finaliser after an xor with a seeded 64-bit key (a bijection
    that behaves like a random permutation; linear hashes mod a prime with small multipliers do not,
    and bias the estimate upwards). Deterministic across processes (never Python's salted hash())."""

    def __init__(self, num_perm: int = 128, ngram: int = 5, seed: int = 1):
        rng = np.random.default_rng(seed)
        self.keys = rng.integers(0, np.iinfo(np.uint64).max, num_perm, dtype=np.uint64, endpoint=True)[
            :, None
        ]
        self.num_perm, self.ngram = num_perm, ngram
        self._word_hash: dict[str, int] = {}

    def shingles(self, text: str) -> np.ndarray:
        """Unique 64-bit hashes of the word n-grams of the normalised text (one for a shorter text)."""
        words = _WORDS.findall(normalize(text))
        cache = self._word_hash
        if len(cache) > 1_000_000:  # a vocabulary cache, bounded on web-scale corpora
            cache.clear()
        h = np.fromiter(
            (cache.get(w) or cache.setdefault(w, zlib.crc32(w.encode("utf-8")) + 1) for w in words),
            np.uint64,
            len(words),
        )
        n = min(self.ngram, len(h))
        if n == 0:
            return np.zeros(1, np.uint64)
        s = h[: len(h) - n + 1].copy()
        for j in range(1, n):  # polynomial hash of n consecutive word hashes, mod 2^64 (numpy wraps)
            s = s * _MULT + h[j : len(h) - n + 1 + j]
        return np.unique(s)

    def signature(self, text: str) -> np.ndarray:
        """uint64[num_perm]: for each hash, the least value over the document's n-grams."""
        x = self.shingles(text)
        sig = np.full(self.num_perm, np.iinfo(np.uint64).max, np.uint64)
        for i in range(0, len(x), 8192):  # bound the [num_perm, chunk] intermediate to 8 MiB
            sig = np.minimum(sig, _splitmix64(self.keys ^ x[None, i : i + 8192]).min(axis=1))
        return sig


def _splitmix64(z: np.ndarray) -> np.ndarray:
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def lsh_params(threshold: float, num_perm: int, fn_weight: float = 0.95) -> tuple[int, int]:
    """(bands, rows) with bands * rows <= num_perm minimising the weighted false-positive plus
    false-negative probability mass around `threshold`, where a pair at similarity s becomes a candidate
    with probability 1 - (1 - s^rows)^bands. False negatives weigh 0.95: a candidate is checked on the
    whole signature anyway, so a false positive costs only a comparison while a false negative keeps a
    duplicate (at 0.8 and 128 hashes: 16 x 8, finding 95% of pairs at the threshold, 99% at 0.85)."""
    best, best_err = (1, num_perm), float("inf")
    lo, hi = np.linspace(0, threshold, 201), np.linspace(threshold, 1, 201)
    for b in range(1, num_perm + 1):
        r = num_perm // b
        fp = _trapezoid(1 - (1 - lo**r) ** b, lo)
        fn = _trapezoid((1 - hi**r) ** b, hi)
        err = (1 - fn_weight) * fp + fn_weight * fn
        if err < best_err:
            best, best_err = (b, r), err
    return best


class MinHashDedup:
    """Drop a document whose estimated Jaccard similarity (word `ngram`-gram sets) with an earlier kept
    one reaches `threshold`. Candidates come from LSH buckets; each is then checked on the full signature,
    so LSH only costs recall near the threshold, never precision."""

    name = "minhash_dedup"

    def __init__(self, threshold: float = 0.8, num_perm: int = 128, ngram: int = 5, seed: int = 1):
        if not 0 < threshold <= 1:
            raise ValueError(f"MinHashDedup: threshold must be in (0, 1], not {threshold}")
        self.threshold, self.num_perm, self.ngram, self.seed = threshold, num_perm, ngram, seed
        self.minhash = MinHash(num_perm, ngram, seed)
        self.bands, self.rows = lsh_params(threshold, num_perm)
        self.buckets: list[dict[bytes, list[int]]] = [{} for _ in range(self.bands)]
        self.signatures = np.zeros((1024, num_perm), np.uint64)
        self.n = 0

    def config(self) -> dict:
        return {
            "threshold": self.threshold,
            "num_perm": self.num_perm,
            "ngram": self.ngram,
            "seed": self.seed,
            "bands": self.bands,
            "rows": self.rows,
        }

    def similarity(self, a: str, b: str) -> float:
        """Estimated Jaccard similarity of two texts' n-gram sets."""
        return float(np.mean(self.minhash.signature(a) == self.minhash.signature(b)))

    def __call__(self, text: str) -> bool:
        sig = self.minhash.signature(text)
        keys = [sig[i * self.rows : (i + 1) * self.rows].tobytes() for i in range(self.bands)]
        candidates = {j for band, k in zip(self.buckets, keys) for j in band.get(k, ())}
        if candidates:
            c = np.fromiter(candidates, np.int64, len(candidates))
            if (self.signatures[c] == sig).mean(axis=1).max() >= self.threshold:
                return False
        if self.n == len(self.signatures):
            self.signatures = np.concatenate([self.signatures, np.zeros_like(self.signatures)])
        self.signatures[self.n] = sig
        for band, k in zip(self.buckets, keys):
            band.setdefault(k, []).append(self.n)
        self.n += 1
        return True


def default_dedup() -> list:
    """The deduplicators `prepare_corpus` runs by default, after the filters: exact, then MinHash at 0.8."""
    return [ExactDedup(), MinHashDedup()]
