"""Structured output: OpenAI's `response_format` compiled into a grammar whose matcher tells each step
which next tokens keep the output valid (constrained decoding). An optional extra: `qwen2[structured]`.

Reference: OpenAI's Structured Outputs (`response_format`: {"type": "text"} | {"type": "json_object"} |
{"type": "json_schema", "json_schema": {"name", "schema", "strict"}}) and llguidance (guidance-ai, MIT;
the Earley parser + lexer over the token trie that vLLM and SGLang also ship). The library was chosen by
measurement, `bench/structured.py --repeat 3` (best of 3) on Qwen2's 151,646-token vocabulary
(2026-12-03, 2 shared cores):

    library        tokenizer setup   schema compile   mask per token (median / p99)
    llguidance     0.85 s (once)     1.8 ms           26 us / 315 us
    xgrammar       0.10 s            24 ms            26 us / 64 us
    outlines-core  0.30 s            655 ms           9 us / 624 us

A schema compiles once per request and the mask costs the same, so llguidance wins on compile latency;
it also needs no other package (xgrammar pulls transformers and triton).

How it is used: `GrammarCompiler(tokenizer, vocab_size, stop_token_ids).compile(response_format)` gives a
`Grammar` (None for plain text), which goes into SamplingParams.grammar; each sequence gets its own
`Matcher` (`grammar.matcher()`), advanced on every accepted token. `token_mask(matchers, V)` fills the
batch's bitmasks in one parallel call and unpacks them into one [B, V] bool mask for qwen2.sampling.

Departures: the grammar's end is the stop tokens given (<|im_end|>, <|endoftext|>): once the document is
complete only a stop token is allowed, and an incomplete one cannot stop (max_tokens still cuts it).
JSON is written with ", " and ": " and no other whitespace (free whitespace lets a weak model loop on
spaces). `json_object` is any JSON object (OpenAI also wants the word "JSON" in the messages; we do not).
`strict` is accepted either way: the output always follows the schema; a schema llguidance cannot
compile is a ValueError naming the field (unknown keywords are ignored, as JSON Schema says).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Sequence

import torch

from qwen2.extras import require

EXTRA, FEATURE = "structured", "response_format (structured output)"
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def _llguidance():
    return require("llguidance", EXTRA, FEATURE)


class Matcher:
    """One sequence's position in its grammar: which tokens may come next, advanced token by token."""

    def __init__(self, ll):
        self._ll = ll

    def accept(self, token: int) -> bool:
        """Advance over a sampled token; False (and `error` set) if the grammar does not allow it."""
        return self._ll.consume_token(token)

    @property
    def done(self) -> bool:
        """The output is complete (a stop token was accepted, or nothing more can follow)."""
        return self._ll.is_stopped()

    @property
    def error(self) -> str | None:
        return self._ll.get_error() if self._ll.is_error() else None


class Grammar:
    """A compiled response format: immutable, shared by a request's choices; `matcher()` per sequence."""

    def __init__(self, template, vocab_size: int, source: str):
        self._template, self.vocab_size, self.source = template, vocab_size, source

    def matcher(self) -> Matcher:
        return Matcher(self._template.deep_copy())


class GrammarCompiler:
    """Compiles response formats for one tokenizer. The library's view of the vocabulary (token bytes,
    control tokens, stop tokens) takes about a second for Qwen2, so it is built on first use and kept."""

    def __init__(self, tokenizer, vocab_size: int, stop_token_ids: Sequence[int]):
        self.tokenizer, self.vocab_size = tokenizer, vocab_size
        self.stop_token_ids = sorted(set(stop_token_ids))
        if not self.stop_token_ids:
            raise ValueError("GrammarCompiler needs at least one stop token id (the grammar's end)")
        self._ll_tokenizer = None
        self._lock = threading.Lock()

    def _tokenizer(self):
        ll = _llguidance()
        with self._lock:
            if self._ll_tokenizer is None:
                tok = self.tokenizer
                self._ll_tokenizer = ll.LLTokenizer.from_tiktoken(
                    encoder=tok.ranks(),
                    special_tokens=tok.control_tokens,
                    pattern=tok.pattern,
                    eos_token=self.stop_token_ids,
                    n_vocab=self.vocab_size,
                )
            return self._ll_tokenizer

    def compile(self, response_format: dict | None) -> Grammar | None:
        """OpenAI's response_format (a dict) -> a Grammar, or None for plain text. ValueError naming the
        field for a malformed format or a schema the library cannot compile; MissingExtra without it."""
        rf = response_format or {"type": "text"}
        kind = rf.get("type") if isinstance(rf, dict) else None
        if kind == "text":
            return None
        if kind == "json_object":
            schema, where = {"type": "object"}, "response_format"
        elif kind == "json_schema":
            spec = rf.get("json_schema")
            if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), dict):
                raise ValueError("response_format.json_schema: give {'name': ..., 'schema': {...}}")
            schema, where = spec.get("schema") or {}, "response_format.json_schema.schema"
        else:
            raise ValueError(
                f"response_format.type must be 'text', 'json_object' or 'json_schema', got {kind!r}"
            )
        ll = _llguidance()
        try:
            source = ll.LLMatcher.grammar_from_json_schema(json.dumps(schema), defaults=JSON_OPTIONS)
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
        template = ll.LLMatcher(self._tokenizer(), source, log_level=0)
        if template.is_error():
            raise ValueError(f"{where}: {template.get_error().splitlines()[0][:300]}")
        return Grammar(template, self.vocab_size, source)


_executor = None
_executor_lock = threading.Lock()


def _parallel():
    """llguidance's thread pool for filling a batch's masks in one call (one per process, made once)."""
    global _executor
    with _executor_lock:
        if _executor is None:
            _executor = _llguidance().LLExecutor()
        return _executor


def token_mask(matchers: Sequence[Matcher | None], vocab_size: int, device="cpu") -> torch.Tensor:
    """[B, vocab_size] bool: True where row i's matcher allows the token (rows with None: all True).
    The bitmasks (32 tokens an int32, as llguidance and xgrammar write them) are filled in one parallel
    call, then unpacked with one vectorised shift on `device`."""
    words = -(-vocab_size // 32)
    bits = torch.full((len(matchers), words), -1, dtype=torch.int32)
    jobs = [(m._ll, i) for i, m in enumerate(matchers) if m is not None]
    if jobs:
        _parallel().unsafe_compute_mask_ptr(jobs, bits.data_ptr(), words * 4, len(matchers))
    bits = bits.to(device)
    shifts = torch.arange(32, dtype=torch.int32, device=device)
    mask = ((bits.unsqueeze(-1) >> shifts) & 1).bool().reshape(len(matchers), words * 32)
    return mask[:, :vocab_size]
