"""Quality filters and deduplication on crafted inputs, and what each reports."""

import inspect
import json.encoder

import numpy as np
import pytest

from qwen2.data import (
    DigitRatio,
    Doc,
    ExactDedup,
    FilterStats,
    Length,
    LineRepetition,
    MinHashDedup,
    NGramRepetition,
    SymbolRatio,
    apply_filters,
    default_dedup,
    default_filters,
)
from qwen2.data.dedup import MinHash, lsh_params, normalize
from texts import change_words, prose

CODE = inspect.getsource(json.encoder)  # ordinary Python source: every default filter keeps it
PROSE = prose()


@pytest.mark.parametrize("text", [CODE, PROSE])
def test_default_filters_keep_ordinary_code_and_prose(text):
    for f in default_filters():
        assert f(text), f.name


def test_length():
    f = Length(min_chars=50, max_chars=1000, min_words=5)
    assert not f("too short")
    assert not f("x" * 100)  # one word
    assert f(" ".join(["word"] * 20))
    assert not f("word " * 300)


def test_digit_and_symbol_ratios():
    table = "\n".join(" ".join(str(1000 + 7 * i + j) for j in range(8)) for i in range(40))
    assert not DigitRatio()(table) and DigitRatio()(PROSE)
    noise = "@@##$$%%^^&&**!!~~" * 50 + " some words"
    assert not SymbolRatio()(noise) and SymbolRatio()(PROSE) and SymbolRatio()(CODE)
    assert SymbolRatio()("") and DigitRatio()("   \n")
    # Non-ASCII letters are letters, not symbols.
    assert SymbolRatio()("Übergrößenträger naïve café 中文文本 " * 20)


def test_line_repetition():
    spam = "\n".join(
        ["Click here to subscribe to our newsletter"] * 10 + [f"line number {i} is unique" for i in range(5)]
    )
    assert not LineRepetition()(spam)
    assert LineRepetition()("\n".join(f"line number {i} is unique" for i in range(20)))
    short_repeats = "\n".join(
        ["else:", "    pass", ")"] * 30 + [f"value_{i} = compute({i})" for i in range(10)]
    )
    assert LineRepetition()(short_repeats)  # code's short lines do not count


def test_ngram_repetition():
    assert not NGramRepetition(n=3)("buy cheap pills now " * 60 + PROSE[:200])
    assert NGramRepetition(n=3)(PROSE)


def test_apply_filters_reports_docs_and_bytes_per_filter():
    docs = [
        Doc(PROSE, "good"),
        Doc("tiny", "short"),
        Doc("1234 5678 " * 60, "digits"),
        Doc(CODE, "code"),
        Doc("ab", "also short"),
    ]
    filters = [Length(min_chars=100, min_words=10), DigitRatio()]
    stats = FilterStats(["length", "digit_ratio"])
    kept = list(apply_filters(docs, filters, stats))
    assert [d.origin for d in kept] == ["good", "code"]
    rows = stats.report()
    assert [r["step"] for r in rows] == ["length", "digit_ratio"]
    assert rows[0]["docs_in"] == 5 and rows[0]["docs_dropped"] == 2 and rows[0]["bytes_dropped"] == 6
    assert rows[1]["docs_in"] == 3 and rows[1]["docs_dropped"] == 1 and rows[1]["bytes_dropped"] == 600
    assert rows[1]["docs_kept"] == 2 and rows[1]["bytes_kept"] == len(PROSE.encode()) + len(CODE.encode())


# ---- dedup ---------------------------------------------------------------------------------------
def test_exact_dedup_normalises_whitespace_and_case():
    d = ExactDedup()
    assert d(PROSE)
    assert not d(PROSE)
    assert not d("  " + PROSE.upper().replace(" ", "\n\t "))
    assert d(prose(seed=1))
    assert normalize("  A\tb\n\nC ") == "a b c"


def test_minhash_estimates_jaccard():
    a, b = prose(400, seed=0), change_words(prose(400, seed=0), 20, seed=1)
    mh = MinHash(num_perm=256)
    sa, sb = set(mh.shingles(a).tolist()), set(mh.shingles(b).tolist())
    true = len(sa & sb) / len(sa | sb)
    est = float(np.mean(mh.signature(a) == mh.signature(b)))
    assert abs(est - true) < 0.1, (est, true)
    assert np.array_equal(MinHash().signature(a), MinHash().signature(a))  # deterministic


def test_lsh_params():
    b, r = lsh_params(0.8, 128)
    assert b * r <= 128 and b > 1 and r > 1
    # The S-curve 1 - (1 - s^r)^b rises through the threshold.
    p = lambda s: 1 - (1 - s**r) ** b  # noqa: E731
    assert p(0.5) < 0.1 and p(0.8) > 0.9 and p(0.9) > 0.99


def test_near_dups_dropped_and_non_dups_kept():
    base = prose(300, seed=0)
    d = MinHashDedup(threshold=0.8)
    assert d(base)
    for k in range(1, 4):
        assert not d(change_words(base, 3, seed=k)), "a copy with 3 words changed is a near duplicate"
    assert not d(base + " The end.")
    for s in range(1, 6):
        assert d(prose(300, seed=s)), "a different document is kept"
    assert d(change_words(base, 120, seed=9)), "a heavily rewritten one is kept"
    assert d.n == 7


def test_dedup_chain_in_apply_filters_keeps_the_first_copy():
    base = prose(300, seed=3)
    docs = [
        Doc(base, "first"),
        Doc(prose(300, seed=4), "other"),
        Doc(base.upper(), "exact copy"),
        Doc(change_words(base, 2, seed=5), "near copy"),
        Doc(prose(300, seed=5), "third"),
    ]
    steps = default_dedup()
    stats = FilterStats(["exact_dedup", "minhash_dedup"])
    kept = [x.origin for x in apply_filters(docs, steps, stats)]
    assert kept == ["first", "other", "third"]
    assert stats.dropped_docs == {"exact_dedup": 1, "minhash_dedup": 1}
