"""A grouped forward (and backward) for Qwen2-MoE's routed experts, installed like the other kernel layers.

model.SparseMoeBlock already groups tokens by expert, but then runs three nn.Linear modules per expert
with their own allocations, copies each expert's rows into an output slice, and leaves the backward to
autograd's per-op graph (three matmuls, silu, product and a slice-copy per expert). Here the experts are
one autograd Function over the sorted rows:

- the weights live in two fused tensors per block, gate+up [E, 2I, H] and down [E, H, I], built once after
  loading. The Hugging Face parameters (`experts.E.gate_proj.weight`, ...) become views into them, so the
  names, the state dict and the optimizer are untouched, nothing is stored twice, and anything that
  updates the parameters in place (an optimizer, load_state_dict) updates the fused tensors too. The views
  are checked on every call; a parameter replaced since (`.to(dtype)`, assign=True) rebuilds them.
- the forward is one [n, H] x [H, 2I] matmul and one [n, I] x [I, H] matmul per expert that received
  tokens, written into preallocated outputs, with silu * up done once over all rows; the backward is
  written out (dX and dW per active expert, the silu derivative once over all rows), so inactive experts
  get no gradient, as with the reference block.
- where the forward needs no gradient and torch._grouped_mm runs (on CPU since torch 2.8; its CPU backward
  fails on an empty group, hence only forward), the forward is two grouped matmuls over all experts.
- a bf16 decode step (few rows, no autograd, the C kernels built) keeps the GEMV kernels (ops.gemv_glu).

Falls back to the parent's forward where none of this applies: quantized or biased experts, FSDP's DTensor
parameters, a meta model.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from qwen2 import model as core
from qwen2.kernels import ops

# torch._grouped_mm for the no-grad forward where it exists (set False to time the loop alone).
USE_GROUPED_MM = hasattr(torch, "_grouped_mm")


def _plain_expert(mlp: nn.Module) -> bool:
    lins = (mlp.gate_proj, mlp.up_proj, mlp.down_proj)
    return all(
        isinstance(lin, nn.Linear)
        and lin.bias is None
        and type(lin.weight) is nn.Parameter
        and lin.weight.device.type != "meta"
        for lin in lins
    )


def fused_weights(block: core.SparseMoeBlock) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(gate_up [E, 2I, H], down [E, H, I]) whose slices are the experts' parameters, built on first use
    and rebuilt when a parameter was replaced; None where the experts are not plain bias-free Linears."""
    experts = block.experts
    if not all(_plain_expert(m) for m in experts):
        return None
    cached = block.__dict__.get("_fused")
    if cached is not None and _views_of(experts, *cached):
        return cached
    first = experts[0]
    w = first.gate_proj.weight
    if any(m.gate_proj.weight.dtype != w.dtype or m.down_proj.weight.device != w.device for m in experts):
        return None
    inter, hidden = w.shape
    n = len(experts)
    with torch.inference_mode(False), torch.no_grad():  # normal tensors even when first called for inference
        w13 = torch.empty(n, 2 * inter, hidden, dtype=w.dtype, device=w.device)
        w2 = torch.empty(n, hidden, inter, dtype=w.dtype, device=w.device)
        for e, m in enumerate(experts):
            w13[e, :inter].copy_(m.gate_proj.weight)
            w13[e, inter:].copy_(m.up_proj.weight)
            w2[e].copy_(m.down_proj.weight)
            m.gate_proj.weight.data = w13[e, :inter]
            m.up_proj.weight.data = w13[e, inter:]
            m.down_proj.weight.data = w2[e]
    block.__dict__["_fused"] = (w13, w2)  # a plain attribute: not a buffer, never in the state dict
    return w13, w2


def _views_of(experts, w13: torch.Tensor, w2: torch.Tensor) -> bool:
    inter = w13.shape[1] // 2
    s13, s2, size = w13[0].numel(), w2[0].numel(), w13.element_size()
    p13, p2 = w13.data_ptr(), w2.data_ptr()
    for e, m in enumerate(experts):
        g, u, d = m.gate_proj.weight, m.up_proj.weight, m.down_proj.weight
        if (
            g.data_ptr() != p13 + e * s13 * size
            or u.data_ptr() != p13 + (e * s13 + inter * w13.shape[2]) * size
            or d.data_ptr() != p2 + e * s2 * size
            or g.dtype != w13.dtype
            or d.dtype != w2.dtype
        ):
            return False
    return True


def _silu_mul(gu: torch.Tensor, inter: int) -> torch.Tensor:
    return F.silu(gu[:, :inter]) * gu[:, inter:]


class _Experts(torch.autograd.Function):
    """Rows `xs` [N, H] sorted by expert; `groups` the (expert, start, count) of each active expert; the
    active experts' (gate, up, down) parameters follow so that autograd hands them their gradients."""

    @staticmethod
    def forward(ctx, xs, groups, w13, w2, *params):
        inter = w13.shape[1] // 2
        gu = xs.new_empty(xs.shape[0], 2 * inter)
        for e, s, n in groups:
            torch.mm(xs[s : s + n], w13[e].T, out=gu[s : s + n])
        h = _silu_mul(gu, inter)
        out = xs.new_empty(xs.shape)
        for e, s, n in groups:
            torch.mm(h[s : s + n], w2[e].T, out=out[s : s + n])
        ctx.save_for_backward(xs, gu, h)
        ctx.groups, ctx.w13, ctx.w2 = groups, w13, w2
        return out

    @staticmethod
    def backward(ctx, dout):
        xs, gu, h = ctx.saved_tensors
        groups, w13, w2 = ctx.groups, ctx.w13, ctx.w2
        inter = w13.shape[1] // 2
        want_x, want_w = ctx.needs_input_grad[0], any(ctx.needs_input_grad[4:])
        dout = dout.contiguous()
        dh = dout.new_empty(h.shape)
        grads = []
        for e, s, n in groups:
            torch.mm(dout[s : s + n], w2[e], out=dh[s : s + n])
            if want_w:
                grads.append(dout[s : s + n].T @ h[s : s + n])  # dW_down [H, I]
        # d(silu(g) * u): dg = dh * u * sig(g) * (1 + g * (1 - sig(g))), du = dh * silu(g); in fp32.
        g, u = gu[:, :inter].float(), gu[:, inter:].float()
        sig = torch.sigmoid(g)
        dh32 = dh.float()
        dgu = torch.cat([dh32 * u * sig * (1 + g * (1 - sig)), dh32 * g * sig], dim=1).to(gu.dtype)
        dxs = xs.new_empty(xs.shape) if want_x else None
        out = []
        for i, (e, s, n) in enumerate(groups):
            if want_x:
                torch.mm(dgu[s : s + n], w13[e], out=dxs[s : s + n])
            if want_w:
                d13 = dgu[s : s + n].T @ xs[s : s + n]  # [2I, H]
                out += [d13[:inter], d13[inter:], grads[i]]
        if not want_w:
            out = [None] * (3 * len(groups))
        return (dxs, None, None, None, *out)


def _aligned(w13: torch.Tensor) -> bool:
    """torch._grouped_mm needs every row of its operands 16-byte aligned (an expert width of 53 fails)."""
    return all(n * w13.element_size() % 16 == 0 for n in (w13.shape[1] // 2, w13.shape[2]))


def _grouped_forward(xs, counts: torch.Tensor, w13, w2) -> torch.Tensor:
    offs = counts.cumsum(0).to(torch.int32)
    gu = torch._grouped_mm(xs, w13.transpose(-2, -1), offs=offs)
    return torch._grouped_mm(_silu_mul(gu, w13.shape[1] // 2), w2.transpose(-2, -1), offs=offs)


def routed_experts(block: core.SparseMoeBlock, xs: torch.Tensor, counts: torch.Tensor) -> torch.Tensor | None:
    """The experts' outputs for rows `xs` [N, H] sorted by expert (`counts` [E] rows each), or None where
    the fused path does not apply (the caller then runs the experts itself)."""
    fused = fused_weights(block)
    if fused is None:
        return None
    w13, w2 = fused
    if xs.dtype != w13.dtype:
        return None
    params = [p for m in block.experts for p in (m.gate_proj.weight, m.up_proj.weight, m.down_proj.weight)]
    grad = torch.is_grad_enabled() and (xs.requires_grad or any(p.requires_grad for p in params))
    if not grad and ops.usable(xs[:1], w13) and int(counts.max()) <= ops.MAX_ROWS:
        return None  # a bf16 decode step: the parent's loop runs each expert's few rows through the GEMVs
    if not grad and USE_GROUPED_MM and xs.shape[0] > len(block.experts) and _aligned(w13):
        # with fewer rows than experts the grouped call walks every (mostly empty) group: the loop wins
        return _grouped_forward(xs, counts, w13, w2)
    groups, start = [], 0
    for e, n in enumerate(counts.tolist()):
        if n:
            groups.append((e, start, n))
            start += n
    active = [p for e, _, _ in groups for p in params[3 * e : 3 * e + 3]]
    return _Experts.apply(xs, groups, w13, w2, *active)


class SparseMoeBlock(core.SparseMoeBlock):
    """The MoE block with the routed experts through `routed_experts`; routing, weighting, the shared
    expert and the router-logit collection are the parent's."""

    def run_experts(self, xs: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        out = routed_experts(self, xs, counts)
        return super().run_experts(xs, counts) if out is None else out
