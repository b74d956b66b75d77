"""The one attention call site: scaled dot-product attention with grouped-query heads.

SPEC.md 2.4: scores = q k^T / sqrt(d) + causal mask, softmax in fp32, no dropout. We call PyTorch's
SDPA, whose CPU and CUDA kernels accumulate the softmax in fp32 (qwen2.kernels swaps in a one-call
decode kernel for bf16 on CPU, from outside).

A KV cache meets the attention through two methods (the static cache in generation.py and the
paged cache in engine/paged_cache.py both implement them):
    view = cache.view(positions [B, T]) -> CacheView: made once per forward, passed to every layer
    cache.update(layer_idx, k, v, view) -> (k_all [B, Hkv, S, d], v_all [B, Hkv, S, d])
and the layer attends with `view.mask`. The view is returned, never left on the cache, so nothing
about one forward is state a later call has to find.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F


@dataclass
class CacheView:
    """What one forward reads from a KV cache (a dataclass: Dual Chunk Attention will add fields).

    positions [B, T]: the new tokens' positions. mask bool [B, 1, T, S] (True = may attend), or None
    for plain causal attention over the new keys alone (a prefill into an empty cache). window: the
    cache slots 0..window-1 that `update` returns as keys and values (S); None with mask None."""

    positions: torch.Tensor
    mask: torch.Tensor | None
    window: int | None = None


class KVCache(Protocol):
    def view(self, positions: torch.Tensor) -> CacheView: ...

    def update(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor, view: CacheView): ...


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """q [B, Hq, T, d]; k, v [B, Hkv, S, d]; mask [B, 1, T, S] bool or None (causal, T == S).

    Returns [B, Hq, T, d]. Query head h reads KV head h // (Hq / Hkv), as repeat_kv does.
    """
    b, hq, t, d = q.shape
    hkv = k.shape[1]
    if t == 1 and hq != hkv:
        # Decode: fold the query heads of each KV group into the query axis, so the cache is
        # read once per KV head instead of being expanded to every query head.
        g = hq // hkv
        out = F.scaled_dot_product_attention(q.view(b, hkv, g, d), k, v, attn_mask=mask)
        return out.view(b, hq, 1, d)
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=hq != hkv)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=hq != hkv)
