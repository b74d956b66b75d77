"""Generation: the static KV cache, prefill / decode_one, streaming generate() and stream_text().

gpt-fast's shape (a preallocated cache, a prefill, a one-token decode step that alone may be
compiled, held by a `DecodeStep` object, an explicit torch.Generator), with the sampling of
transformers (sampling.py).

The cache is preallocated per layer ([L, B, Hkv, S_max, d]) and written at each token's position,
so rows of a batch may sit at different positions: prompts of different lengths are right-padded
and each row's positions are its own (no padding mask: a row's slot j is visible to its query at
position p iff j <= p; the padding's slots lie beyond the row's position and are overwritten by the
row's own generated tokens before they become visible).

Stop strings are matched on the decoded text by tokenizer/stream.py's TextStream: text that could
still begin a stop string is held back, so a stop string split across tokens is never emitted.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence

import torch

from qwen2.attention import CacheView
from qwen2.config import ModelConfig
from qwen2.sampling import SamplingParams, TokenHistory, check_prompt, sample
from qwen2.tokenizer.stream import TextStream

__all__ = [
    "KVCache",
    "SamplingParams",
    "prefill",
    "decode_one",
    "DecodeStep",
    "generate",
    "stream_text",
    "texts_of",
    "Generation",
    "ChatSession",
]


class KVCache:
    """Static KV cache: the `view` / `update` interface of attention.py over preallocated buffers.

    A forward over positions that all start at 0 (a prefill into an empty cache) attends to its own
    keys with the plain causal mask (the view's mask is None) instead of to the whole buffer; any other
    forward attends to the slots up to the batch's furthest position, masked per row.
    """

    def __init__(
        self, config: ModelConfig, batch_size: int, max_len: int, *, dtype=torch.float32, device="cpu"
    ):
        # One tensor per layer, not one [L, ...] tensor: a compiled step that writes into a view of a shared
        # buffer copies the whole buffer for every layer's write (functionalization), 24 times per token.
        shape = (batch_size, config.num_key_value_heads, max_len, config.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        self.max_len = max_len
        self.slots = torch.arange(max_len, device=device)
        self.rows = torch.arange(batch_size, device=device)

    def view(self, positions: torch.Tensor) -> CacheView:
        """positions [B, T] -> the forward's view: mask [B, 1, T, W] (slot j visible at position p iff
        j <= p) over window W = furthest position + 1, or mask and window None for a prefill from
        position 0 (plain causal attention over the new keys)."""
        t = positions.shape[1]
        if t > 1 and not bool(positions[:, 0].any()):
            return CacheView(positions, None, None)
        if torch.compiler.is_compiling():  # every slot: a window that does not depend on the data keeps the
            w = self.max_len  # compiled decode step one graph (the mask hides unwritten slots)
        else:
            w = int(positions.max()) + 1
            if w > self.max_len:
                raise ValueError(f"position {w - 1} is beyond the KV cache ({self.max_len} slots)")
        return CacheView(positions, (self.slots[:w] <= positions[..., None]).unsqueeze(1), w)

    def update(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor, view: CacheView):
        """Write k, v [B, Hkv, T, d] at `view.positions` [B, T]; return the keys and values to attend to."""
        kc, vc = self.k[layer_idx], self.v[layer_idx]  # [B, Hkv, S, d]
        positions = view.positions
        b, _, t, _ = k.shape
        if b == 1:  # one sequence (generate, chat): index_copy_ costs about half the advanced-index write
            kc.index_copy_(2, positions[0], k)
            vc.index_copy_(2, positions[0], v)
        else:
            rows = self.rows[:b, None].expand(b, t)
            kc[rows, :, positions] = k.transpose(1, 2)  # advanced indices first: [B, T, Hkv, d]
            vc[rows, :, positions] = v.transpose(1, 2)
        if view.window is None:
            return k, v
        return kc[:, :, : view.window], vc[:, :, : view.window]


# ---- the two model calls ------------------------------------------------------------------------
@torch.no_grad()
def prefill(
    model, input_ids: torch.Tensor, cache: KVCache, lengths: torch.Tensor | None = None, start: int = 0
) -> torch.Tensor:
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


class DecodeStep:
    """The decode step of one model, eager or compiled; whoever decodes holds one (generate per call,
    ChatSession per conversation), so the compiled graph lives as long as its holder and no longer.

    compile=True wraps decode_one in torch.compile (eager where torch has no compile). On CPU with
    inductor's C++ wrapper: its default Python wrapper spends ~6 ms a step on Qwen2-0.5B allocating
    and checking buffers for 24 layers, as long as the fused kernels themselves."""

    def __init__(self, model, compile: bool = False):
        self.model = model
        self.compiled = bool(compile) and hasattr(torch, "compile")
        self._fn = decode_one
        if self.compiled:
            cpu = model.model.embed_tokens.weight.device.type == "cpu"
            self._fn = torch.compile(decode_one, dynamic=True, options={"cpp_wrapper": cpu})

    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor, cache: KVCache) -> torch.Tensor:
        return self._fn(self.model, tokens, positions, cache)


# ---- generate -----------------------------------------------------------------------------------
class Generation:
    """One generation, complete when built; `generate` and ChatSession return one. Iterating runs the
    loop and gives the new token ids as they are final (one int per step for a single prompt; for a
    batch, one list per step holding each row's newly released ids). After the loop: `finish_reasons`
    ("stop" or "length" per row), `output_ids` per row, `texts` (with a tokenizer: the released text
    per row), `sampled` (every sampled id, held-back ones included) and timings (`prefill_seconds`,
    `decode_seconds`, `decode_tokens`, `decode_tokens_per_second`).

    rows: checked prompts. cache (one row): its first `cached` slots already hold the first `cached`
    prompt tokens (ChatSession), and only the rest of the prompt is prefilled."""

    def __init__(
        self,
        model,
        rows: list[list[int]],
        params: SamplingParams,
        tokenizer=None,
        *,
        batched: bool = False,
        step: DecodeStep | None = None,
        cache: KVCache | None = None,
        cached: int = 0,
    ):
        if params.grammar is not None:
            raise ValueError(
                "SamplingParams.grammar (a response format) is applied by qwen2.engine.Engine; generate "
                "does not constrain its output"
            )
        self.model, self.rows, self.params, self.tokenizer = model, rows, params, tokenizer
        self.batched, self.cached = batched, cached
        self.step = step if step is not None else DecodeStep(model)
        b = len(rows)
        self.finish_reasons: list[str | None] = [None] * b
        self.output_ids: list[list[int]] = [[] for _ in range(b)]
        self.sampled: list[list[int]] = [[] for _ in range(b)]
        self.streams = None if tokenizer is None else [TextStream(tokenizer, params.stop) for _ in range(b)]
        self.prompt_tokens = sum(len(r) for r in rows) - cached
        self.prefill_seconds = 0.0
        self.decode_seconds = 0.0
        self.decode_tokens = 0
        self._cache = cache
        self._steps = self._loop()
        self._queue: list[int] = []

    @property
    def texts(self) -> list[str]:
        return [s.text for s in self.streams] if self.streams is not None else [""] * len(self.rows)

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
            return next(self._steps)
        while not self._queue:
            self._queue = list(next(self._steps)[0])
        return self._queue.pop(0)

    def _loop(self) -> Iterator[list[list[int]]]:
        model, rows, params, cached = self.model, self.rows, self.params, self.cached
        config = model.config
        device = model.model.embed_tokens.weight.device
        b = len(rows)
        lengths = torch.tensor([len(r) for r in rows], device=device)
        longest = int(lengths.max())
        max_new = min(params.max_new_tokens, config.max_position_embeddings - longest)
        if max_new <= 0:
            self.finish_reasons = ["length"] * b
            return
        cache = self._cache
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
        stops, streams, done = set(params.stop_token_ids), self.streams, [False] * b
        # Ids the tokenizer cannot decode (the embedding's padding rows) are never sampled.
        vocab_limit = config.vocab_size
        if self.tokenizer is not None:
            vocab_limit = min(len(self.tokenizer), vocab_limit)

        t0 = time.perf_counter()
        logits = prefill(model, ids, cache, lengths - cached, start=cached)
        self.prefill_seconds = time.perf_counter() - t0
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
                self.sampled[i].append(tok)
                stream = streams[i] if streams is not None else None
                if tok in stops:  # a stop token: release what was held, then the token (its text is hidden)
                    out = (stream.close()[0] if stream else []) + [tok]
                    done[i], self.finish_reasons[i] = True, "stop"
                else:
                    out = stream.push(tok)[0] if stream else [tok]
                    if stream is not None and stream.stopped:
                        done[i], self.finish_reasons[i] = True, "stop"
                    elif n == max_new - 1:
                        if stream is not None:
                            out = out + stream.close()[0]
                        done[i], self.finish_reasons[i] = True, "length"
                released[i] = out
                self.output_ids[i] += out
            self.decode_tokens += active
            if any(released):
                self.decode_seconds = time.perf_counter() - t0
                yield released
            if all(done):
                break
            logits = self.step(tokens[:, None], positions[:, None], cache)
            # Finished rows stay on their last slot until the batch ends (their output is ignored).
            positions = torch.where(torch.tensor(done, device=device), positions, positions + 1).clamp(
                max=cache.max_len - 1
            )
        self.decode_seconds = time.perf_counter() - t0


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
    params = params.replace(
        **{
            k: v
            for k, v in dict(
                max_new_tokens=max_new_tokens,
                temperature=temperature,
                top_p=top_p,
                top_k=top_k,
                min_p=min_p,
                repetition_penalty=repetition_penalty,
                presence_penalty=presence_penalty,
                frequency_penalty=frequency_penalty,
                seed=seed,
                stop_token_ids=list(stop_token_ids) if stop_token_ids is not None else None,
                stop=[stop] if isinstance(stop, str) else (list(stop) if stop is not None else None),
            ).items()
            if v is not None
        }
    )
    if params.stop and tokenizer is None:
        raise ValueError("stop strings need tokenizer=")
    if not rows:
        raise ValueError("no prompts: give at least one prompt of at least one token")
    config = model.config
    context, vocab = config.max_position_embeddings, config.vocab_size
    rows = [check_prompt(r, context=context, vocab_size=vocab) for r in rows]
    return Generation(model, rows, params, tokenizer, batched=batched, step=DecodeStep(model, compile))


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
        self.model, self.tokenizer, self.params, self.chunk = model, tokenizer, params, chunk
        self.step = DecodeStep(model, compile)  # compiled once for the whole conversation
        self.cache: KVCache | None = None
        self.ids: list[int] = []  # tokens whose keys and values are in the cache, in order
        self.last: Generation | None = None

    def reset(self) -> None:
        self.ids = []

    def _reserve(self, n: int) -> KVCache:
        config = self.model.config
        n = min(config.max_position_embeddings, -(-n // self.chunk) * self.chunk)
        if self.cache is None or self.cache.max_len < n:
            old, self.cache = (
                self.cache,
                KVCache(
                    config,
                    1,
                    n,
                    dtype=_activation_dtype(self.model),
                    device=self.model.model.embed_tokens.weight.device,
                ),
            )
            if old is not None:
                for new_layer, old_layer in zip(self.cache.k + self.cache.v, old.k + old.v):
                    new_layer[..., : old.max_len, :] = old_layer
        return self.cache

    def reply(self, prompt_ids: list[int]) -> Iterator[str]:
        """Stream the reply's text; afterwards `last` is its Generation (ids, finish reason, tokens/s)."""
        config = self.model.config
        context = config.max_position_embeddings
        prompt_ids = check_prompt(prompt_ids, context=context, vocab_size=config.vocab_size)
        same = 0
        for a, b in zip(self.ids, prompt_ids):
            if a != b:
                break
            same += 1
        same = min(same, len(prompt_ids) - 1)  # the last prompt token always runs: its logits pick the reply
        room = context - len(prompt_ids)
        params = self.params.replace(max_new_tokens=min(self.params.max_new_tokens, room))
        cache = self._reserve(len(prompt_ids) + params.max_new_tokens)
        gen = Generation(
            self.model, [prompt_ids], params, self.tokenizer, step=self.step, cache=cache, cached=same
        )
        self.last = gen
        self.ids = list(prompt_ids[:same])  # if the stream is abandoned midway, only this much is certain
        yield from texts_of(gen)
        self.ids = list(prompt_ids) + gen.sampled[0][:-1]  # the last sampled token never ran in the model


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
