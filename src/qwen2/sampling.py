"""Sampling: the parameters of one request and pure logits processors over logits [B, V].

Semantics are transformers' logits processors (generation/logits_process.py), applied in the order
its `generate` builds them, plus OpenAI's presence / frequency penalties (applied, as vLLM does,
right after the repetition penalty and to the generated tokens only), with OpenAI's logit_bias first
and a per-row token mask (constrained decoding, qwen2.grammar) after the penalties:

    logit bias          l[t] += bias[t]                (OpenAI: added to the model's logits; greedy rows too)
    repetition penalty  seen tokens (prompt + output): l < 0 -> l * r, else l / r (CTRL, Keskar et al. 2019)
    presence/frequency  l -= frequency * count(output) + presence * [count(output) > 0]       (OpenAI)
    token mask          l[t] = -inf where the row's mask forbids t (a grammar's allowed next tokens)
    temperature         l / t                            (t == 0 means greedy: argmax after the penalties)
    top-k               drop l < the k-th largest value (ties with it are kept)
    top-p               sort ascending; drop tokens whose cumulative probability <= 1 - p; keep the top one
    min-p               drop p < min_p * p_max; keep the top one
    sample              multinomial over softmax(l), drawn from the row's own torch.Generator

Every processor takes one value per row, so one call serves a batch whose rows carry different
SamplingParams (the continuous-batching engine reuses `sample` this way). A disabled value
(top_k 0, top_p 1, min_p 0, penalties 1 / 0, no logit_bias, no mask) leaves its row untouched, bit for bit.

`check_prompt` is the one check of a request's prompt against the model (generate, ChatSession, the
CLI, the engine and the server all call it).
"""

from __future__ import annotations

import dataclasses
import math
import operator
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from qwen2.files import read_json_object

if TYPE_CHECKING:
    from qwen2.grammar import Grammar

LOGIT_BIAS_MAX = 100.0  # OpenAI's range for a logit_bias value: [-100, 100]


@dataclass
class SamplingParams:
    """One request's decoding parameters. `temperature=0` is greedy decoding."""

    temperature: float = 1.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off
    min_p: float = 0.0  # 0: off
    repetition_penalty: float = 1.0  # 1: off
    presence_penalty: float = 0.0  # OpenAI's, in [-2, 2]
    frequency_penalty: float = 0.0  # OpenAI's, in [-2, 2]
    max_new_tokens: int = 256
    seed: int | None = None  # None: a fresh random seed per call
    stop_token_ids: list[int] = field(default_factory=list)
    stop: list[str] = field(default_factory=list)  # stop strings: generation ends before the first match
    logit_bias: dict[int, float] = field(default_factory=dict)  # OpenAI's: token id -> bias in [-100, 100]
    # A compiled response format (qwen2.grammar): the output must match it. Shared by the choices of a
    # request; each sequence walks it with its own matcher.
    grammar: Grammar | None = field(default=None, compare=False, repr=False)

    def __post_init__(self):
        ids = self.stop_token_ids
        self.stop_token_ids = [int(i) for i in ([ids] if isinstance(ids, int) else ids or [])]
        self.stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        self.logit_bias = dict(self.logit_bias or {})
        self.validate()

    def validate(self) -> None:
        def check(name, ok, want):
            value = getattr(self, name)
            if isinstance(value, bool) or not ok(value):
                raise ValueError(f"SamplingParams: {name} must be {want}, got {value!r}")

        num = lambda v: isinstance(v, (int, float)) and math.isfinite(v)  # noqa: E731
        check("temperature", lambda v: num(v) and v >= 0, "a number >= 0 (0 = greedy)")
        check("top_k", lambda v: isinstance(v, int) and v >= 0, "an integer >= 0 (0 = off)")
        check("top_p", lambda v: num(v) and 0 < v <= 1, "a number in (0, 1] (1 = off)")
        check("min_p", lambda v: num(v) and 0 <= v <= 1, "a number in [0, 1] (0 = off)")
        check("repetition_penalty", lambda v: num(v) and v > 0, "a number > 0 (1 = off)")
        check("presence_penalty", lambda v: num(v) and -2 <= v <= 2, "a number in [-2, 2]")
        check("frequency_penalty", lambda v: num(v) and -2 <= v <= 2, "a number in [-2, 2]")
        check("max_new_tokens", lambda v: isinstance(v, int) and v >= 0, "an integer >= 0")
        check("seed", lambda v: v is None or isinstance(v, int), "an integer or None")
        if any(not s for s in self.stop):
            raise ValueError("SamplingParams: stop strings must be non-empty")
        for t, b in self.logit_bias.items():
            if isinstance(t, bool) or not isinstance(t, int) or t < 0:
                raise ValueError(f"SamplingParams: logit_bias keys must be token ids (ints >= 0), got {t!r}")
            if isinstance(b, bool) or not num(b) or abs(b) > LOGIT_BIAS_MAX:
                raise ValueError(
                    f"SamplingParams: logit_bias[{t}] must be a number in [-100, 100], got {b!r}"
                )

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def needs_history(self) -> bool:
        return self.repetition_penalty != 1 or self.presence_penalty != 0 or self.frequency_penalty != 0

    def replace(self, **changes) -> SamplingParams:
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_generation_config(cls, source: str | os.PathLike | dict | None, **overrides) -> SamplingParams:
        """Defaults from a checkpoint's generation_config.json (a directory, the file, or its dict),
        read as transformers reads it: `do_sample` false (or absent) means greedy; a sampling config
        without top_k gets transformers' default 50; eos_token_id (int or list) becomes stop_token_ids.
        Keyword overrides whose value is None are ignored, so CLI flags can be passed straight in."""
        d = {}
        if isinstance(source, dict):
            d = source
        elif source is not None:
            path = Path(source)
            path = path / "generation_config.json" if path.is_dir() else path
            if path.is_file():
                d = read_json_object(path)
        kw: dict = {}
        if d.get("do_sample"):
            kw["temperature"] = float(d.get("temperature", 1.0) if d.get("temperature") is not None else 1.0)
            kw["top_k"] = int(d["top_k"]) if d.get("top_k") is not None else 50
            if d.get("top_p") is not None:
                kw["top_p"] = float(d["top_p"])
            if d.get("min_p") is not None:
                kw["min_p"] = float(d["min_p"])
        else:
            kw["temperature"] = 0.0
        if d.get("repetition_penalty") is not None:
            kw["repetition_penalty"] = float(d["repetition_penalty"])
        if d.get("max_new_tokens") is not None:
            kw["max_new_tokens"] = int(d["max_new_tokens"])
        eos = d.get("eos_token_id")
        if eos is not None:
            kw["stop_token_ids"] = [eos] if isinstance(eos, int) else list(eos)
        kw.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**kw)


# ---- the one prompt check --------------------------------------------------------------------
CONTEXT = "the model's context (max_position_embeddings in config.json)"


def check_prompt(
    prompt_ids: Sequence[int],
    *,
    context: int,
    vocab_size: int,
    max_new_tokens: int | None = None,
    limit: str = CONTEXT,
) -> list[int]:
    """The prompt as a list of ints, or ValueError naming the limit it breaks and the fix.

    context: tokens a request may hold in all (prompt + output); `limit` says what sets it, for the
    message. vocab_size: ids must lie in [0, vocab_size). max_new_tokens: None: the prompt must leave
    room for at least one new token (callers that shorten the output to fit); a number: prompt +
    max_new_tokens must fit."""
    try:
        ids = [operator.index(t) for t in prompt_ids]
    except TypeError:
        raise ValueError("token ids must be integers: pass the prompt as a list of ints") from None
    if not ids:
        raise ValueError("the prompt is empty: give at least one token")
    bad = next((i for i, t in enumerate(ids) if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise ValueError(
            f"token id {ids[bad]} (prompt position {bad}) is outside the vocabulary "
            f"[0, {vocab_size}) (vocab_size in config.json): encode the prompt with this "
            "model's tokenizer"
        )
    n = len(ids)
    if max_new_tokens is None and n >= context:
        raise ValueError(
            f"the prompt has {n} tokens; {limit} is {context} tokens, which leaves no "
            "room for a new token: shorten the prompt"
        )
    if max_new_tokens is not None and n + max_new_tokens > context:
        raise ValueError(
            f"prompt ({n} tokens) + max_new_tokens ({max_new_tokens}) exceeds the context "
            f"of {context} tokens ({limit}): shorten the prompt or lower max_new_tokens"
        )
    return ids


# ---- token statistics for the penalties --------------------------------------------------------
class TokenHistory:
    """What the penalties need to know about each row's tokens, kept incrementally:
    `seen` [B, V] bool: in the prompt or the output (transformers' repetition penalty counts the prompt);
    `counts` [B, V] int32: occurrences in the output only (OpenAI / vLLM presence and frequency penalties).
    Ids outside [0, V) are ignored (transformers drops them too)."""

    def __init__(
        self,
        prompts: Sequence[Sequence[int]],
        vocab_size: int,
        device="cpu",
        outputs: Sequence[Sequence[int]] | None = None,
    ):
        b = len(prompts)
        self.seen = torch.zeros(b, vocab_size, dtype=torch.bool, device=device)
        self.counts = torch.zeros(b, vocab_size, dtype=torch.int32, device=device)
        for i, ids in enumerate(prompts):
            ids = [t for t in ids if 0 <= t < vocab_size]
            self.seen[i, ids] = True
        for i, ids in enumerate(outputs or []):
            ids = torch.tensor([t for t in ids if 0 <= t < vocab_size], dtype=torch.long, device=device)
            self.seen[i, ids] = True
            self.counts[i].index_add_(0, ids, torch.ones_like(ids, dtype=torch.int32))

    def append(self, next_ids: torch.Tensor) -> None:
        """Record one new token per row: next_ids [B] (rows with an id outside the vocabulary are skipped)."""
        v = self.seen.shape[1]
        ok = (next_ids >= 0) & (next_ids < v)
        rows = torch.arange(len(next_ids), device=next_ids.device)[ok]
        ids = next_ids[ok]
        self.seen[rows, ids] = True
        self.counts[rows, ids] += 1


# ---- processors: pure functions over fp32 logits [B, V]; one parameter value per row -------------
def _col(values, logits: torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(values, dtype=logits.dtype, device=logits.device).reshape(-1, 1)


def apply_logit_bias(logits: torch.Tensor, biases: Sequence[dict[int, float]]) -> torch.Tensor:
    """OpenAI's logit_bias: add each row's {token id: bias} to its logits, in one indexed add."""
    entries = [(i, t, b) for i, row in enumerate(biases) for t, b in row.items()]
    if not entries:
        return logits
    rows, cols, vals = zip(*entries)
    index = (torch.tensor(rows, device=logits.device), torch.tensor(cols, device=logits.device))
    values = torch.tensor(vals, dtype=logits.dtype, device=logits.device)
    return logits.index_put(index, values, accumulate=True)


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty) -> torch.Tensor:
    """transformers' RepetitionPenaltyLogitsProcessor: on seen tokens, l < 0 -> l * r, else l / r."""
    r = _col(penalty, logits)
    penalised = torch.where(logits < 0, logits * r, logits / r)
    return torch.where(seen & (r != 1), penalised, logits)


def apply_presence_frequency(logits: torch.Tensor, counts: torch.Tensor, presence, frequency) -> torch.Tensor:
    """OpenAI: l -= frequency * count + presence * (count > 0), counts over the generated tokens."""
    c = counts.to(logits.dtype)
    return logits - c * _col(frequency, logits) - (c > 0).to(logits.dtype) * _col(presence, logits)


def apply_temperature(logits: torch.Tensor, temperature) -> torch.Tensor:
    """transformers' TemperatureLogitsWarper; rows with temperature 0 (greedy) are left as they are."""
    t = _col(temperature, logits)
    return logits / torch.where(t > 0, t, torch.ones_like(t))


def top_k_filter(logits: torch.Tensor, top_k) -> torch.Tensor:
    """transformers' TopKLogitsWarper: drop tokens below the k-th largest logit of their row (k 0 = off)."""
    k = torch.as_tensor(top_k, device=logits.device).reshape(-1).clamp(max=logits.shape[-1])
    if logits.shape[0] != k.numel():
        k = k.expand(logits.shape[0])
    kmax = int(k.max())
    if kmax == 0:
        return logits
    values = torch.topk(logits, kmax, dim=-1).values  # [B, kmax], descending
    kth = values.gather(1, (k.clamp(min=1) - 1).reshape(-1, 1))
    drop = (logits < kth) & (k > 0).reshape(-1, 1)
    return logits.masked_fill(drop, float("-inf"))


def top_p_filter(logits: torch.Tensor, top_p) -> torch.Tensor:
    """transformers' TopPLogitsWarper (min_tokens_to_keep 1): sort ascending, drop the tokens whose
    cumulative probability is <= 1 - p; the most probable token always stays (p 1 = off)."""
    p = [float(v) for v in (top_p if isinstance(top_p, (list, tuple)) else [top_p])]
    active = _col([v < 1 for v in p], logits).expand(logits.shape[0], 1) > 0
    if not bool(active.any()):
        return logits
    # 1 - p in double precision, then rounded once to fp32, as transformers' Python-scalar comparison does.
    threshold = _col([1 - v for v in p], logits)
    sorted_logits, order = torch.sort(logits, descending=False)
    cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    drop_sorted = cum <= threshold
    drop_sorted[:, -1:] = False
    drop = torch.zeros_like(drop_sorted).scatter_(1, order, drop_sorted)
    return logits.masked_fill(drop & active, float("-inf"))


def min_p_filter(logits: torch.Tensor, min_p) -> torch.Tensor:
    """transformers' MinPLogitsWarper: drop tokens with p < min_p * p_max; the top token stays (0 = off)."""
    m = _col(min_p, logits).expand(logits.shape[0], 1)
    if not bool((m > 0).any()):
        return logits
    probs = logits.softmax(dim=-1)
    top = probs.amax(dim=-1, keepdim=True)
    drop = probs < m * top
    drop.scatter_(1, probs.argmax(dim=-1, keepdim=True), False)
    return logits.masked_fill(drop, float("-inf"))


def _per_row(params: SamplingParams | Sequence[SamplingParams], b: int) -> list[SamplingParams]:
    if isinstance(params, SamplingParams):
        return [params] * b
    params = list(params)
    if len(params) != b:
        raise ValueError(f"got {len(params)} SamplingParams for {b} rows of logits")
    return params


def _penalise(x: torch.Tensor, rows: list[SamplingParams], history: TokenHistory) -> torch.Tensor:
    if any(p.repetition_penalty != 1 for p in rows):
        x = apply_repetition_penalty(x, history.seen, [p.repetition_penalty for p in rows])
    if any(p.presence_penalty or p.frequency_penalty for p in rows):
        x = apply_presence_frequency(
            x, history.counts, [p.presence_penalty for p in rows], [p.frequency_penalty for p in rows]
        )
    return x


def process_logits(
    logits: torch.Tensor,
    params: SamplingParams | Sequence[SamplingParams],
    history: TokenHistory | Sequence[TokenHistory | None] | None = None,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """logits [B, V] -> fp32 logits [B, V] after every processor, in transformers' order; filtered
    tokens are -inf. Greedy rows get the logit bias, the penalties and the mask only (transformers'
    greedy search applies no warpers).
    history: one TokenHistory of B rows, or one single-row TokenHistory (or None) per row (the engine's
    sequences each keep their own). mask: [B, V] bool, True where a token is allowed (rows without a
    constraint all True), or None."""
    rows = _per_row(params, logits.shape[0])
    x = logits.float()
    if any(p.logit_bias for p in rows):
        x = apply_logit_bias(x, [p.logit_bias for p in rows])
    if isinstance(history, TokenHistory):
        x = _penalise(x, rows, history)
    else:
        per_row = list(history) if history is not None else [None] * len(rows)
        if any(p.needs_history and h is None for p, h in zip(rows, per_row)):
            raise ValueError("repetition / presence / frequency penalties need the token history")
        for i, (p, h) in enumerate(zip(rows, per_row)):
            if h is not None and p.needs_history:
                x[i : i + 1] = _penalise(x[i : i + 1], [p], h)
    if mask is not None:
        x = x.masked_fill(~mask, float("-inf"))
    sampling = [not p.greedy for p in rows]
    if not any(sampling):
        return x
    # Greedy rows skip the warpers (transformers applies them only when sampling).
    off = lambda v, p, default: v if not p.greedy else default  # noqa: E731
    if any(p.temperature not in (0, 1) for p in rows):
        x = apply_temperature(x, [p.temperature for p in rows])
    if any(p.top_k and not p.greedy for p in rows):
        x = top_k_filter(x, [off(p.top_k, p, 0) for p in rows])
    if any(p.top_p < 1 and not p.greedy for p in rows):
        x = top_p_filter(x, [off(p.top_p, p, 1.0) for p in rows])
    if any(p.min_p > 0 and not p.greedy for p in rows):
        x = min_p_filter(x, [off(p.min_p, p, 0.0) for p in rows])
    return x


def sample(
    logits: torch.Tensor,
    params: SamplingParams | Sequence[SamplingParams],
    generators: torch.Generator | Sequence[torch.Generator | None] | None = None,
    history: TokenHistory | Sequence[TokenHistory | None] | None = None,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Next token per row: logits [B, V] -> ids [B] (int64).

    params: one SamplingParams for every row, or one per row. generators: one torch.Generator shared by
    all rows, one per row (None entries use torch's default generator), or None. history: the rows'
    TokenHistory (or one per row, as process_logits takes), needed when a row uses a penalty. mask: the
    allowed tokens, [B, V] bool (process_logits). Greedy rows take the argmax (first on ties)."""
    b = logits.shape[0]
    rows = _per_row(params, b)
    x = process_logits(logits, rows, history, mask)
    out = x.argmax(dim=-1)
    if all(p.greedy for p in rows):
        return out
    probs = x.softmax(dim=-1)
    gens = generators if isinstance(generators, (list, tuple)) else [generators] * b
    for i, p in enumerate(rows):
        if not p.greedy:
            out[i] = torch.multinomial(probs[i], 1, generator=gens[i])[0]
    return out
