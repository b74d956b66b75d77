"""Rotary position embeddings: plain RoPE and static YaRN, in Hugging Face's half-split layout.

SPEC.md 2.2-2.3. Dimension i is paired with i + d/2 (`rotate_half`), not interleaved as in GPT-J,
so q_proj/k_proj weights load from a Hugging Face checkpoint without any permutation.
YaRN (Peng et al. 2023) as transformers implements it: the scale factor s comes from
`rope_scaling.factor` and the original length L0 from `rope_scaling.original_max_position_embeddings`
(falling back to max_position_embeddings). This is the fixed behaviour of transformers#40320; the
versions between mid-2024 and Aug 2025 silently replaced s by max_pos/L0 (transformers#38224).
The factor is static: it applies whatever the input length, as in vLLM.

`Rope` holds one config's tables (inv_freq in fp32, the attention scaling), computed once per device.
"""

from __future__ import annotations

import math

import torch

from qwen2.config import ModelConfig


def inv_frequencies(config: ModelConfig, device=None, base: float | None = None) -> tuple[torch.Tensor, float]:
    """Returns (inv_freq [head_dim/2] fp32, attention_scaling) for `config` (base overrides rope_theta)."""
    d = config.head_dim
    base = config.rope_theta if base is None else base
    exponent = torch.arange(0, d, 2, dtype=torch.int64, device=device).float() / d
    inv_freq = 1.0 / (base**exponent)
    if config.rope_type != "yarn":
        return inv_freq, 1.0
    rs = config.rope_scaling
    s = float(rs["factor"])
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
        self.config = config
        self._tables: dict[torch.device, tuple[torch.Tensor, float]] = {}  # device -> (inv_freq, scaling)

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype):
        """positions [B, T] -> cos, sin [B, T, head_dim] in `dtype`."""
        tables = self._tables.get(positions.device)
        if tables is None:
            tables = self._tables[positions.device] = inv_frequencies(self.config, device=positions.device)
        inv_freq, scaling = tables
        return rope_cos_sin(inv_freq, positions, scaling, dtype)
