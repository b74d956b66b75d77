"""Heuristic quality filters, each reporting what it removed.

The paper (section 3.1) filters pre-training data with "heuristic and model-based methods" without
listing them; these are the usual heuristics of Gopher (Rae et al. 2021, appendix A) and RefinedWeb:
document length, the share of symbol and digit characters, and repetition of lines and word n-grams.
Thresholds are looser than Gopher's web-text ones so that ordinary source code passes (code repeats
short lines such as `else:` and is rich in punctuation); the defaults keep about 95% of the Python
standard library's bytes and drop generated tables, binary-ish test data and near-empty files.

A filter is a callable `text -> bool` (True keeps) with a `name`; `FilterStats` counts documents and
bytes kept and dropped by each, in pipeline order (a document is charged to the first filter that
drops it).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np


@dataclass(frozen=True)
class Length:
    """Keep documents with min_chars <= characters <= max_chars and at least min_words words."""

    min_chars: int = 200
    max_chars: int = 5_000_000
    min_words: int = 20
    name: str = "length"

    def __call__(self, text: str) -> bool:
        return self.min_chars <= len(text) <= self.max_chars and len(text.split()) >= self.min_words


@dataclass(frozen=True)
class SymbolRatio:
    """Drop documents whose share of punctuation/symbol characters (not letter, digit or space) among
    non-space characters is above `max_ratio`. Prose is about 0.05, Python source 0.15-0.25, hex dumps
    and ASCII art more."""

    max_ratio: float = 0.35
    name: str = "symbol_ratio"

    def __call__(self, text: str) -> bool:
        nonspace, _, symbols = char_classes(text)
        return nonspace == 0 or symbols / nonspace <= self.max_ratio


@dataclass(frozen=True)
class DigitRatio:
    """Drop documents whose share of digits among non-space characters is above `max_ratio` (tables of
    numbers, test vectors)."""

    max_ratio: float = 0.25
    name: str = "digit_ratio"

    def __call__(self, text: str) -> bool:
        nonspace, digits, _ = char_classes(text)
        return nonspace == 0 or digits / nonspace <= self.max_ratio


_SPACE = np.zeros(128, bool)
_SPACE[[9, 10, 11, 12, 13, 32]] = True
_DIGIT = np.zeros(128, bool)
_DIGIT[ord("0") : ord("9") + 1] = True
_SYMBOL = np.array([not (chr(i).isalnum() or chr(i).isspace()) for i in range(128)])


def char_classes(text: str) -> tuple[int, int, int]:
    """(non-space, digit, symbol) character counts, vectorised: classes are ASCII's, and every non-ASCII
    character counts as a letter (scripts without spaces or case are not penalised)."""
    codes = np.frombuffer(text.encode("utf-32-le"), np.uint32)
    ascii_ = codes[codes < 128]
    return (len(codes) - int(_SPACE[ascii_].sum()), int(_DIGIT[ascii_].sum()), int(_SYMBOL[ascii_].sum()))


@dataclass(frozen=True)
class LineRepetition:
    """Drop documents where lines repeat: the fraction of lines (of at least `min_line_chars` characters
    after stripping, so `else:` and `)` do not count) that repeat an earlier line exceeds `max_fraction`,
    or those repeats hold more than `max_char_fraction` of such lines' characters (Gopher: 0.30 / 0.20
    over all lines, for web text)."""

    max_fraction: float = 0.40
    max_char_fraction: float = 0.40
    min_line_chars: int = 12
    name: str = "line_repetition"

    def __call__(self, text: str) -> bool:
        lines = [s for s in (ln.strip() for ln in text.splitlines()) if len(s) >= self.min_line_chars]
        if len(lines) < 4:
            return True
        seen: set[str] = set()
        dup = dup_chars = 0
        for ln in lines:
            if ln in seen:
                dup += 1
                dup_chars += len(ln)
            else:
                seen.add(ln)
        total_chars = sum(map(len, lines))
        return dup / len(lines) <= self.max_fraction and dup_chars / total_chars <= self.max_char_fraction


@dataclass(frozen=True)
class NGramRepetition:
    """Drop documents dominated by one word n-gram: the characters covered by the most frequent n-gram
    (occurrences x its length) over all word characters exceed `max_fraction` (Gopher's "top n-gram"
    rule, 0.20 / 0.18 / 0.16 for n = 2 / 3 / 4 on web text)."""

    n: int = 3
    max_fraction: float = 0.20
    min_words: int = 50  # shorter documents are judged by the other filters
    name: str = "ngram_repetition"

    def __call__(self, text: str) -> bool:
        words = text.split()
        if len(words) < max(self.min_words, self.n + 1):
            return True
        grams = Counter(zip(*(words[i:] for i in range(self.n))))
        gram, count = grams.most_common(1)[0]
        if count < 2:
            return True
        covered = count * sum(map(len, gram))
        return covered / sum(map(len, words)) <= self.max_fraction


def default_filters() -> list[Callable[[str], bool]]:
    """The filters `prepare_corpus` runs by default, in order (cheap first)."""
    return [Length(), DigitRatio(), SymbolRatio(), LineRepetition(), NGramRepetition()]


@dataclass
class FilterStats:
    """Documents and bytes (UTF-8) into the filter chain, and dropped by each filter."""

    names: list[str]
    docs_in: int = 0
    bytes_in: int = 0
    dropped_docs: dict[str, int] = field(default_factory=dict)
    dropped_bytes: dict[str, int] = field(default_factory=dict)

    def __post_init__(self):
        for n in self.names:
            self.dropped_docs.setdefault(n, 0)
            self.dropped_bytes.setdefault(n, 0)

    def report(self) -> list[dict]:
        """One row per filter in order: docs/bytes in, dropped and kept at that step."""
        rows, docs, nbytes = [], self.docs_in, self.bytes_in
        for n in self.names:
            d, b = self.dropped_docs[n], self.dropped_bytes[n]
            rows.append(
                {
                    "step": n,
                    "docs_in": docs,
                    "bytes_in": nbytes,
                    "docs_dropped": d,
                    "bytes_dropped": b,
                    "docs_kept": docs - d,
                    "bytes_kept": nbytes - b,
                }
            )
            docs, nbytes = docs - d, nbytes - b
        return rows


def filter_names(filters: Sequence[Callable[[str], bool]]) -> list[str]:
    names = [getattr(f, "name", None) or getattr(f, "__name__", type(f).__name__) for f in filters]
    if len(set(names)) != len(names):
        # Two filters of one kind (say NGramRepetition for n=2 and n=4): number them so the report tells
        # them apart.
        names = [f"{n}#{i}" if names.count(n) > 1 else n for i, n in enumerate(names)]
    return names


def describe(steps: Sequence[Callable[[str], bool]]) -> list[dict]:
    """Filters' (or deduplicators') names and settings, for the report and a preparation's fingerprint:
    a step's `config()` if it has one, else its dataclass fields, else its qualified name."""
    out = []
    for n, f in zip(filter_names(steps), steps):
        if hasattr(f, "config"):
            params = f.config()
        else:
            try:
                params = {k: v for k, v in asdict(f).items() if k != "name"}
            except TypeError:  # not a dataclass: a plain function
                params = {
                    "callable": f"{getattr(f, '__module__', '?')}.{getattr(f, '__qualname__', repr(f))}"
                }
        out.append({"name": n, **params})
    return out


def apply_filters(
    docs: Iterable,
    filters: Sequence[Callable[[str], bool]],
    stats: FilterStats | None = None,
    text=lambda d: d.text,
) -> Iterator:
    """Yield the documents every filter keeps, counting into `stats` (made fresh if None). `docs` may be
    `Doc`s or anything `text(doc)` turns into a string."""
    names = filter_names(filters)
    stats = stats if stats is not None else FilterStats(names)
    for d in docs:
        t = text(d)
        size = len(t.encode("utf-8"))
        stats.docs_in += 1
        stats.bytes_in += size
        for n, f in zip(names, filters):
            if not f(t):
                stats.dropped_docs[n] += 1
                stats.dropped_bytes[n] += size
                break
        else:
            yield d
