"""Rotary position embeddings: plain RoPE and static YaRN, in Hugging Face's half-split layout.

SPEC.md 2.2-2.3. Dimension i is paired with i + d/2 (`rotate_half`), not interleaved as in GPT-J,
so q_proj/k_proj weights load from a Hugging Face checkpoint without any permutation.
YaRN (Peng et al. 2023) as transformers implements it: the scale factor s comes from
`rope_scaling.factor` and the original length L0 from `rope_scaling.original_max_position_embeddings`
(falling back to max_position_embeddings). This is the fixed behaviour of transformers#40320; the
versions between mid-2024 and Aug 2025 silently replaced s by max_pos/L0 (transformers#38224).
The factor is static: it applies whatever the input length, as in vLLM, unless `rope_scaling.dynamic`
is true: then it follows the current length L, factor = max(1, L / L0), so inputs up to L0 get exactly
the unscaled RoPE and longer ones YaRN at the factor their length needs (the idea of transformers'
"dynamic" NTK scaling applied to YaRN). Cache handling: a key is rotated once, at the factor in force
when it was computed, and stays that way in the KV cache; when a long generation grows the factor, the
new queries and keys use the new factor while older keys keep theirs (no re-rotation, as transformers'
dynamic RoPE and vLLM do), so a sequence prefilled past L0 in one call and the same sequence grown token
by token can differ. The factor is fixed per forward call: the longest position the call sees, + 1.

`Rope` holds one config's tables (inv_freq in fp32, the attention scaling), computed once per device
(and per factor, for dynamic YaRN). `dual_chunk_positions` gives Dual Chunk Attention's remapped
positions (SPEC 3.2).
"""

from __future__ import annotations

import math

import torch

from qwen2.config import ModelConfig


def inv_frequencies(
    config: ModelConfig, device=None, base: float | None = None, factor: float | None = None
) -> tuple[torch.Tensor, float]:
    """Returns (inv_freq [head_dim/2] fp32, attention_scaling) for `config` (base overrides rope_theta,
    factor overrides rope_scaling.factor; a factor of 1 is plain RoPE)."""
    d = config.head_dim
    base = config.rope_theta if base is None else base
    exponent = torch.arange(0, d, 2, dtype=torch.int64, device=device).float() / d
    inv_freq = 1.0 / (base**exponent)
    if config.rope_type != "yarn":
        return inv_freq, 1.0
    rs = config.rope_scaling
    s = float(rs["factor"] if factor is None else factor)
    if s == 1.0:
        return inv_freq, 1.0
    l0 = rs.get("original_max_position_embeddings") or config.max_position_embeddings
    beta_fast, beta_slow = rs.get("beta_fast") or 32, rs.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:  # the dimension that turns `rotations` times over L0
        return d * math.log(l0 / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(correction_dim(beta_fast)), 0)
    high = min(math.ceil(correction_dim(beta_slow)), d - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(d // 2, dtype=torch.float32, device=device) - low) / (high - low)).clamp(0, 1)
    keep = 1 - ramp  # 1: high-frequency dims keep their frequency; 0: low-frequency dims are divided by s
    inv_freq = inv_freq / s * (1 - keep) + inv_freq * keep
    scaling = rs.get("attention_factor")
    if scaling is None:
        scaling = 0.1 * math.log(s) + 1.0 if s > 1 else 1.0
    return inv_freq, float(scaling)


def rope_cos_sin(inv_freq: torch.Tensor, positions: torch.Tensor, scaling: float, dtype: torch.dtype):
    """positions [B, T] (int) -> cos, sin [B, T, head_dim] in `dtype`; the angles are computed in fp32."""
    with torch.autocast(device_type=positions.device.type, enabled=False):
        freqs = positions[..., None].float() * inv_freq  # [B, T, d/2]
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos(), emb.sin()
        if scaling != 1.0:
            cos, sin = cos * scaling, sin * scaling
    return cos.to(dtype), sin.to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, H, T, d]; cos/sin [B, T, d]. x*cos + rotate_half(x)*sin with rotate_half = (-x2, x1)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class Rope:
    """The rotary tables of one config: `cos_sin(positions, dtype)`. Not an nn.Module, so the model's
    .to(dtype) leaves the fp32 frequencies alone; a new config (a new RoPE base) means a new Rope."""

    def __init__(self, config: ModelConfig):
        if config.dual_chunk_attention_config is not None:  # DCA rotates with plain RoPE: it takes priority
            config = config.replace(rope_scaling=None)  # over rope_scaling, as in vLLM (SPEC 3.2-3.3)
        self.config = config
        rs = config.rope_scaling or {}
        self.dynamic = config.rope_type == "yarn" and bool(rs.get("dynamic"))
        self.original_length = rs.get("original_max_position_embeddings") or config.max_position_embeddings
        self._tables: dict[tuple, tuple[torch.Tensor, float]] = {}  # (device, factor) -> (inv_freq, scaling)

    def factor(self, length: int) -> float | None:
        """Dynamic YaRN's factor for a sequence of `length` tokens: max(1, L / L0); None when static."""
        return max(1.0, length / self.original_length) if self.dynamic else None

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype):
        """positions [B, T] -> cos, sin [B, T, head_dim] in `dtype`."""
        factor = self.factor(int(positions.max()) + 1) if self.dynamic else None
        key = (positions.device, factor)
        tables = self._tables.get(key)
        if tables is None:
            if len(self._tables) > 8:  # dynamic YaRN: a new factor per length; keep only recent tables
                self._tables.clear()
            tables = self._tables[key] = inv_frequencies(self.config, device=positions.device, factor=factor)
        inv_freq, scaling = tables
        return rope_cos_sin(inv_freq, positions, scaling, dtype)


def dual_chunk_positions(positions: torch.Tensor, chunk_size: int, local_size: int):
    """Dual Chunk Attention's RoPE positions (SPEC 3.2) for absolute positions [B, T], with Lc = C - W:
    (keys: p mod Lc; intra queries: p mod Lc; successive-chunk queries: min(p mod Lc + Lc, C);
    inter-chunk queries: min(2 Lc - 1, C), one constant). Every relative distance stays <= C."""
    lc = chunk_size - local_size
    if lc <= 0:
        raise ValueError(
            f"dual_chunk_attention_config: local_size {local_size} must be below chunk_size {chunk_size}"
        )
    key = positions % lc
    succ = (key + lc).clamp(max=chunk_size)
    inter = torch.full_like(positions, min(2 * lc - 1, chunk_size))
    return key, key, succ, inter


def dual_chunk_temperature(length: int, original_length: int) -> float:
    """YaRN's length-dependent attention temperature as Dual Chunk Attention applies it (SPEC 3.3):
    s(L) = max(1, 0.1 ln(L / L0) + 1); 1 when L0 = 0 (off)."""
    if original_length <= 0:
        return 1.0
    return max(1.0, 0.1 * math.log(length / original_length) + 1.0)
