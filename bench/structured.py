"""Constrained decoding libraries on Qwen2's vocabulary: compile time of a small JSON schema and
per-token mask time, xgrammar vs llguidance vs outlines-core side by side (qwen2.grammar's choice).

Each library gets the built-in Qwen2 tokenizer (151,643 regular + 3 control tokens, model vocab 151,936),
compiles the same schema, then walks one valid document token by token (our BPE ids), filling the
next-token bitmask ([1, 151936 / 32] int32) before each token. Figures: tokenizer setup (once per server),
schema compile (once per request), mask fill per token (median and p99 over the walk).

    .venv/bin/python bench/structured.py [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from qwen2.tokenizer import load_tokenizer

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer"},
        "tags": {"type": "array", "items": {"type": "string"}},
        "address": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
    "required": ["name", "age", "tags", "address"],
    "additionalProperties": False,
}
DOC = {"name": "Ada Lovelace", "age": 36, "tags": ["mathematics", "poetry"], "address": {"city": "London"}}
VOCAB = 151936  # Qwen2's embedding rows (tokenizer ids stop at 151,645)


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def walk(fill, accept, ids):
    """Mask-fill seconds per token over `ids`; asserts every id is allowed by the mask before it."""
    mask = torch.zeros(1, (VOCAB + 31) // 32, dtype=torch.int32)
    times = []
    for t in ids:
        t0 = time.perf_counter()
        fill(mask)
        times.append(time.perf_counter() - t0)
        assert (int(mask[0, t // 32]) >> (t % 32)) & 1, f"token {t} masked out"
        accept(t)
    return times


def bench_xgrammar(tok, ids, stops):
    import xgrammar as xgr

    vocab = [tok.token_bytes(i) if i < tok.n_regular else b"" for i in range(len(tok))]
    info, setup = timed(
        lambda: xgr.TokenizerInfo(vocab, xgr.VocabType.RAW, vocab_size=VOCAB, stop_token_ids=stops)
    )
    compiler = xgr.GrammarCompiler(info, max_threads=2, cache_enabled=False)
    grammar, compile_s = timed(lambda: compiler.compile_json_schema(json.dumps(SCHEMA), any_whitespace=True))
    m = xgr.GrammarMatcher(grammar)
    times = walk(lambda mask: m.fill_next_token_bitmask(mask, 0), m.accept_token, ids)
    return setup, compile_s, times


def bench_llguidance(tok, ids, stops):
    import llguidance
    import llguidance.torch

    lt, setup = timed(
        lambda: llguidance.LLTokenizer.from_tiktoken(
            encoder=tok.ranks(),
            special_tokens=tok.control_tokens,
            pattern=tok.pattern,
            eos_token=stops,
            n_vocab=VOCAB,
        )
    )
    grammar = llguidance.LLMatcher.grammar_from_json_schema(SCHEMA, defaults={"whitespace_flexible": True})
    m, compile_s = timed(lambda: llguidance.LLMatcher(lt, grammar))
    assert not m.is_error(), m.get_error()
    times = walk(lambda mask: llguidance.torch.fill_next_token_bitmask(m, mask, 0), m.consume_token, ids)
    return setup, compile_s, times


def bench_outlines(tok, ids, stops):
    from outlines_core import Guide, Index, Vocabulary
    from outlines_core.json_schema import build_regex_from_schema

    ranks = tok.ranks()
    vocab, setup = timed(lambda: Vocabulary(stops[0], {b: [i] for b, i in ranks.items()}))
    index, compile_s = timed(lambda: Index(build_regex_from_schema(json.dumps(SCHEMA)), vocab))
    g = Guide(index)
    times = walk(lambda mask: g.write_mask_into(mask.data_ptr(), mask.numel(), 4), g.advance, ids)
    return setup, compile_s, times


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=3, help="runs per library; the best is shown")
    args = ap.parse_args()
    tok = load_tokenizer("Qwen2")
    stops = [tok.im_end_id, tok.endoftext_id]
    ids = tok.encode(json.dumps(DOC, separators=(",", ":")))
    print(f"vocabulary {len(tok)} tokens (model {VOCAB}); document of {len(ids)} tokens")
    print(f"{'library':<14} {'setup s':>9} {'compile ms':>11} {'mask med us':>12} {'mask p99 us':>12}")
    for name, fn in (
        ("xgrammar", bench_xgrammar),
        ("llguidance", bench_llguidance),
        ("outlines-core", bench_outlines),
    ):
        try:
            runs = [fn(tok, ids, stops) for _ in range(args.repeat)]
        except ImportError as e:
            print(f"{name:<14} not installed ({e.name})")
            continue
        setup = min(r[0] for r in runs)
        compile_s = min(r[1] for r in runs)
        per_tok = min((r[2] for r in runs), key=statistics.median)
        p99 = sorted(per_tok)[int(0.99 * (len(per_tok) - 1))]
        print(
            f"{name:<14} {setup:>9.2f} {compile_s * 1e3:>11.1f} {statistics.median(per_tok) * 1e6:>12.1f}"
            f" {p99 * 1e6:>12.1f}"
        )


if __name__ == "__main__":
    main()
