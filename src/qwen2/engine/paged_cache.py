"""Paged KV cache: a pool of fixed-size blocks and the per-forward view through which the model attends.

Reference: PagedAttention (Kwon et al., SOSP 2023, "vLLM") for the block pool and block tables (which
blocks a sequence holds is blocks.py's BlockManager).

For each forward, `PagedBatch` (built by the engine's runner from the block tables) scatters the new
k/v into the pool. A bf16 decode on CPU with qwen2.kernels installed then attends straight over the
block tables (`decode`: kernels.ops.paged_decode_attention, called by the kernel Attention layer); every
other forward gathers each row's blocks into [B, Hkv, S, d] tensors (`update`), so attention.py's one
SDPA call site serves the paged cache through the same `view` / `update` interface as the static cache
in generation.py. The gather copies the active KV once per layer per step.
"""

from __future__ import annotations

import torch

from qwen2.attention import CacheView
from qwen2.config import ModelConfig


class KVPool:
    """Per-layer block storage, k and v [L, num_blocks + 1, block_size, Hkv, d].

    The extra last block is scratch: padding tokens of a ragged batch are written there and never read.
    """

    def __init__(
        self, config: ModelConfig, num_blocks: int, block_size: int, *, dtype=torch.float32, device="cpu"
    ):
        shape = (
            config.num_hidden_layers,
            num_blocks + 1,
            block_size,
            config.num_key_value_heads,
            config.head_dim,
        )
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.num_blocks, self.block_size = num_blocks, block_size
        self.scratch_block = num_blocks

    @staticmethod
    def bytes_per_block(config: ModelConfig, block_size: int, dtype=torch.float32) -> int:
        per_token = 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim
        return per_token * block_size * torch.empty((), dtype=dtype).element_size()


class PagedBatch:
    """One forward's batch over the pool: the `view` / `update` interface of attention.py.

    block_tables [B, nb]: each row's blocks in order (padded with the scratch block), so gathered
    slot j of row b holds the token at position j. slots [B, T]: the flat pool slot
    (block * block_size + offset) each new token is written to; padding tokens point at scratch.
    """

    def __init__(self, pool: KVPool, block_tables: torch.Tensor, slots: torch.Tensor):
        self.pool, self.block_tables, self.slots = pool, block_tables, slots.reshape(-1)
        self.seq_len = block_tables.shape[1] * pool.block_size  # S: the longest row's blocks

    def view(self, positions: torch.Tensor) -> CacheView:
        """positions [B, T] -> the view with mask bool [B, 1, T, S]: gathered slot j is visible to the
        query at position p iff j <= p; window S (every row's gathered blocks)."""
        slots = torch.arange(self.seq_len, device=positions.device)
        return CacheView(positions, (slots <= positions[..., None]).unsqueeze(1), self.seq_len)

    def _write(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor) -> None:
        hkv, d = k.shape[1], k.shape[3]
        for new, pool in ((k, self.pool.k[layer_idx]), (v, self.pool.v[layer_idx])):
            pool.view(-1, hkv, d)[self.slots] = new.transpose(1, 2).reshape(-1, hkv, d)

    def decode(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, view: CacheView):
        """One-token decode attention without the gather: write k, v [B, Hkv, 1, d], then attend q
        [B, Hq, 1, d] over each row's blocks up to its position with kernels.ops.paged_decode_attention.
        None (nothing written) where that kernel does not apply; the caller then uses `update`."""
        from qwen2.kernels import ops  # the kernels are applied from outside; the cache works without them

        kp, vp = self.pool.k[layer_idx], self.pool.v[layer_idx]
        if q.shape[2] != 1 or k.dtype != kp.dtype or not ops.paged_decode_attention_ok(q, kp, vp):
            return None
        self._write(layer_idx, k, v)
        return ops.paged_decode_attention(q, kp, vp, self.block_tables, view.positions[:, -1] + 1)

    def update(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor, view: CacheView):
        """Write k, v [B, Hkv, T, d] to their slots; return the rows' k, v [B, Hkv, S, d]. (The slots
        were fixed when the batch was built; the view only says how much is read, always S here.)"""
        b, hkv, _, d = k.shape
        # Slots past a row's last position (the scratch block, the stale tail of a reused block) get
        # weight 0 from the mask, but 0 * NaN is NaN: zeroed, one request's NaN / Inf cannot reach another.
        stale = torch.arange(self.seq_len, device=k.device) > view.positions.amax(dim=-1, keepdim=True)
        self._write(layer_idx, k, v)
        out = []
        for pool in (self.pool.k[layer_idx], self.pool.v[layer_idx]):
            gathered = pool[self.block_tables].view(b, self.seq_len, hkv, d)  # [B, S, Hkv, d]
            out.append(gathered.masked_fill_(stale[:, :, None, None], 0).transpose(1, 2))  # a fresh copy
        return out[0], out[1]
