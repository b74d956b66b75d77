"""Sequence and Scheduler: which tokens of which requests the next engine step computes.

Reference: Orca's iteration-level scheduling (Yu et al., OSDI 2022) and vLLM's scheduler with chunked
prefill and recompute preemption. One rule covers prefill, decode and recompute: a sequence's tokens
(prompt + output) are computed left to right, `num_computed` of them already sit in the KV cache, and
each step gives it up to its remaining tokens within a per-step token budget. Running sequences are
served first, oldest first, so decodes (one token each) are never stalled by a long prompt: the prompt
gets what is left of the budget and is prefilled in chunks over several steps. When the cache cannot
hold the next tokens, the most recently admitted sequence is preempted: its blocks are freed and it
goes back to the front of the queue, to be recomputed (prompt + output so far) when there is room.
"""

from __future__ import annotations

import enum
from collections import deque
from dataclasses import dataclass, field

import torch

from qwen2.engine.blocks import BlockManager, block_hashes
from qwen2.grammar import Matcher
from qwen2.sampling import SamplingParams, TokenHistory


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class Sequence:
    """One request's explicit state. `tokens` = prompt + output; the first `num_computed` are cached."""

    request_id: str
    prompt: list[int]
    max_tokens: int
    sampling: SamplingParams | None = None
    stop_token_ids: frozenset[int] = frozenset()
    logprobs: int | None = None  # None: no logprobs; k >= 0: the sampled token's plus the top k
    prompt_logprobs: int | None = None  # same, for every prompt token after the first (echo scoring)
    generator: torch.Generator | None = None
    tokens: list[int] = field(default_factory=list)
    num_computed: int = 0
    block_table: list[int] = field(default_factory=list)
    hashes: list[bytes] = field(default_factory=list)  # names of full blocks (computed or about to be)
    num_named: int = 0  # blocks of block_table registered with the BlockManager under their name
    status: Status = Status.WAITING
    finish_reason: str | None = None
    num_cached_prompt: int = 0  # prompt tokens served from the prefix cache at first admission
    prompt_lp: list = field(default_factory=list)  # entries for prompt positions 1.. (filled by prefill)
    # The penalties' token statistics (prompt + output so far): one [1, V] row kept up to date in place
    # by `append` when the params use a penalty; it survives preemption (the tokens do not change).
    history: TokenHistory | None = None
    # The response format's position (qwen2.grammar.Matcher), advanced by the engine on each sampled
    # token; like `history`, it survives preemption.
    matcher: Matcher | None = None

    def __post_init__(self):
        self.tokens = list(self.prompt)

    def append(self, token: int, token_tensor: torch.Tensor | None = None) -> None:
        """Add a generated token; `token_tensor` ([1], on the history's device) spares a copy to it."""
        self.tokens.append(token)
        if self.history is not None:
            if token_tensor is None:
                token_tensor = torch.tensor([token], device=self.history.seen.device)
            self.history.append(token_tensor)

    @property
    def scores_prompt(self) -> bool:
        """Whether this step needs the logits at every position (prompt log-probabilities still missing)."""
        return self.prompt_logprobs is not None and len(self.prompt_lp) < len(self.prompt) - 1

    @property
    def output(self) -> list[int]:
        return self.tokens[len(self.prompt) :]

    @property
    def num_uncomputed(self) -> int:
        return len(self.tokens) - self.num_computed


class Scheduler:
    """Waiting queue (FCFS) and running list over one BlockManager.

    `schedule()` returns [(sequence, number of tokens to compute)] for one step, taking blocks for them;
    the engine then calls `advance()` with what it computed.
    """

    def __init__(self, blocks: BlockManager, *, max_num_seqs: int, max_num_batched_tokens: int):
        self.blocks = blocks
        self.max_num_seqs, self.token_budget = max_num_seqs, max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        self.num_cached_tokens = 0  # prompt tokens served from the prefix cache at first admission

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def abort(self, seq: Sequence) -> None:
        """Remove a waiting or running sequence and free its blocks now."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.blocks.release(seq.block_table)
        seq.status = Status.FINISHED

    def finish(self, seq: Sequence, reason: str) -> None:
        self.running.remove(seq)
        self.blocks.release(seq.block_table)
        seq.status, seq.finish_reason = Status.FINISHED, reason

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.blocks.release(seq.block_table)
        seq.num_computed, seq.num_named, seq.status = 0, 0, Status.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def schedule(self) -> list[tuple[Sequence, int]]:
        budget, batch, preempted = self.token_budget, [], False
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = min(seq.num_uncomputed, budget)
            while not self.blocks.grow(seq.block_table, seq.num_computed + n):
                victim = self.running[-1]  # the youngest; never one already scheduled (index < i)
                self._preempt(victim)
                preempted = True
                if victim is seq:
                    break
            if seq.status is not Status.RUNNING:
                break
            batch.append((seq, n))
            budget -= n
            i += 1
        # Admit new work only when nothing had to be preempted: otherwise it would evict at once.
        while self.waiting and not preempted and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if not self._admit(seq):
                break
            self.waiting.popleft()
            n = min(seq.num_uncomputed, budget)
            batch.append((seq, n))
            budget -= n
        return batch

    def _admit(self, seq: Sequence) -> bool:
        """Give `seq` its cached prefix and blocks for all its tokens, if they fit."""
        bs = self.blocks.block_size
        cached: list[int] = []
        if seq.prompt_logprobs is None:  # scoring needs the logits at every prompt position: no reuse
            # Reuse whole blocks only, and always compute the last token (its logits pick the next one).
            seq.hashes = block_hashes(seq.tokens, bs, (len(seq.tokens) - 1) // bs, seq.hashes)
            cached = self.blocks.match_prefix(seq.hashes)
        if not self.blocks.can_admit(cached, len(seq.tokens)):
            return False
        seq.block_table = self.blocks.take(cached)
        seq.num_named, seq.num_computed = len(cached), len(cached) * bs
        if not seq.output and not seq.prompt_lp:  # first admission (not a recompute)
            seq.num_cached_prompt = seq.num_computed
            self.num_cached_tokens += seq.num_computed
        ok = self.blocks.grow(seq.block_table, len(seq.tokens))
        assert ok, "can_admit promised room"
        seq.status = Status.RUNNING
        self.running.append(seq)
        return True

    def advance(self, seq: Sequence, n: int) -> None:
        """Record that `n` more tokens of `seq` are in the cache; name its newly full blocks."""
        seq.num_computed += n
        full = seq.num_computed // self.blocks.block_size
        if full > len(seq.hashes):
            seq.hashes = block_hashes(seq.tokens, self.blocks.block_size, full, seq.hashes)
        for j in range(seq.num_named, full):
            self.blocks.name(seq.block_table[j], seq.hashes[j])
        seq.num_named = max(seq.num_named, full)
