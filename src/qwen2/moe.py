"""The Qwen2-MoE sparse block and its load-balancing loss.

SPEC.md 2.6-2.7 (transformers' Qwen2MoeSparseMoeBlock and load_balancing_loss_func; paper 2.2.3).
The router is a softmax over all experts in fp32; the top-k weights are not renormalised unless
`norm_topk_prob` (Qwen2: false, so they sum to less than 1). A shared expert (the paper's 8 shared
experts fused into one SwiGLU MLP of 8 x 2560) is always on, scaled by a per-token sigmoid gate,
which comes from the released code rather than the paper.

Dispatch groups tokens by expert: one argsort of the (token, slot) pairs, one gather, one matmul
chain per expert that received tokens, one weighted scatter-add. Experts stay separate modules
(`mlp.experts.E.gate_proj`) so the checkpoint loads with no key map.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from qwen2.config import ModelConfig
from qwen2.model import MLP


class SparseMoeBlock(nn.Module):
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

    def forward(self, x: torch.Tensor, router_logits: list | None = None) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # [T, H]
        logits, weights, ids = self.route(x)
        if router_logits is not None:
            router_logits.append(logits)
        flat = ids.flatten()  # [T*k] expert of each (token, slot) pair
        order = flat.argsort(stable=True)
        token = order // self.top_k  # token of each pair, grouped by expert
        counts = torch.bincount(flat, minlength=len(self.experts)).tolist()
        xs = x[token]
        out = torch.empty_like(xs)
        start = 0
        for e, n in enumerate(counts):
            if n:
                out[start : start + n] = self.experts[e](xs[start : start + n])
                start += n
        out = out * weights.flatten()[order, None]
        routed = torch.zeros_like(x).index_add_(0, token, out)
        shared = torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return (routed + shared).view(shape)


def load_balancing_loss(router_logits: list[torch.Tensor], top_k: int, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Switch-style auxiliary loss over all layers (SPEC 2.7): E * sum_e f[e] * mean_p[e], where f[e] is
    the fraction of tokens that picked expert e among their top-k and mean_p[e] its mean router probability.

    router_logits: one [T, E] tensor per MoE layer (T = B*S tokens); mask: [B, S], 1 on real tokens.
    A perfectly balanced router gives top_k.
    """
    g = torch.cat([r.float() for r in router_logits], dim=0)  # [L*T, E]
    n_exp = g.shape[-1]
    p = F.softmax(g, dim=-1)
    sel = torch.topk(p, top_k, dim=-1).indices  # [L*T, k]
    w = torch.ones(g.shape[0], device=g.device) if mask is None else mask.reshape(-1).float().repeat(len(router_logits))
    f = torch.zeros(n_exp, device=g.device).scatter_add_(0, sel.flatten(), w.repeat_interleave(top_k)) / w.sum()
    p_mean = (p * w[:, None]).sum(0) / w.sum()
    return n_exp * (f * p_mean).sum()
