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

`dual_chunk_attend` is Dual Chunk Attention (paper 2.2.2, SPEC 3), chosen by the config's
`dual_chunk_attention_config`: three rotated query copies against keys rotated at p mod (C - W), merged
by their log-sum-exps, one query block at a time.
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


def attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
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


# ---- Dual Chunk Attention (paper 2.2.2; SPEC 3) --------------------------------------------------------
def dual_chunk_attend(
    q_intra: torch.Tensor,
    q_succ: torch.Tensor,
    q_inter: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    positions: torch.Tensor,
    chunk_len: int,
    *,
    scale: float | torch.Tensor | None = None,
    valid: torch.Tensor | None = None,
    block: int = 1024,
) -> torch.Tensor:
    """Dual Chunk Attention over keys at absolute positions 0..S-1 (slot j holds position j).

    q_intra / q_succ / q_inter [B, Hq, T, d]: the queries rotated at the three positions of
    rope.dual_chunk_positions; k [B, Hkv, S, d] rotated at `p mod chunk_len`; v [B, Hkv, S, d];
    positions [B, T] the queries' absolute positions; valid [B, S] bool (False: an unwritten slot) or None;
    scale: the score scale (default d^-0.5), a float or one per row [B] (YaRN's temperature per sequence).
    A query at p in chunk c = p // chunk_len attends to (SPEC 3.2)
      intra: keys of chunk c up to p (causal), scored with q_intra;
      succ:  keys of chunk c - 1, scored with q_succ;
      inter: keys of chunks < c - 1, scored with q_inter;
    each part's softmax output and log-sum-exp in fp32, merged by their log-sum-exps (= one softmax over the
    three parts' scores). Queries are taken `block` at a time against the keys up to the block's furthest
    position, so no score matrix is larger than [block, S]. Returns [B, Hq, T, d] in q's dtype.
    """
    b, hq, t, d = q_intra.shape
    hkv = k.shape[1]
    g = hq // hkv
    scale = d**-0.5 if scale is None else scale
    needs_grad = torch.is_grad_enabled() and any(x.requires_grad for x in (q_intra, q_succ, q_inter, k, v))
    fused = q_intra.device.type == "cpu" and q_intra.dtype != torch.float64  # the kernel accumulates in fp32
    if fused and not needs_grad and valid is None and bool((positions == positions[:1]).all()):
        if isinstance(scale, torch.Tensor):  # rows at the same positions share YaRN's temperature
            scale = float(scale.reshape(-1)[0])
        return _dual_chunk_flash(q_intra, q_succ, q_inter, k, v, positions[0], chunk_len, scale, block)
    if isinstance(scale, torch.Tensor):
        scale = scale.view(b, 1, 1, 1)
    c_k = torch.arange(k.shape[2], device=k.device) // chunk_len  # [S]
    acc = torch.promote_types(q_intra.dtype, torch.float32)  # fp32 scores and merge (fp64 stays fp64)
    out = torch.empty(b, hq, t, v.shape[-1], dtype=acc, device=q_intra.device)
    for s in range(0, t, block):
        e = min(t, s + block)
        pos = positions[:, s:e]  # [B, n]
        n_keys = int(pos.max()) + 1
        kb, vb = k[:, :, :n_keys].to(acc), v[:, :, :n_keys].to(acc)[:, :, None]
        c_q = (pos // chunk_len)[:, :, None]  # [B, n, 1]
        ck, j = c_k[:n_keys], torch.arange(n_keys, device=k.device)
        masks = ((ck == c_q) & (j <= pos[:, :, None]), ck == c_q - 1, ck < c_q - 1)  # each [B, n, S]
        if valid is not None:
            masks = tuple(m & valid[:, None, :n_keys] for m in masks)
        parts = []
        for q, m in zip((q_intra, q_succ, q_inter), masks):
            qg = q[:, :, s:e].reshape(b, hkv, g * (e - s), d)  # query head h reads KV head h // g
            sc = (torch.matmul(qg.to(acc), kb.transpose(-1, -2)) * scale).view(b, hkv, g, e - s, n_keys)
            sc = sc.masked_fill(~m[:, None, None], float("-inf"))
            lse = torch.logsumexp(sc, dim=-1, keepdim=True)  # [B, Hkv, G, n, 1]; -inf where the part is empty
            p = torch.exp(sc - lse.clamp_min(torch.finfo(acc).min))
            parts.append((torch.matmul(p, vb), lse))
        lse = torch.cat([lse for _, lse in parts], dim=-1)  # [B, Hkv, G, n, 3]
        w = torch.softmax(lse, dim=-1).nan_to_num(0.0)  # each part's share of the whole softmax
        merged = sum(o * w[..., r : r + 1] for r, (o, _) in enumerate(parts))
        out[:, :, s:e] = merged.reshape(b, hq, e - s, -1)
    return out.to(q_intra.dtype)


_flash_lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu


def _dual_chunk_flash(q_intra, q_succ, q_inter, k, v, pos, chunk_len: int, scale: float, block: int):
    """dual_chunk_attend for inference when every row is at the same positions `pos` [T] (a prompt or
    a decode of one sequence, or equal rows): the same parts from a fused attention kernel that returns
    its log-sum-exp (torch's CPU flash attention: key blocks with an online softmax, so no [T, S] score
    matrix exists; ~6x the matmul form on CPU, bf16 without an fp32 copy of the keys). Query blocks
    stop at chunk boundaries, so each block's parts are key ranges without masks: the intra keys before
    the block, the block itself (causal), the previous chunk (successive) and all before it (inter).
    Its log-sum-exp is not differentiable: training takes the matmul form."""
    b, hq, t, d = q_intra.shape
    hkv = k.shape[1]
    g = hq // hkv
    out = torch.empty_like(q_intra)
    s = 0
    while s < t:
        p0 = int(pos[s])
        c = p0 // chunk_len
        e = min(t, s + block, s + (c + 1) * chunk_len - p0)  # stay in chunk c
        n = e - s
        if int(pos[e - 1]) - p0 != n - 1:  # the block's positions must be consecutive
            raise ValueError("dual_chunk_attend: a sequence's positions must be consecutive")

        def folded(q):  # [B, Hq, n, d] -> [B, Hkv, G * n, d]: query head h reads KV head h // g
            return q[:, :, s:e].reshape(b, hkv, g * n, d)

        parts = []
        ranges = ((q_intra, c * chunk_len, p0), (q_succ, (c - 1) * chunk_len, c * chunk_len))
        for q, lo, hi in (*ranges, (q_inter, 0, (c - 1) * chunk_len)):
            lo = max(lo, 0)
            if hi > lo:
                o, lse = _flash_lse(folded(q), k[:, :, lo:hi], v[:, :, lo:hi], scale=scale)
                parts.append((o.view(b, hkv, g, n, d), lse.view(b, hkv, g, n, 1)))
        # The block against its own keys, causal: square, so the kernel's top-left causal mask is right.
        kd = k[:, :, p0 : p0 + n].repeat_interleave(g, 1)
        vd = v[:, :, p0 : p0 + n].repeat_interleave(g, 1)
        o, lse = _flash_lse(q_intra[:, :, s:e], kd, vd, is_causal=True, scale=scale)
        parts.append((o.view(b, hkv, g, n, d), lse.view(b, hkv, g, n, 1)))
        lse = torch.cat([x.float() for _, x in parts], dim=-1)  # [B, Hkv, G, n, parts]
        w = torch.softmax(lse, dim=-1)
        merged = sum(o.float() * w[..., r : r + 1] for r, (o, _) in enumerate(parts))
        out[:, :, s:e] = merged.reshape(b, hq, n, d).to(out.dtype)
        s = e
    return out
