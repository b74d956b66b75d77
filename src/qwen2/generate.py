"""Generation: the static KV cache, sampling, prefill / decode, streaming generate().

The cache is preallocated per layer ([L, B, Hkv, S_max, d]) and written at each token's position,
so rows of a batch may sit at different positions (prompts of different lengths, no padding mask:
a row's slot j is visible to its query at position p iff j <= p).
"""

from __future__ import annotations

import torch

from qwen2.config import ModelConfig


class KVCache:
    """Static KV cache: the `mask` / `update` interface of attention.py over preallocated buffers."""

    def __init__(self, config: ModelConfig, batch_size: int, max_len: int, *, dtype=torch.float32, device="cpu"):
        shape = (config.num_hidden_layers, batch_size, config.num_key_value_heads, max_len, config.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.max_len = max_len
        self.slots = torch.arange(max_len, device=device)

    def mask(self, positions: torch.Tensor) -> torch.Tensor:
        """positions [B, T] -> [B, 1, T, S_max]: slot j is visible at position p iff j <= p."""
        return (self.slots <= positions[..., None]).unsqueeze(1)

    def update(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor):
        """Write k, v [B, Hkv, T, d] at `positions` [B, T]; return the layer's whole buffers."""
        kc, vc = self.k[layer_idx], self.v[layer_idx]
        idx = positions[:, None, :, None].expand_as(k)
        kc.scatter_(2, idx, k)
        vc.scatter_(2, idx, v)
        return kc, vc
