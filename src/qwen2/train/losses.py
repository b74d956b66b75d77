"""Losses: the chunked linear cross-entropy and the MoE load-balancing loss.

Next-token prediction (SPEC 1.1, paper section 3) with the loss in fp32. The output layer of a Qwen2
model is the largest tensor a step touches: at the real 151,936-token vocabulary, [B*T, V] fp32 logits
are 1.2 GB for 2,048 tokens, several times the whole model's activations. `linear_cross_entropy` never
builds them: it walks the rows in chunks, computes each chunk's logits, log-sum-exp and loss, and (when
gradients are wanted) the chunk's contribution to dL/dh and dL/dW right away, so the backward pass is
two stored tensors times a scalar. The same idea as Liger-Kernel's fused linear cross-entropy and
Apple's Cut Cross-Entropy, in plain PyTorch.

`load_balancing_loss`: the Switch-style auxiliary loss of Qwen2-MoE (SPEC 2.7; transformers'
load_balancing_loss_func).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def chunk_rows_for(vocab: int, budget_bytes: int = 256 << 20) -> int:
    """Rows per chunk so that one chunk's fp32 logits stay near `budget_bytes` (256 MiB: ~440 rows at
    Qwen2's 151,936 vocabulary). Each chunk reads the [V, H] weight twice and updates its [V, H]
    gradient once, so much smaller chunks trade logits memory for weight traffic."""
    return max(16, budget_bytes // (4 * vocab))


class _LinearCrossEntropy(torch.autograd.Function):
    """mean_i CE(h_i W^T, t_i) over targets != IGNORE_INDEX; gradients computed during forward."""

    @staticmethod
    def forward(ctx, h, weight, targets, chunk_rows: int, compute_dtype: torch.dtype):
        # h [N, H], weight [V, H], targets [N] int64
        n = h.shape[0]
        want_h, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        valid = targets != IGNORE_INDEX
        count = valid.sum().clamp_min(1)
        safe_t = targets.clamp_min(0)
        acc = torch.promote_types(
            compute_dtype, torch.float32
        )  # softmax dtype: fp32, or fp64 for fp64 inputs
        w = weight.to(compute_dtype)
        total = torch.zeros((), dtype=acc, device=h.device)
        grad_h = torch.empty_like(h) if want_h else None
        grad_w = None
        # One workspace for every chunk's logits: a fresh [c, V] tensor per chunk would be a fresh
        # mapping the kernel zero-fills page by page (as large as the matmul itself on a CPU).
        buf = torch.empty(min(chunk_rows, n), weight.shape[0], dtype=acc, device=h.device)
        for s in range(0, n, chunk_rows):
            e = min(n, s + chunk_rows)
            hc, tc, vc = h[s:e].to(compute_dtype), safe_t[s:e], valid[s:e]
            logits = buf[: e - s]  # [c, V] fp32: the only vocabulary-wide tensor, one chunk at a time
            if compute_dtype == acc:
                torch.mm(hc, w.T, out=logits)
            else:
                logits.copy_(hc @ w.T)
            picked = logits.gather(1, tc[:, None]).squeeze(1)
            m = logits.amax(dim=-1, keepdim=True)
            p = logits.sub_(m).exp_()  # in place: exp(logit - max)
            z = p.sum(dim=-1, keepdim=True)
            lse = (m + z.log()).squeeze(1)  # [c]
            total += torch.where(vc, lse - picked, 0.0).sum()
            if want_h or want_w:
                # dCE/dlogits = softmax - onehot, zero on ignored rows; the 1/count comes in backward.
                g = p.div_(z)
                g[torch.arange(e - s, device=h.device), tc] -= 1.0
                if not bool(vc.all()):
                    g.mul_(vc[:, None])
                g = g.to(compute_dtype)
                if want_h:
                    grad_h[s:e] = (g @ w).to(h.dtype)
                if want_w:
                    if grad_w is None:
                        grad_w = g.T.to(acc) @ hc.to(acc)
                    else:
                        grad_w.addmm_(g.T.to(acc), hc.to(acc))
        ctx.save_for_backward(grad_h if want_h else None, grad_w if want_w else None, count)
        ctx.weight_dtype = weight.dtype
        return total / count

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w, count = ctx.saved_tensors
        scale = grad_out / count
        gh = grad_h * scale.to(grad_h.dtype) if grad_h is not None else None
        gw = (grad_w * scale).to(ctx.weight_dtype) if grad_w is not None else None
        return gh, gw, None, None, None


def linear_cross_entropy(
    h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_rows: int | None = None
) -> torch.Tensor:
    """Mean cross-entropy of logits = h @ weight.T against `targets` (IGNORE_INDEX skipped), in fp32.

    h [..., H], weight [V, H], targets [...]. Equals
    `F.cross_entropy((h @ weight.T).float().flatten(0, -2), targets.flatten())` in value and gradient,
    without holding more than `chunk_rows` rows of logits at once. Under autocast the logits' matmul
    runs in the autocast dtype (as nn.Linear would) and the softmax in fp32.
    """
    h2, t = h.reshape(-1, h.shape[-1]), targets.reshape(-1)
    if h2.shape[0] != t.shape[0]:
        raise ValueError(f"linear_cross_entropy: {h2.shape[0]} hidden rows but {t.shape[0]} targets")
    dev = h.device.type
    dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else h.dtype
    with torch.autocast(dev, enabled=False):
        return _LinearCrossEntropy.apply(h2, weight, t, chunk_rows or chunk_rows_for(weight.shape[0]), dtype)


def load_balancing_loss(
    router_logits: list[torch.Tensor], top_k: int, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Switch-style auxiliary loss over all layers (SPEC 2.7): E * sum_e f[e] * mean_p[e], where f[e] is
    the fraction of tokens that picked expert e among their top-k and mean_p[e] its mean router probability.

    router_logits: one [T, E] tensor per MoE layer (T = B*S tokens); mask: [B, S], 1 on real tokens.
    A perfectly balanced router gives top_k.
    """
    g = torch.cat([r.float() for r in router_logits], dim=0)  # [L*T, E]
    n_exp = g.shape[-1]
    p = F.softmax(g, dim=-1)
    sel = torch.topk(p, top_k, dim=-1).indices  # [L*T, k]
    w = (
        torch.ones(g.shape[0], device=g.device)
        if mask is None
        else mask.reshape(-1).float().repeat(len(router_logits))
    )
    f = (
        torch.zeros(n_exp, device=g.device).scatter_add_(0, sel.flatten(), w.repeat_interleave(top_k))
        / w.sum()
    )
    p_mean = (p * w[:, None]).sum(0) / w.sum()
    return n_exp * (f * p_mean).sum()
