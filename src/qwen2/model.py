"""The Qwen2 decoder: RMSNorm, GQA attention with q/k/v bias, SwiGLU MLP or the MoE block, pre-norm layers.

SPEC.md section 2 (the math as transformers' modeling_qwen2 and modeling_qwen2_moe implement it).
Parameter names are the Hugging Face checkpoint's (`model.layers.N.self_attn.q_proj.weight`,
`mlp.experts.E.gate_proj`, ...), so a checkpoint loads with `load_state_dict(strict=True)` and no key
map. With tied embeddings there is no `lm_head` module: the logits use `model.embed_tokens.weight`,
exactly as the checkpoint stores it (no lm_head key).

Plain PyTorch: machine kernels (qwen2.kernels.install) and quantized linears (qwen2.quantize) are
swapped in from outside after construction; nothing here branches on them.

Build on the meta device, then load (checkpoint.py) or call `init_weights()`:
    model = build_model(ModelConfig.preset("tiny"), seed=0)
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from qwen2.attention import attend, dual_chunk_attend
from qwen2.config import ModelConfig
from qwen2.rope import Rope, apply_rotary, dual_chunk_positions, dual_chunk_temperature


class RMSNorm(nn.Module):
    """y = w * (x / sqrt(mean(x^2) + eps)), normalised in fp32, cast back before the weight (SPEC 2.1)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        n = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * n.to(x.dtype)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)), no biases (SPEC 2.5)."""

    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class SparseMoeBlock(nn.Module):
    """Qwen2-MoE's FFN (SPEC 2.6; paper 2.2.3): a softmax router over all experts in fp32, the top-k
    weights not renormalised unless `norm_topk_prob` (Qwen2: false, so they sum to less than 1), and a
    shared expert (the paper's 8 shared experts fused into one SwiGLU MLP of 8 x 2560) that is always on,
    scaled by a per-token sigmoid gate (from the released code rather than the paper).

    Dispatch groups tokens by expert: one argsort of the (token, slot) pairs, one gather, one matmul
    chain per expert that received tokens, one weighted scatter-add. Experts stay separate modules
    (`mlp.experts.E.gate_proj`) so the checkpoint loads with no key map.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        h = config.hidden_size
        self.top_k, self.norm_topk_prob = config.num_experts_per_tok, config.norm_topk_prob
        self.gate = nn.Linear(h, config.num_experts, bias=False)
        self.experts = nn.ModuleList(MLP(h, config.moe_intermediate_size) for _ in range(config.num_experts))
        self.shared_expert = MLP(h, config.shared_expert_intermediate_size)
        self.shared_expert_gate = nn.Linear(h, 1, bias=False)

    def route(self, x: torch.Tensor):
        """x [T, H] -> router logits [T, E], weights [T, k] (x's dtype), expert ids [T, k]."""
        logits = self.gate(x)
        probs = F.softmax(logits, dim=-1, dtype=torch.float32)
        weights, ids = torch.topk(probs, self.top_k, dim=-1)
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return logits, weights.to(x.dtype), ids

    def run_experts(self, xs: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """Rows `xs` [N, H] sorted by expert (`counts` [E] rows each) -> each row through its expert.
        kernels.moe overrides this with grouped matmuls."""
        out = torch.empty_like(xs)
        start = 0
        for e, n in enumerate(counts.tolist()):
            if n:
                out[start : start + n] = self.experts[e](xs[start : start + n])
                start += n
        return out

    def forward(self, x: torch.Tensor, router_logits: list | None = None) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # [T, H]
        logits, weights, ids = self.route(x)
        if router_logits is not None:
            router_logits.append(logits)
        flat = ids.flatten()  # [T*k] expert of each (token, slot) pair
        order = flat.argsort(stable=True)
        token = order // self.top_k  # token of each pair, grouped by expert
        counts = torch.bincount(flat, minlength=len(self.experts))
        out = self.run_experts(x[token], counts) * weights.flatten()[order, None]
        routed = torch.zeros_like(x).index_add_(0, token, out)
        shared = torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return (routed + shared).view(shape)


class Attention(nn.Module):
    """GQA with q/k/v bias (SPEC 2.4). `rotary` and `attend` are the two calls a kernel layer may replace.
    With the config's `dual_chunk_attention_config`, Dual Chunk Attention (SPEC 3) instead."""

    rotary = staticmethod(apply_rotary)
    attend = staticmethod(attend)

    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv, self.head_dim = (
            config.num_attention_heads,
            config.num_key_value_heads,
            config.head_dim,
        )
        h = config.hidden_size
        self.q_proj = nn.Linear(h, self.n_heads * self.head_dim, bias=True)
        self.k_proj = nn.Linear(h, self.n_kv * self.head_dim, bias=True)
        self.v_proj = nn.Linear(h, self.n_kv * self.head_dim, bias=True)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, h, bias=False)
        self.dual_chunk = config.dual_chunk_attention_config

    def forward(self, x, cos, sin, positions, cache=None, view=None):
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)  # [B, Hq, T, d]
        k = self.k_proj(x).view(b, t, self.n_kv, self.head_dim).transpose(1, 2)  # [B, Hkv, T, d]
        v = self.v_proj(x).view(b, t, self.n_kv, self.head_dim).transpose(1, 2)
        if self.dual_chunk is not None:
            out = self.dual_chunk_attention(q, k, v, cos, sin, positions, cache, view)
        else:
            q, k = self.rotary(q, cos, sin), self.rotary(k, cos, sin)
            if cache is not None:
                k, v = cache.update(self.layer_idx, k, v, view)
            out = self.attend(q, k, v, view.mask if view is not None else None)  # [B, Hq, T, d]
        return self.o_proj(out.transpose(1, 2).reshape(b, t, self.n_heads * self.head_dim))

    def dual_chunk_attention(self, q, k, v, cos, sin, positions, cache, view):
        """cos, sin [3, B, T, d]: the tables at the key (= intra), successive and inter positions of
        rope.dual_chunk_positions. YaRN's temperature s(L) (SPEC 3.3), L = the row's furthest position + 1,
        scales the keys as they are cached and this call's scores: s(L)^2 on new keys, s(now) * s(then) on
        cached ones, as vLLM's DCA backend does. Key slot j must hold position j (both caches do)."""
        c, w = self.dual_chunk["chunk_size"], self.dual_chunk["local_size"]
        l0 = self.dual_chunk.get("original_max_position_embeddings") or 0
        lengths = (positions.max(dim=1).values + 1).tolist()
        s = torch.tensor(
            [dual_chunk_temperature(n, l0) for n in lengths], dtype=torch.float32, device=q.device
        )
        k = self.rotary(k, cos[0], sin[0])
        if bool((s != 1).any()):
            k = (k * s.view(-1, 1, 1, 1)).to(k.dtype)
        qs = [self.rotary(q, cos[i], sin[i]) for i in range(3)]
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v, view)
        return dual_chunk_attend(*qs, k, v, positions, c - w, scale=s * self.head_dim**-0.5)


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.self_attn = Attention(config, layer_idx)
        self.sparse = config.is_moe_layer(layer_idx)
        self.mlp = (
            SparseMoeBlock(config) if self.sparse else MLP(config.hidden_size, config.intermediate_size)
        )
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x, cos, sin, positions, cache=None, view=None):
        """-> (hidden [B, T, H], this layer's router logits [B*T, E] or None for a dense layer). Returned,
        not appended to a list argument: FSDP2's pre-forward hook hands the layer copies of its arguments."""
        h = x + self.self_attn(self.input_layernorm(x), cos, sin, positions, cache, view)
        y = self.post_attention_layernorm(h)
        if not self.sparse:
            return h + self.mlp(y), None
        logits = []
        return h + self.mlp(y, logits), logits[0]


class Body(nn.Module):
    """Holds the `model.*` parameters: embed_tokens, layers, norm."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class Qwen2(nn.Module):
    """Qwen2 / Qwen2-MoE causal LM.

    forward(input_ids [B, T], positions=None, cache=None) -> logits [B, T, V]."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model = Body(config)
        self.lm_head = (
            None
            if config.tie_word_embeddings
            else nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        )
        self.rope = Rope(config)  # not a module or buffer: .to(dtype) leaves its fp32 tables alone

    @property
    def output_weight(self) -> torch.Tensor:
        """The [V, H] matrix of the output layer (the embedding when tied)."""
        return self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    def set_rope_theta(self, theta: float) -> None:
        """Change the RoPE base (the long-context stage: 10^4 -> 10^6); the rotary tables follow."""
        self.config = self.config.replace(rope_theta=float(theta))
        self.rope = Rope(self.config)

    def hidden_states(self, input_ids, positions=None, cache=None, router_logits: list | None = None):
        """Final-norm hidden states [B, T, H].

        MoE layers append their router logits [B*T, E] to `router_logits`."""
        b, t = input_ids.shape
        if positions is None:
            if cache is not None:
                raise ValueError("positions are required with a KV cache")
            positions = torch.arange(t, device=input_ids.device).expand(b, t)
        elif positions.dim() == 1:
            positions = positions.expand(b, t)
        x = self.model.embed_tokens(input_ids)
        if self.config.dual_chunk_attention_config is None:
            cos, sin = self.rope.cos_sin(positions, x.dtype)
        else:  # DCA: plain RoPE at the remapped key / successive / inter positions, stacked [3, B, T, d]
            dca = self.config.dual_chunk_attention_config
            key, _, succ, inter = dual_chunk_positions(positions, dca["chunk_size"], dca["local_size"])
            tables = [self.rope.cos_sin(p, x.dtype) for p in (key, succ, inter)]
            cos, sin = torch.stack([c for c, _ in tables]), torch.stack([s for _, s in tables])
        view = cache.view(positions) if cache is not None else None
        for layer in self.model.layers:
            x, logits = layer(x, cos, sin, positions, cache, view)
            if router_logits is not None and logits is not None:
                router_logits.append(logits)
        return self.model.norm(x)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        # Through the module when there is one, so a quantized lm_head (quantize.py) runs its own kernel.
        return F.linear(h, self.model.embed_tokens.weight) if self.lm_head is None else self.lm_head(h)

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
        self.rope = Rope(self.config)


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
