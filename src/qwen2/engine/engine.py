"""Continuous batching: Engine.step() runs one forward over every request that has work.

Reference: Orca (iteration-level scheduling) and vLLM (paged KV cache, prefix caching, chunked
prefill, recompute preemption); the shape of nano-vllm (Sequence, Scheduler, BlockManager, runner)
without its hidden global context: the batch metadata travels in an explicit `PagedBatch` that the
model sees as its `cache` argument (attention.py's interface), so the model class is the same one
`qwen2.generate` drives.

The four parts: `Sequence` and `Scheduler` (scheduler.py), `BlockManager` and the pool (paged_cache.py),
and `Runner` here, which turns a schedule into at most two forwards per step: one for the decodes
([B, 1]) and one for the prefill chunks ([B, T], ragged rows padded into the scratch block), so a
batch of decodes never pays for a long chunk's padding. Requests join and leave between steps; `abort`
frees a request's blocks at once.

At temperature 0 each request's tokens are the argmax of its own logits, whatever else is in the
batch (rows never see each other: each row attends only to its own blocks), so they equal
`qwen2.generate` on that request alone, up to float rounding of the batched matmuls.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import torch

from qwen2.engine.paged_cache import BlockManager, KVPool, PagedBatch
from qwen2.sampling import SamplingParams, TokenHistory, sample
from qwen2.engine.scheduler import Scheduler, Sequence


@dataclass
class TokenLogprob:
    """A token's log-probability under the model (raw logits, before temperature) and the top k."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass
class StepOutput:
    """What one step produced for one request."""

    request_id: str
    token_ids: list[int]  # new tokens (zero or one)
    logprobs: list[TokenLogprob] | None = None  # one per new token, when asked for
    prompt_logprobs: list[TokenLogprob] | None = None  # prompt positions 1.., once the prompt is computed
    finished: bool = False
    finish_reason: str | None = None  # "stop" (a stop token) | "length" (max_tokens or the context)


@dataclass
class EngineStats:
    computed_tokens: int = 0  # tokens run through the model (prefill + recompute + decode)
    steps: int = 0


def token_logprob(logits: torch.Tensor, token: int, k: int) -> TokenLogprob:
    """logits [V] -> the token's log-probability and the k most likely tokens' (k may be 0)."""
    lp = torch.log_softmax(logits.float(), dim=-1)
    top = []
    if k > 0:
        vals, ids = lp.topk(k)
        top = list(zip(ids.tolist(), vals.tolist()))
    return TokenLogprob(token, lp[token].item(), top)


class Runner:
    """Builds each forward's inputs and `PagedBatch` from the scheduled sequences and runs the model."""

    def __init__(self, model, pool: KVPool):
        self.model, self.pool = model, pool
        self.device = pool.k.device

    @torch.no_grad()
    def forward(self, batch: list[tuple[Sequence, int]]) -> list[torch.Tensor]:
        """Logits per scheduled (sequence, n): [n, V] for a sequence scoring its prompt, else [1, V]."""
        out: list[torch.Tensor | None] = [None] * len(batch)
        decode = [i for i, (_, n) in enumerate(batch) if n == 1]
        prefill = [i for i, (_, n) in enumerate(batch) if n > 1]
        for group in (decode, prefill):
            if group:
                for i, logits in zip(group, self._run([batch[i] for i in group])):
                    out[i] = logits
        return out

    def _run(self, rows: list[tuple[Sequence, int]]) -> list[torch.Tensor]:
        bs, scratch = self.pool.block_size, self.pool.scratch_block
        b, t = len(rows), max(n for _, n in rows)
        nb = max(-(-(s.num_computed + n) // bs) for s, n in rows)
        ids = torch.zeros(b, t, dtype=torch.long)
        pos = torch.zeros(b, t, dtype=torch.long)
        slots = torch.full((b, t), scratch * bs, dtype=torch.long)  # padding writes land in scratch
        tables = torch.full((b, nb), scratch, dtype=torch.long)
        for r, (s, n) in enumerate(rows):
            p = torch.arange(s.num_computed, s.num_computed + n)
            table = torch.tensor(s.block_table[: -(-(s.num_computed + n) // bs)], dtype=torch.long)
            ids[r, :n] = torch.tensor(s.tokens[s.num_computed : s.num_computed + n])
            pos[r, :n] = p
            slots[r, :n] = table[p // bs] * bs + p % bs
            tables[r, : len(table)] = table
        view = PagedBatch(self.pool, tables.to(self.device), slots.to(self.device))
        h = self.model.hidden_states(ids.to(self.device), pos.to(self.device), view)  # [B, T, H]
        # The output layer is V wide (151,936 for Qwen2): apply it only where logits are used.
        picked = [h[r, :n] if _scores_prompt(s) else h[r, n - 1 : n] for r, (s, n) in enumerate(rows)]
        logits = self.model.logits(torch.cat(picked)).float()
        return list(logits.split([len(x) for x in picked]))


def _scores_prompt(seq: Sequence) -> bool:
    """Whether this step's logits at every position are needed (prompt log-probabilities still missing)."""
    return seq.prompt_logprobs is not None and len(seq.prompt_lp) < len(seq.prompt) - 1


class Engine:
    """Continuous batching over one model.

        engine = Engine(model)
        rid = engine.add_request(prompt_ids, SamplingParams(temperature=0, max_new_tokens=32))
        while engine.has_unfinished():
            for out in engine.step(): ...

    block_size: tokens a block holds. num_blocks: cache size in blocks (default: room for max_num_seqs
    requests of max_model_len tokens, at most kv_cache_bytes).
    max_num_seqs: running sequences at most. max_num_batched_tokens: the per-step token budget, which
    is also the longest prefill chunk. max_model_len: prompt + output at most (default: the config's).
    """

    def __init__(self, model, *, block_size: int = 16, num_blocks: int | None = None, kv_cache_bytes: int = 1 << 30,
                 max_num_seqs: int = 64, max_num_batched_tokens: int = 512, max_model_len: int | None = None):
        self.model, self.config = model, model.config
        p = next(model.parameters())
        self.max_model_len = max_model_len or self.config.max_position_embeddings
        if num_blocks is None:  # enough for max_num_seqs full-length requests, within kv_cache_bytes
            want = max_num_seqs * -(-self.max_model_len // block_size)
            num_blocks = max(min(want, kv_cache_bytes // KVPool.bytes_per_block(self.config, block_size, p.dtype)), 1)
        self.pool = KVPool(self.config, num_blocks, block_size, dtype=p.dtype, device=p.device)
        self.blocks = BlockManager(num_blocks, block_size)
        self.scheduler = Scheduler(self.blocks, max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens)
        self.runner = Runner(model, self.pool)
        self.seqs: dict[str, Sequence] = {}
        self.stats = EngineStats()
        self._ids = itertools.count()

    @property
    def capacity(self) -> int:
        """Tokens the whole cache holds: one request's prompt + output can use at most this."""
        return self.blocks.num_blocks * self.blocks.block_size

    def add_request(self, prompt: list[int], params: SamplingParams | None = None, *, logprobs: int | None = None,
                    prompt_logprobs: int | None = None, request_id: str | None = None) -> str:
        """Queue a request; it joins the batch at the next step. Returns its id.

        params: qwen2.sampling's SamplingParams (default: greedy, 256 tokens); its max_new_tokens,
        stop_token_ids and seed apply here, and `stop` strings must be empty: they need a tokenizer, so
        the server (or generate) handles them. max_new_tokens == 0 only scores the prompt (with
        prompt_logprobs). logprobs / prompt_logprobs: report the chosen / prompt tokens' log-probabilities
        and the top k. Raises ValueError for a request that can never run.
        """
        prompt, params = self.check_request(prompt, params)
        request_id = request_id if request_id is not None else f"req-{next(self._ids)}"
        if request_id in self.seqs:
            raise ValueError(f"request id {request_id!r} is already in use")
        gen = None
        if params.seed is not None and not params.greedy:
            gen = torch.Generator(device=self.pool.k.device).manual_seed(params.seed % 2**64)
        seq = Sequence(request_id, prompt, params.max_new_tokens, params, frozenset(params.stop_token_ids),
                       logprobs, prompt_logprobs, gen)
        self.seqs[request_id] = seq
        self.scheduler.add(seq)
        return request_id

    def check_request(self, prompt: list[int], params: SamplingParams | None = None) -> tuple[list[int], SamplingParams]:
        """(prompt as ints, params with defaults) for a request that can run; ValueError naming what is wrong.
        Reads only what never changes, so another thread may call it while a step runs."""
        params = params if params is not None else SamplingParams(temperature=0.0)
        if params.stop:
            raise ValueError("stop strings need a tokenizer: the engine stops on stop_token_ids only")
        prompt = [int(t) for t in prompt]
        if not prompt:
            raise ValueError("the prompt is empty: give at least one token")
        bad = [t for t in prompt if not 0 <= t < self.config.vocab_size]
        if bad:
            raise ValueError(f"token id {bad[0]} is outside the vocabulary [0, {self.config.vocab_size})")
        limit = min(self.max_model_len, self.capacity)
        if len(prompt) + params.max_new_tokens > limit:
            raise ValueError(f"prompt ({len(prompt)} tokens) + max_new_tokens ({params.max_new_tokens}) exceeds the "
                             f"context of {limit} tokens")
        return prompt, params

    def abort(self, request_id: str) -> bool:
        """Cancel a request: its blocks are free when this returns. False if it is unknown or done."""
        seq = self.seqs.pop(request_id, None)
        if seq is None:
            return False
        self.scheduler.abort(seq)
        seq.finish_reason = "abort"
        return True

    def has_unfinished(self) -> bool:
        return bool(self.seqs)

    def step(self) -> list[StepOutput]:
        """Schedule, run one forward per group, sample, and report every request that advanced."""
        batch = self.scheduler.schedule()
        if not batch:
            return []
        self.stats.steps += 1
        logits = self.runner.forward(batch)
        outs, ready = [], []
        for (seq, n), lg in zip(batch, logits):
            if _scores_prompt(seq):
                self._prompt_logprobs(seq, seq.num_computed, n, lg)
            self.scheduler.advance(seq, n)
            self.stats.computed_tokens += n
            if seq.num_computed == len(seq.tokens):  # caught up: its last logits choose the next token
                ready.append((seq, lg[-1]))
        for (seq, lg), token in zip(ready, self._pick(ready)):
            outs.append(self._emit(seq, lg, token))
        return outs

    def _prompt_logprobs(self, seq: Sequence, start: int, n: int, logits: torch.Tensor) -> None:
        """logits [n, V] at positions start..start+n-1 score the prompt tokens that follow them."""
        lp = torch.log_softmax(logits, dim=-1)
        for j in range(n):
            target = start + j + 1
            if target - 1 == len(seq.prompt_lp) and target < len(seq.prompt):
                tok = seq.prompt[target]
                top = []
                if seq.prompt_logprobs > 0:
                    vals, ids = lp[j].topk(seq.prompt_logprobs)
                    top = list(zip(ids.tolist(), vals.tolist()))
                seq.prompt_lp.append(TokenLogprob(tok, lp[j, tok].item(), top))

    def _pick(self, ready: list[tuple[Sequence, torch.Tensor]]) -> list[int | None]:
        """The next token of each caught-up sequence with qwen2.sampling's `sample`, one row per
        sequence with its own params and generator (None: it only scores its prompt)."""
        rows = [(s, lg) for s, lg in ready if s.max_tokens > 0]
        picked = iter([])
        if rows:
            params = [s.sampling for s, _ in rows]
            history = None
            if any(p.needs_history for p in params):
                history = TokenHistory([s.prompt for s, _ in rows], self.config.vocab_size, outputs=[s.output for s, _ in rows])
            logits = torch.stack([lg for _, lg in rows])  # [R, V]
            picked = iter(sample(logits, params, [s.generator for s, _ in rows], history).tolist())
        return [next(picked) if s.max_tokens > 0 else None for s, _ in ready]

    def _emit(self, seq: Sequence, logits: torch.Tensor, token: int | None) -> StepOutput:
        first = not seq.output
        out = StepOutput(seq.request_id, [])
        if first and seq.prompt_logprobs is not None:
            out.prompt_logprobs = list(seq.prompt_lp)
        if token is None:
            reason = "length"
        else:
            seq.tokens.append(token)
            out.token_ids = [token]
            if seq.logprobs is not None:
                out.logprobs = [token_logprob(logits, token, seq.logprobs)]
            reason = None
            if token in seq.stop_token_ids:
                reason = "stop"
            elif len(seq.output) >= seq.max_tokens or len(seq.tokens) >= self.max_model_len:
                reason = "length"
        if reason is not None:
            self.scheduler.finish(seq, reason)
            del self.seqs[seq.request_id]
            out.finished, out.finish_reason = True, reason
        return out

    def generate(self, prompts: list[list[int]], params: SamplingParams | None = None) -> list[list[int]]:
        """Run `prompts` together to completion; each one's output tokens, in order."""
        rids = [self.add_request(p, params) for p in prompts]
        got: dict[str, list[int]] = {r: [] for r in rids}
        while self.has_unfinished():
            for o in self.step():
                got[o.request_id].extend(o.token_ids)
        return [got[r] for r in rids]
