"""Continuous batching: Engine.step() runs one forward over every request that has work.

Reference: Orca (iteration-level scheduling) and vLLM (paged KV cache, prefix caching, chunked
prefill, recompute preemption); the shape of nano-vllm (Sequence, Scheduler, BlockManager, runner)
without its hidden global context: the batch metadata travels in an explicit `PagedBatch` that the
model sees as its `cache` argument (attention.py's interface), so the model class is the same one
`qwen2.generate` drives.

The four parts: `Sequence` and `Scheduler` (scheduler.py), `BlockManager` (blocks.py) over the pool
(paged_cache.py), and `Runner` (runner.py), which turns a schedule into at most two forwards per step.
The Engine here adds requests (checked by sampling.check_prompt), samples each caught-up sequence's
next token (each sequence keeps its own penalty history, updated in place) and reports what every
request produced. Requests join and leave between steps; `abort` frees a request's blocks at once.

Sampling checks and constraints, per sequence within one batched call:
- Non-finite logits (NaN / Inf from broken weights or a nonsensical config) are caught before sampling:
  that request finishes with finish_reason "error" and `StepOutput.error` saying why; the others go on.
- A response format (SamplingParams.grammar, qwen2.grammar) gives each sequence a matcher: the batch's
  allowed-token masks are built in one call and applied in one op, the matcher advances on every token,
  and a complete document finishes the request with "stop".

At temperature 0 each request's tokens are the argmax of its own logits, whatever else is in the
batch (rows never see each other: each row attends only to its own blocks), so they equal
`qwen2.generate` on that request alone, up to float rounding of the batched matmuls.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import torch

from qwen2.engine.blocks import BlockManager
from qwen2.engine.paged_cache import KVPool
from qwen2.engine.runner import Runner
from qwen2.engine.scheduler import Scheduler, Sequence
from qwen2.grammar import token_mask
from qwen2.sampling import SamplingParams, TokenHistory, check_prompt, sample


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
    # "stop" (a stop token) | "length" (max_tokens or the context) | "error" (then `error` says why)
    finish_reason: str | None = None
    error: str | None = None  # this request failed (e.g. non-finite logits); the others go on


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

    def __init__(
        self,
        model,
        *,
        block_size: int = 16,
        num_blocks: int | None = None,
        kv_cache_bytes: int = 1 << 30,
        max_num_seqs: int = 64,
        max_num_batched_tokens: int = 512,
        max_model_len: int | None = None,
    ):
        self.model, self.config = model, model.config
        p = next(model.parameters())
        self.max_model_len = max_model_len or self.config.max_position_embeddings
        if num_blocks is None:  # enough for max_num_seqs full-length requests, within kv_cache_bytes
            want = max_num_seqs * -(-self.max_model_len // block_size)
            per_block = KVPool.bytes_per_block(self.config, block_size, p.dtype)
            num_blocks = max(min(want, kv_cache_bytes // per_block), 1)
        self.pool = KVPool(self.config, num_blocks, block_size, dtype=p.dtype, device=p.device)
        self.blocks = BlockManager(num_blocks, block_size)
        self.scheduler = Scheduler(
            self.blocks, max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens
        )
        self.runner = Runner(model, self.pool)
        self.seqs: dict[str, Sequence] = {}
        self.stats = EngineStats()
        self._ids = itertools.count()

    @property
    def capacity(self) -> int:
        """Tokens the whole cache holds: one request's prompt + output can use at most this."""
        return self.blocks.num_blocks * self.blocks.block_size

    def add_request(
        self,
        prompt: list[int],
        params: SamplingParams | None = None,
        *,
        logprobs: int | None = None,
        prompt_logprobs: int | None = None,
        request_id: str | None = None,
    ) -> str:
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
        history = None
        if params.needs_history and params.max_new_tokens > 0:
            history = TokenHistory([prompt], self.config.vocab_size, self.pool.k.device)
        seq = Sequence(
            request_id,
            prompt,
            params.max_new_tokens,
            params,
            frozenset(params.stop_token_ids),
            logprobs,
            prompt_logprobs,
            gen,
            history=history,
            matcher=params.grammar.matcher() if params.grammar is not None else None,
        )
        self.seqs[request_id] = seq
        self.scheduler.add(seq)
        return request_id

    def check_request(
        self, prompt: list[int], params: SamplingParams | None = None
    ) -> tuple[list[int], SamplingParams]:
        """(prompt as ints, params with defaults) for a request that can run; ValueError naming what is wrong.
        Reads only what never changes, so another thread may call it while a step runs."""
        params = params if params is not None else SamplingParams(temperature=0.0)
        if params.stop:
            raise ValueError("stop strings need a tokenizer: the engine stops on stop_token_ids only")
        if self.max_model_len <= self.capacity:
            context, limit = self.max_model_len, "the engine's max_model_len"
        else:
            context = self.capacity
            limit = "the engine's KV cache: num_blocks * block_size, or kv_cache_bytes"
        prompt = check_prompt(
            prompt,
            context=context,
            vocab_size=self.config.vocab_size,
            max_new_tokens=params.max_new_tokens,
            limit=limit,
        )
        v = self.config.vocab_size
        bad = next((t for t in params.logit_bias if t >= v), None)
        if bad is not None:
            raise ValueError(
                f"logit_bias: token id {bad} is outside the vocabulary [0, {v}) (vocab_size in config.json)"
            )
        if params.grammar is not None and params.grammar.vocab_size != v:
            raise ValueError(
                f"the response format was compiled for {params.grammar.vocab_size} tokens but the model has "
                f"{v} (vocab_size in config.json): build the GrammarCompiler with the model's vocab_size"
            )
        return prompt, params

    def abort(self, request_id: str) -> bool:
        """Cancel a request: its blocks are free when this returns. False if it is unknown or done."""
        seq = self.seqs.pop(request_id, None)
        if seq is None:
            return False
        self.scheduler.abort(seq)
        seq.finish_reason = "abort"
        return True

    def reset_prefix_cache(self) -> None:
        """Call after the model's weights change in place (online DPO shares the trainer's model): the
        cached prefixes' keys and values were computed by the old weights, so none may be reused."""
        if self.seqs:
            raise RuntimeError("reset_prefix_cache: requests are running; call it between generations")
        self.blocks.forget_prefixes()

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
            if seq.scores_prompt:
                self._prompt_logprobs(seq, seq.num_computed, n, lg)
            self.scheduler.advance(seq, n)
            self.stats.computed_tokens += n
            if seq.num_computed == len(seq.tokens):  # caught up: its last logits choose the next token
                ready.append((seq, lg[-1]))
        picks, errors = self._pick(ready)
        for i, ((seq, lg), picked) in enumerate(zip(ready, picks)):
            outs.append(self._fail(seq, errors[i]) if i in errors else self._emit(seq, lg, picked))
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

    def _pick(
        self, ready: list[tuple[Sequence, torch.Tensor]]
    ) -> tuple[list[tuple[int, torch.Tensor] | None], dict[int, str]]:
        """The next token of each caught-up sequence with qwen2.sampling's `sample`, one row per
        sequence with its own params, generator, penalty history and grammar mask: (id, id as a [1]
        tensor), or None for a sequence that only scores its prompt or failed; and {index in `ready`:
        why} for the sequences that failed (non-finite logits, a grammar with no way on)."""
        errors: dict[int, str] = {}
        if not ready:
            return [], errors
        last = torch.stack([lg for _, lg in ready])  # [N, V]
        # One reduction instead of isfinite's ~6 passes over [N, V]: a row with a NaN / Inf sums to one;
        # a finite row whose sum overflows is told apart by the full check on that row alone.
        suspects = (~torch.isfinite(last.sum(dim=-1))).nonzero().flatten().tolist()
        for i in [i for i in suspects if not bool(torch.isfinite(last[i]).all())]:
            errors[i] = (
                "the model produced non-finite logits (NaN or Inf) for this request: its weights or "
                "config.json are broken (check the checkpoint for NaN/Inf tensors)"
            )
        idx = [i for i, (s, _) in enumerate(ready) if s.max_tokens > 0 and i not in errors]
        if not idx:
            return [None] * len(ready), errors
        rows = [ready[i][0] for i in idx]
        logits = last if len(idx) == len(ready) else last[idx]  # [R, V]
        mask = None
        if any(s.matcher is not None for s in rows):
            mask = token_mask([s.matcher for s in rows], logits.shape[-1], logits.device)
            for r in (~mask.any(dim=-1)).nonzero().flatten().tolist():
                errors[idx[r]] = f"the response format allows no next token ({rows[r].matcher.error})"
                mask[r] = True  # sampled but discarded: keeps the row's softmax finite
        histories = [s.history for s in rows] if any(s.history is not None for s in rows) else None
        tokens = sample(logits, [s.sampling for s in rows], [s.generator for s in rows], histories, mask)
        picks: list[tuple[int, torch.Tensor] | None] = [None] * len(ready)
        for i, t, tt in zip(idx, tokens.tolist(), tokens.split(1)):
            picks[i] = None if i in errors else (t, tt)
        return picks, errors

    def _fail(self, seq: Sequence, error: str) -> StepOutput:
        """Finish `seq` with finish_reason "error": its blocks are freed, the batch goes on without it."""
        self.scheduler.finish(seq, "error")
        del self.seqs[seq.request_id]
        return StepOutput(seq.request_id, [], finished=True, finish_reason="error", error=error)

    def _emit(
        self, seq: Sequence, logits: torch.Tensor, picked: tuple[int, torch.Tensor] | None
    ) -> StepOutput:
        first = not seq.output
        out = StepOutput(seq.request_id, [])
        if first and seq.prompt_logprobs is not None:
            out.prompt_logprobs = list(seq.prompt_lp)
        if picked is None:
            reason = "length"
        else:
            token, as_tensor = picked
            seq.append(token, as_tensor)
            out.token_ids = [token]
            if seq.logprobs is not None:
                out.logprobs = [token_logprob(logits, token, seq.logprobs)]
            reason = None
            if seq.matcher is not None and not seq.matcher.accept(token):
                self.scheduler.finish(seq, "error")
                del self.seqs[seq.request_id]
                out.finished, out.finish_reason = True, "error"
                out.error = f"the response format refused token {token}: {seq.matcher.error}"
                return out
            if token in seq.stop_token_ids or (seq.matcher is not None and seq.matcher.done):
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
