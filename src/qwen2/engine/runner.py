"""Runner: turns one step's schedule into at most two model forwards over the paged KV cache.

One forward for the decodes ([B, 1]) and one for the prefill chunks ([B, T], ragged rows padded into
the scratch block), so a batch of decodes never pays for a long chunk's padding. The batch metadata
(block tables, slots) travels in an explicit `PagedBatch` that the model sees as its `cache` argument
(attention.py's interface): no global context, as in nano-vllm's runner without its hidden state.
"""

from __future__ import annotations

import torch

from qwen2.engine.paged_cache import KVPool, PagedBatch
from qwen2.engine.scheduler import Sequence


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
        batch = PagedBatch(self.pool, tables.to(self.device), slots.to(self.device))
        h = self.model.hidden_states(ids.to(self.device), pos.to(self.device), batch)  # [B, T, H]
        # The output layer is V wide (151,936 for Qwen2): apply it only where logits are used.
        picked = [h[r, :n] if s.scores_prompt else h[r, n - 1 : n] for r, (s, n) in enumerate(rows)]
        logits = self.model.logits(torch.cat(picked)).float()
        return list(logits.split([len(x) for x in picked]))
