"""The Qwen2 decoder: RMSNorm, GQA attention with q/k/v bias, SwiGLU MLP, pre-norm blocks.

SPEC.md section 2 (the math as transformers' modeling_qwen2 implements it). Parameter names are the
Hugging Face checkpoint's (`model.layers.N.self_attn.q_proj.weight`, ...), so a checkpoint loads with
`load_state_dict(strict=True)` and no key map. With tied embeddings there is no `lm_head` module:
the logits use `model.embed_tokens.weight`, exactly as the checkpoint stores it (no lm_head key).

Build on the meta device, then load (checkpoint.py) or call `init_weights()`:
    model = build_model(ModelConfig.preset("tiny"), seed=0)
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from qwen2 import cpu_kernels
from qwen2.attention import attend
from qwen2.config import ModelConfig
from qwen2.rope import apply_rotary, inv_frequencies, rope_cos_sin


class RMSNorm(nn.Module):
    """y = w * (x / sqrt(mean(x^2) + eps)), normalised in fp32, cast back before the weight (SPEC 2.1)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if cpu_kernels.eager_usable(x, self.weight):  # bf16 on CPU: one kernel call for these 8 ops
            return cpu_kernels.rms_norm(x, self.weight, self.eps)
        x32 = x.float()
        n = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * n.to(x.dtype)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear, except for decode-sized inputs on CPU (a few rows, reduced precision): bf16 goes through
    cpu_kernels where it is built, else one row goes through torch.mv — torch's CPU GEMM at
    M = 1 in reduced precision runs several times slower than its GEMV (bench/decode.py)."""
    if x.dtype == weight.dtype and x.dtype != torch.float32 and x.device.type == "cpu":
        if cpu_kernels.usable(x, weight, *(() if bias is None else (bias,))):
            return cpu_kernels.gemv_bf16(x, weight, bias)
        if x.numel() == x.shape[-1]:
            y = torch.mv(weight, x.reshape(-1))
            return (y if bias is None else y + bias).view(*x.shape[:-1], weight.shape[0])
    return F.linear(x, weight, bias)


class Linear(nn.Linear):
    """nn.Linear (same parameters and names) through `linear`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)

    def glu(self, up: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
        """silu(self(x)) * up(x) in one cpu_kernels call (bf16 decode on CPU), or None where it does not apply."""
        if (type(up) is Linear and self.bias is None and up.bias is None and x.dtype == self.weight.dtype == up.weight.dtype
                and cpu_kernels.usable(x, self.weight, up.weight)):
            return cpu_kernels.gemv_glu(x, self.weight, up.weight)
        return None


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)), no biases (SPEC 2.5)."""

    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.gate_proj = Linear(hidden, intermediate, bias=False)
        self.up_proj = Linear(hidden, intermediate, bias=False)
        self.down_proj = Linear(intermediate, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        glu = getattr(self.gate_proj, "glu", None)  # Linear, Int8Linear, Int4Linear: a decode step's fused call
        y = glu(self.up_proj, x) if glu is not None else None
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x) if y is None else y)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv, self.head_dim = config.num_attention_heads, config.num_key_value_heads, config.head_dim
        h = config.hidden_size
        self.q_proj = Linear(h, self.n_heads * self.head_dim, bias=True)
        self.k_proj = Linear(h, self.n_kv * self.head_dim, bias=True)
        self.v_proj = Linear(h, self.n_kv * self.head_dim, bias=True)
        self.o_proj = Linear(self.n_heads * self.head_dim, h, bias=False)

    def forward(self, x, cos, sin, positions, cache=None, mask=None):
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)  # [B, Hq, T, d]
        k = self.k_proj(x).view(b, t, self.n_kv, self.head_dim).transpose(1, 2)  # [B, Hkv, T, d]
        v = self.v_proj(x).view(b, t, self.n_kv, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v, positions)
        out = attend(q, k, v, mask)  # [B, Hq, T, d]
        return self.o_proj(out.transpose(1, 2).reshape(b, t, self.n_heads * self.head_dim))


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.self_attn = Attention(config, layer_idx)
        self.sparse = config.is_moe_layer(layer_idx)
        if self.sparse:
            from qwen2.moe import SparseMoeBlock  # moe.py builds its experts from MLP

            self.mlp = SparseMoeBlock(config)
        else:
            self.mlp = MLP(config.hidden_size, config.intermediate_size)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x, cos, sin, positions, cache=None, mask=None, router_logits=None):
        h = x + self.self_attn(self.input_layernorm(x), cos, sin, positions, cache, mask)
        y = self.post_attention_layernorm(h)
        return h + (self.mlp(y, router_logits) if self.sparse else self.mlp(y))


class Body(nn.Module):
    """Holds the `model.*` parameters: embed_tokens, layers, norm."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class Qwen2(nn.Module):
    """Qwen2 / Qwen2-MoE causal LM. forward(input_ids [B, T], positions=None, cache=None) -> logits [B, T, V]."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model = Body(config)
        self.lm_head = None if config.tie_word_embeddings else Linear(config.hidden_size, config.vocab_size, bias=False)
        self._rope: tuple[torch.Tensor, float] | None = None  # (inv_freq fp32, scaling); not a buffer, so .to(dtype) leaves it fp32

    @property
    def output_weight(self) -> torch.Tensor:
        """The [V, H] matrix of the output layer (the embedding when tied)."""
        return self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    def rope(self, positions: torch.Tensor, dtype: torch.dtype):
        if self._rope is None or self._rope[0].device != positions.device:
            self._rope = inv_frequencies(self.config, device=positions.device)
        inv_freq, scaling = self._rope
        return rope_cos_sin(inv_freq, positions, scaling, dtype)

    def hidden_states(self, input_ids, positions=None, cache=None, router_logits: list | None = None):
        """Final-norm hidden states [B, T, H]. MoE layers append their router logits [B*T, E] to `router_logits`."""
        b, t = input_ids.shape
        if positions is None:
            if cache is not None:
                raise ValueError("positions are required with a KV cache")
            positions = torch.arange(t, device=input_ids.device).expand(b, t)
        elif positions.dim() == 1:
            positions = positions.expand(b, t)
        x = self.model.embed_tokens(input_ids)
        cos, sin = self.rope(positions, x.dtype)
        mask = cache.mask(positions) if cache is not None else None
        for layer in self.model.layers:
            x = layer(x, cos, sin, positions, cache, mask, router_logits)
        return self.model.norm(x)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        # Through the module when there is one, so a quantized lm_head (quantize.py) runs its own kernel.
        return linear(h, self.model.embed_tokens.weight) if self.lm_head is None else self.lm_head(h)

    def forward(self, input_ids, positions=None, cache=None) -> torch.Tensor:
        return self.logits(self.hidden_states(input_ids, positions, cache))

    @torch.no_grad()
    def init_weights(self, generator: torch.Generator | None = None) -> None:
        """Every initialisation in one place (transformers' _init_weights): Linear/Embedding weights
        ~ N(0, initializer_range^2), biases 0, RMSNorm weights 1."""
        std = self.config.initializer_range
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                m.weight.normal_(0.0, std, generator=generator)
                if getattr(m, "bias", None) is not None:
                    m.bias.zero_()
            elif isinstance(m, RMSNorm):
                m.weight.fill_(1.0)
        self._rope = None


def build_model(config: ModelConfig, *, device="cpu", dtype=torch.float32, seed: int | None = 0) -> Qwen2:
    """A randomly initialised model, built on the meta device and materialised once on `device`."""
    with torch.device("meta"):
        model = Qwen2(config)
    model.to_empty(device=device)
    gen = None
    if seed is not None:
        gen = torch.Generator(device=device).manual_seed(seed)
    model.init_weights(gen)
    return model.to(dtype)
