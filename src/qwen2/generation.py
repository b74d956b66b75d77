"""Generation: the static KV cache, prefill / decode_one, streaming generate() and stream_text().

gpt-fast's shape (a preallocated cache, a prefill, a one-token decode step that alone may be
compiled, an explicit torch.Generator), with the sampling of transformers (sampling.py).

The cache is preallocated per layer ([L, B, Hkv, S_max, d]) and written at each token's position,
so rows of a batch may sit at different positions: prompts of different lengths are right-padded
and each row's positions are its own (no padding mask: a row's slot j is visible to its query at
position p iff j <= p; the padding's slots lie beyond the row's position and are overwritten by the
row's own generated tokens before they become visible).

Stop strings are matched on the decoded text; tokens that could still begin a stop string are held
back, so a stop string split across tokens is never emitted (see `_StopText`).
"""

from __future__ import annotations

import codecs
import time
from typing import Iterator, Sequence

import torch

from qwen2.config import ModelConfig
from qwen2.sampling import SamplingParams, TokenHistory, sample

__all__ = ["KVCache", "SamplingParams", "prefill", "decode_one", "generate", "stream_text", "texts_of", "Generation",
           "ChatSession"]


class KVCache:
    """Static KV cache: the `mask` / `update` interface of attention.py over preallocated buffers.

    A forward over positions that all start at 0 (a prefill into an empty cache) attends to its own
    keys with the plain causal mask (`mask` returns None) instead of to the whole buffer; any other
    forward attends to the slots up to the batch's furthest position, masked per row.
    """

    def __init__(self, config: ModelConfig, batch_size: int, max_len: int, *, dtype=torch.float32, device="cpu"):
        # One tensor per layer, not one [L, ...] tensor: a compiled step that writes into a view of a shared
        # buffer copies the whole buffer for every layer's write (functionalization), 24 times per token.
        shape = (batch_size, config.num_key_value_heads, max_len, config.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        self.max_len = max_len
        self.slots = torch.arange(max_len, device=device)
        self.rows = torch.arange(batch_size, device=device)
        self._window: int | None = None  # slots the current forward reads; None: only its own (fresh prefill)

    def mask(self, positions: torch.Tensor) -> torch.Tensor | None:
        """positions [B, T] -> [B, 1, T, W] (slot j visible at position p iff j <= p), or None for a
        prefill from position 0 (plain causal attention over the new keys). W = furthest position + 1."""
        t = positions.shape[1]
        if t > 1 and not bool(positions[:, 0].any()):
            self._window = None
            return None
        if torch.compiler.is_compiling():  # every slot: a window that does not depend on the data keeps the
            w = self.max_len                 # compiled decode step one graph (the mask hides unwritten slots)
        else:
            w = int(positions.max()) + 1
            if w > self.max_len:
                raise ValueError(f"position {w - 1} is beyond the KV cache ({self.max_len} slots)")
        self._window = w
        return (self.slots[:w] <= positions[..., None]).unsqueeze(1)

    def update(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor):
        """Write k, v [B, Hkv, T, d] at `positions` [B, T]; return the keys and values to attend to."""
        kc, vc = self.k[layer_idx], self.v[layer_idx]  # [B, Hkv, S, d]
        b, _, t, _ = k.shape
        if b == 1:  # one sequence (generate, chat): index_copy_ costs about half the advanced-index write
            kc.index_copy_(2, positions[0], k)
            vc.index_copy_(2, positions[0], v)
        else:
            rows = self.rows[:b, None].expand(b, t)
            kc[rows, :, positions] = k.transpose(1, 2)  # advanced indices first: [B, T, Hkv, d]
            vc[rows, :, positions] = v.transpose(1, 2)
        if self._window is None:
            return k, v
        return kc[:, :, : self._window], vc[:, :, : self._window]


# ---- the two model calls ------------------------------------------------------------------------
@torch.no_grad()
def prefill(model, input_ids: torch.Tensor, cache: KVCache, lengths: torch.Tensor | None = None,
            start: int = 0) -> torch.Tensor:
    """Run the (right-padded) prompts input_ids [B, T] at positions start..start+T-1 into `cache`; return
    the fp32 logits [B, V] at each row's last real token (lengths [B], default T). Only those rows go
    through the output layer."""
    b, t = input_ids.shape
    positions = (start + torch.arange(t, device=input_ids.device)).expand(b, t)
    h = model.hidden_states(input_ids, positions, cache)  # [B, T, H]
    last = torch.full((b,), t - 1, device=h.device) if lengths is None else lengths.to(h.device) - 1
    return model.logits(h[torch.arange(b, device=h.device), last]).float()


@torch.no_grad()
def decode_one(model, tokens: torch.Tensor, positions: torch.Tensor, cache: KVCache) -> torch.Tensor:
    """One step: tokens [B, 1] at positions [B, 1] -> fp32 logits [B, V]. The function torch.compile wraps."""
    return model(tokens, positions, cache)[:, -1].float()


_COMPILED: dict = {}


def compiled_decode_one(model):
    """decode_one compiled for this model (once per model; falls back to eager without torch.compile)."""
    if not hasattr(torch, "compile"):
        return decode_one
    key = id(model)
    if key not in _COMPILED:
        _COMPILED.clear()  # one model at a time: don't keep old models alive
        # On CPU, inductor's C++ wrapper: its default Python wrapper spends ~6 ms a step on Qwen2-0.5B
        # allocating and checking buffers for 24 layers, as long as the fused kernels themselves.
        cpu = model.model.embed_tokens.weight.device.type == "cpu"
        _COMPILED[key] = torch.compile(decode_one, dynamic=True, options={"cpp_wrapper": cpu})
    return _COMPILED[key]


# ---- stop strings over a token stream -----------------------------------------------------------
class _StopText:
    """Decodes one row's generated ids incrementally and decides what is safe to release.

    A token is released once every character it contributes to lies before the earliest position at
    which a stop string could still begin (the longest suffix of the text that is a prefix of a stop
    string is held back, and so is an incomplete UTF-8 character). When a stop string appears, the
    text before it and the tokens wholly before it are final; the rest is dropped.
    """

    def __init__(self, tokenizer, stop: Sequence[str]):
        self.tokenizer, self.stop = tokenizer, list(stop)
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._bytes = getattr(tokenizer, "decode_bytes", None)
        self.text = ""
        self.ids: list[int] = []
        self.reach: list[int] = []  # per id: the number of characters up to and including its last byte's
        self.released_ids = 0
        self.released_chars = 0
        self.stopped = False

    def _feed_text(self, token: int | None) -> None:
        if token is None:
            new = self._utf8.decode(b"", final=True)
        elif self._bytes is not None:
            new = self._utf8.decode(self._bytes([token]))
        else:  # a tokenizer without byte access: whole characters per token
            new = self.tokenizer.decode([token])
        self.text += new

    def _pending(self) -> bool:
        return bool(self._utf8.getstate()[0])

    def push(self, token: int | None) -> tuple[list[int], str]:
        """Add one id (None: end of stream, flush everything). Returns (ids, text) released now."""
        if self.stopped:
            return [], ""
        before = len(self.text)
        self._feed_text(token)
        if token is not None:
            self.ids.append(token)
            self.reach.append(len(self.text) + (1 if self._pending() else 0))
        # Earliest complete match, searching from where a match could begin.
        start = max(0, before - max((len(s) for s in self.stop), default=0))
        hits = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
        if hits:
            self.stopped = True
            limit = min(hits)
        elif token is None:
            limit = len(self.text)
        else:
            limit = len(self.text) - self._held_suffix()
        ids_end = self.released_ids
        while ids_end < len(self.ids) and self.reach[ids_end] <= limit:
            ids_end += 1
        if token is None and not self.stopped:
            ids_end = len(self.ids)
        out_ids, out_text = self.ids[self.released_ids : ids_end], self.text[self.released_chars : limit]
        self.released_ids, self.released_chars = ids_end, max(self.released_chars, limit)
        return out_ids, out_text

    def _held_suffix(self) -> int:
        """Length of the longest suffix of the text that is a proper prefix of some stop string."""
        best = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(self.text)), best, -1):
                if self.text.endswith(s[:n]):
                    best = n
                    break
        return best


# ---- generate -----------------------------------------------------------------------------------
class Generation:
    """The iterator `generate` returns. Iterating gives the new token ids as they are final (one int per
    step for a single prompt; for a batch, one list per step holding each row's newly released ids).
    After the loop: `finish_reasons` ("stop" or "length" per row), `output_ids` per row, and timings
    (`prefill_seconds`, `decode_seconds`, `decode_tokens`, `decode_tokens_per_second`)."""

    def __init__(self, run: Iterator, batched: bool, rows: int):
        self._run, self.batched = run, batched
        self.finish_reasons: list[str | None] = [None] * rows
        self.output_ids: list[list[int]] = [[] for _ in range(rows)]
        self.sampled: list[list[int]] = [[] for _ in range(rows)]  # every sampled id, held-back ones included
        self.texts: list[str] = [""] * rows  # with stop strings / a tokenizer: the released text per row
        self.prompt_tokens = 0
        self.prefill_seconds = 0.0
        self.decode_seconds = 0.0
        self.decode_tokens = 0
        self._queue: list[int] = []

    @property
    def decode_tokens_per_second(self) -> float:
        return self.decode_tokens / self.decode_seconds if self.decode_seconds else 0.0

    @property
    def finish_reason(self) -> str | None:
        return self.finish_reasons[0]

    def __iter__(self):
        return self

    def __next__(self):
        if self.batched:
            return next(self._run)
        while not self._queue:
            self._queue = list(next(self._run)[0])
        return self._queue.pop(0)


def _as_rows(prompt_ids, tokenizer) -> tuple[list[list[int]], bool]:
    if isinstance(prompt_ids, str):
        if tokenizer is None:
            raise ValueError("a text prompt needs tokenizer=")
        return [tokenizer.encode(prompt_ids)], False
    if isinstance(prompt_ids, torch.Tensor):
        prompt_ids = prompt_ids.tolist()
    prompt_ids = list(prompt_ids)
    if prompt_ids and isinstance(prompt_ids[0], (list, tuple, torch.Tensor)):
        return [list(map(int, p.tolist() if isinstance(p, torch.Tensor) else p)) for p in prompt_ids], True
    return [list(map(int, prompt_ids))], False


def generate(
    model,
    prompt_ids,
    max_new_tokens: int | None = None,
    *,
    temperature: float | None = None,
    top_p: float | None = None,
    top_k: int | None = None,
    min_p: float | None = None,
    repetition_penalty: float | None = None,
    presence_penalty: float | None = None,
    frequency_penalty: float | None = None,
    seed: int | None = None,
    stop_token_ids: Sequence[int] | None = None,
    stop: Sequence[str] | str | None = None,
    tokenizer=None,
    params: SamplingParams | None = None,
    compile: bool = False,
) -> Generation:
    """Stream new token ids from `model` (a qwen2.Qwen2) for one prompt or a batch of prompts.

    prompt_ids: list[int] (or a 1-D tensor, or text with tokenizer=) for one prompt, yielding ints;
    list[list[int]] (different lengths welcome) for a batch, yielding per step a list of each row's
    newly released ids. A stop token ends its row and is yielded as the row's last id; a stop string
    (needs tokenizer=) ends its row, and neither it nor the tokens it overlaps are yielded.

    Parameters default to `params` (default: `model.generation_config` when the loader attached one,
    else greedy as transformers' default); keyword arguments that are not None override them.
    Randomness: row i draws from its own torch.Generator seeded with seed + i (seed None: random).
    compile=True compiles the decode step with torch.compile (prefill stays eager).
    """
    rows, batched = _as_rows(prompt_ids, tokenizer)
    if params is None:
        params = SamplingParams.from_generation_config(getattr(model, "generation_config", None))
    params = params.replace(**{k: v for k, v in dict(
        max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p,
        repetition_penalty=repetition_penalty, presence_penalty=presence_penalty,
        frequency_penalty=frequency_penalty, seed=seed,
        stop_token_ids=list(stop_token_ids) if stop_token_ids is not None else None,
        stop=[stop] if isinstance(stop, str) else (list(stop) if stop is not None else None),
    ).items() if v is not None})
    if params.stop and tokenizer is None:
        raise ValueError("stop strings need tokenizer=")
    if not rows or any(not r for r in rows):
        raise ValueError("every prompt needs at least one token")
    context = model.config.max_position_embeddings
    longest = max(len(r) for r in rows)
    if longest >= context:
        raise ValueError(f"the prompt has {longest} tokens; the model's context is {context} tokens "
                         f"(max_position_embeddings in config.json): shorten the prompt")
    vocab = model.config.vocab_size
    bad = next((t for r in rows for t in r if not 0 <= t < vocab), None)
    if bad is not None:
        raise ValueError(f"token id {bad} is outside the model's vocabulary (0..{vocab - 1})")
    gen = Generation(None, batched, len(rows))
    gen._run = _generate(model, rows, params, tokenizer, compile, gen)
    return gen


def _generate(model, rows: list[list[int]], params: SamplingParams, tokenizer, compile: bool, gen: Generation,
              cache: KVCache | None = None, cached: int = 0):
    """The loop behind `generate`. With `cache` (one row), its first `cached` slots already hold the
    first `cached` prompt tokens (ChatSession), and only the rest of the prompt is prefilled."""
    config = model.config
    device = model.model.embed_tokens.weight.device
    b = len(rows)
    lengths = torch.tensor([len(r) for r in rows], device=device)
    longest = int(lengths.max())
    max_new = min(params.max_new_tokens, config.max_position_embeddings - longest)
    gen.prompt_tokens = int(lengths.sum()) - cached
    gen.sampled = [[] for _ in range(b)]
    if max_new <= 0:
        gen.finish_reasons = ["length"] * b
        return
    if cache is None:
        cache = KVCache(config, b, longest + max_new, dtype=_activation_dtype(model), device=device)
    elif cache.max_len < longest + max_new:
        raise ValueError(f"the KV cache has {cache.max_len} slots; this needs {longest + max_new}")
    ids = torch.zeros(b, longest - cached, dtype=torch.long, device=device)
    for i, r in enumerate(rows):
        ids[i, : len(r) - cached] = torch.tensor(r[cached:], device=device)
    seed = params.seed if params.seed is not None else int(torch.randint(0, 2**62, (1,)).item())
    generators = [torch.Generator(device=device).manual_seed(seed + i) for i in range(b)]
    history = TokenHistory(rows, config.vocab_size, device) if params.needs_history else None
    stops = set(params.stop_token_ids)
    texts = [_StopText(tokenizer, params.stop) for _ in range(b)] if tokenizer is not None else None
    # Ids the tokenizer cannot decode (the embedding's padding rows) are never sampled.
    vocab_limit = min(len(tokenizer), config.vocab_size) if tokenizer is not None else config.vocab_size
    step = compiled_decode_one(model) if compile else decode_one

    t0 = time.perf_counter()
    logits = prefill(model, ids, cache, lengths - cached, start=cached)
    gen.prefill_seconds = time.perf_counter() - t0
    done = [False] * b
    positions = lengths.clone()  # where each row's next token goes
    t0 = time.perf_counter()
    for n in range(max_new):
        if vocab_limit < logits.shape[-1]:
            logits[:, vocab_limit:] = float("-inf")
        tokens = sample(logits, params, generators, history)
        if history is not None:
            history.append(tokens)
        released: list[list[int]] = [[] for _ in range(b)]
        active = 0
        for i, tok in enumerate(tokens.tolist()):
            if done[i]:
                continue
            active += 1
            gen.sampled[i].append(tok)
            text, stopper = texts[i] if texts is not None else None, tok in stops
            if stopper:  # a stop token: release what was held back, then the token (its text is not shown)
                out, piece = text.push(None) if text else ([], "")
                out = out + [tok]
                done[i], gen.finish_reasons[i] = True, "stop"
            else:
                out, piece = text.push(tok) if text else ([tok], "")
                if text is not None and text.stopped:
                    done[i], gen.finish_reasons[i] = True, "stop"
                elif n == max_new - 1:
                    if text is not None:
                        more, tail = text.push(None)
                        out, piece = out + more, piece + tail
                    done[i], gen.finish_reasons[i] = True, "length"
            released[i] = out
            gen.output_ids[i] += out
            gen.texts[i] += piece
        gen.decode_tokens += active
        if any(released):
            gen.decode_seconds = time.perf_counter() - t0
            yield released
        if all(done):
            break
        logits = step(model, tokens[:, None], positions[:, None], cache)
        # Finished rows stay on their last slot until the batch ends (their output is ignored).
        positions = torch.where(torch.tensor(done, device=device), positions, positions + 1).clamp(max=cache.max_len - 1)
    gen.decode_seconds = time.perf_counter() - t0


def _activation_dtype(model) -> torch.dtype:
    """The dtype the KV cache is kept in: the embedding's (quantized linears keep integer weights)."""
    return model.model.embed_tokens.weight.dtype


class ChatSession:
    """Multi-turn generation for one conversation that keeps its KV cache between turns.

    `reply(prompt_ids)` takes the whole conversation rendered so far (ending in the generation prompt);
    the tokens it shares with what the cache already holds are not computed again, so a turn costs
    only its new tokens (a re-tokenized reply that differs from the sampled ids is recomputed from
    the first difference). The cache grows in steps of `chunk` slots, up to the model's context."""

    def __init__(self, model, tokenizer, params: SamplingParams, *, compile: bool = False, chunk: int = 2048):
        self.model, self.tokenizer, self.params, self.compile, self.chunk = model, tokenizer, params, compile, chunk
        self.cache: KVCache | None = None
        self.ids: list[int] = []  # tokens whose keys and values are in the cache, in order
        self.last: Generation | None = None

    def reset(self) -> None:
        self.ids = []

    def _reserve(self, n: int) -> KVCache:
        config = self.model.config
        n = min(config.max_position_embeddings, -(-n // self.chunk) * self.chunk)
        if self.cache is None or self.cache.max_len < n:
            old, self.cache = self.cache, KVCache(config, 1, n, dtype=_activation_dtype(self.model),
                                                  device=self.model.model.embed_tokens.weight.device)
            if old is not None:
                for new_layer, old_layer in zip(self.cache.k + self.cache.v, old.k + old.v):
                    new_layer[..., : old.max_len, :] = old_layer
        return self.cache

    def reply(self, prompt_ids: list[int]) -> Iterator[str]:
        """Stream the reply's text; afterwards `last` is its Generation (ids, finish reason, tokens/s)."""
        context = self.model.config.max_position_embeddings
        if len(prompt_ids) >= context:
            raise ValueError(f"the conversation has {len(prompt_ids)} tokens; the model's context is {context}")
        same = 0
        for a, b in zip(self.ids, prompt_ids):
            if a != b:
                break
            same += 1
        same = min(same, len(prompt_ids) - 1)  # the last prompt token always runs: its logits pick the reply's first
        params = self.params.replace(max_new_tokens=min(self.params.max_new_tokens, context - len(prompt_ids)))
        cache = self._reserve(len(prompt_ids) + params.max_new_tokens)
        gen = Generation(None, False, 1)
        gen._run = _generate(self.model, [list(prompt_ids)], params, self.tokenizer, self.compile, gen, cache, same)
        self.last = gen
        self.ids = list(prompt_ids[:same])  # if the stream is abandoned midway, only this much is certain
        yield from texts_of(gen)
        self.ids = list(prompt_ids) + gen.sampled[0][:-1]  # the last sampled token never ran through the model


def stream_text(model, tokenizer, prompt, **kwargs) -> Iterator[str]:
    """Stream the generated text of one prompt (text or ids; kwargs as `generate`): complete UTF-8
    pieces, exactly the text before any stop string, stop tokens not shown. For ids and timings too,
    call `generate(..., tokenizer=tokenizer)` and pass the Generation to `texts_of`."""
    yield from texts_of(generate(model, prompt, tokenizer=tokenizer, **kwargs))


def texts_of(gen: Generation) -> Iterator[str]:
    """Drive a single-prompt Generation made with a tokenizer, yielding its text as it is released."""
    seen = 0
    for _ in gen:
        text = gen.texts[0]
        if len(text) > seen:
            yield text[seen:]
            seen = len(text)
    if len(gen.texts[0]) > seen:
        yield gen.texts[0][seen:]
