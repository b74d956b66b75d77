"""Kernel layers: subclasses of the model's own layers whose forward takes a faster path where one
applies (a bf16 / int8 / int4 decode step on CPU) and the parent's plain PyTorch everywhere else.

`install(model)` re-types the modules of a built model in place (gpt-fast and torchtitan swap modules
the same way): the parameters, their names and the state dict are untouched, nothing is copied, and
model.py never mentions a kernel. Call it after any other swap (quantize_model); checkpoint.load_model
calls it for CPU models. A subclass adds no state, so `module.__class__` may change in place.

What each swap does (the predicates in ops.py decide per call; without the library all fall through):
- nn.Linear -> Linear: up to ops.MAX_ROWS bf16 rows through the GEMV kernel; one reduced-precision row
  through torch.mv otherwise (torch's CPU GEMM at M = 1 in bf16 is several times slower than its GEMV).
- Int8Linear / Int4Linear -> their kernel twins: few bf16 rows through the int8 / int4 GEMV kernels.
- MLP -> GatedMLP: gate and up products, silu and product in one call (bf16, int8 or int4 weights).
- RMSNorm, Attention's rotary and attend -> one kernel call each for a bf16 decode step; over a cache
  with a `decode` method (the engine's paged cache) the attention reads the blocks in place.
- Qwen2 -> a twin whose tied output layer (the embedding) goes through the Linear path above.
- SparseMoeBlock -> moe.SparseMoeBlock: the routed experts as grouped matmuls over fused weights (moe.py;
  the expert parameters become views of them, so the state dict is unchanged), forward and backward.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from qwen2 import model as core
from qwen2 import quantize
from qwen2.attention import attend
from qwen2.kernels import moe, ops
from qwen2.rope import apply_rotary


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear with the decode-sized fast paths (see the module docstring)."""
    if x.dtype == weight.dtype and x.dtype != torch.float32 and x.device.type == "cpu":
        if ops.usable(x, weight, *(() if bias is None else (bias,))):
            return ops.gemv_bf16(x, weight, bias)
        if x.numel() == x.shape[-1]:
            y = torch.mv(weight, x.reshape(-1))
            return (y if bias is None else y + bias).view(*x.shape[:-1], weight.shape[0])
    return F.linear(x, weight, bias)


class Linear(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


class Int8Linear(quantize.Int8Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if ops.usable(x):
            return ops.gemv_int8(x, self.weight, self.scales, self.bias)
        return super().forward(x)


class Int4Linear(quantize.Int4Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if ops.usable(x) and ops.int4_shape_ok(self.in_features, self.group_size):
            return ops.gemv_int4(x, self.weight, self.scales, self.zeros, self.group_size, self.bias)
        return super().forward(x)


def _glu(gate: nn.Module, up: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    """silu(gate(x)) * up(x) in one kernel call, or None where it does not apply."""
    if type(gate) is not type(up) or gate.bias is not None or up.bias is not None or not ops.usable(x):
        return None
    if isinstance(gate, Linear):
        if x.dtype == gate.weight.dtype == up.weight.dtype and ops.usable(x, gate.weight, up.weight):
            return ops.gemv_glu(x, gate.weight, up.weight)
    elif isinstance(gate, Int8Linear):
        return ops.gemv_glu(x, gate.weight, up.weight, gate.scales, up.scales)
    elif isinstance(gate, Int4Linear):
        if up.group_size == gate.group_size and ops.int4_shape_ok(gate.in_features, gate.group_size):
            return ops.gemv_glu(
                x, gate.weight, up.weight, gate.scales, up.scales, gate.zeros, up.zeros, gate.group_size
            )
    return None


class GatedMLP(core.MLP):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = _glu(self.gate_proj, self.up_proj, x)
        return super().forward(x) if y is None else self.down_proj(y)


class RMSNorm(core.RMSNorm):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if ops.eager_usable(x, self.weight):  # bf16 on CPU: one call for the 8 ops of the plain norm
            return ops.rms_norm(x, self.weight, self.eps)
        return super().forward(x)


def _rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    if x.shape[2] == 1 and ops.eager_usable(x, cos, sin):
        return ops.rotary(x, cos, sin)
    return apply_rotary(x, cos, sin)


def _attend(q, k, v, mask=None):
    if mask is not None and ops.decode_attention_ok(q, k, v):  # SDPA's setup alone costs ~100 us a call
        return ops.decode_attention(q, k, v, mask)
    return attend(q, k, v, mask)


class Attention(core.Attention):
    rotary = staticmethod(_rotary)
    attend = staticmethod(_attend)

    def forward(self, x, cos, sin, positions, cache=None, view=None):
        # A one-token step over a cache that attends in place (the engine's paged cache: `decode`, which
        # reads the blocks through their table instead of gathering them into a dense copy per layer).
        decode = getattr(cache, "decode", None)
        if decode is None or self.dual_chunk is not None or x.shape[1] != 1:
            return super().forward(x, cos, sin, positions, cache, view)
        b = x.shape[0]
        q = self.q_proj(x).view(b, 1, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, 1, self.n_kv, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, 1, self.n_kv, self.head_dim).transpose(1, 2)
        q, k = self.rotary(q, cos, sin), self.rotary(k, cos, sin)
        out = decode(self.layer_idx, q, k, v, view)
        if out is None:
            k, v = cache.update(self.layer_idx, k, v, view)
            out = self.attend(q, k, v, view.mask)
        return self.o_proj(out.transpose(1, 2).reshape(b, 1, self.n_heads * self.head_dim))


class Qwen2(core.Qwen2):
    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return linear(h, self.model.embed_tokens.weight) if self.lm_head is None else self.lm_head(h)


# The plain class -> its kernel twin. Exact types: a subclass someone else made is left alone.
SWAPS = {
    nn.Linear: Linear,
    quantize.Int8Linear: Int8Linear,
    quantize.Int4Linear: Int4Linear,
    core.MLP: GatedMLP,
    core.RMSNorm: RMSNorm,
    core.Attention: Attention,
    core.Qwen2: Qwen2,
    core.SparseMoeBlock: moe.SparseMoeBlock,
}


def install(model: nn.Module) -> nn.Module:
    """Swap the kernel layers into `model` in place (idempotent); returns it. Also where the C kernels
    cannot be built (ops.status() says why): the twins then fall through to their parents, except for
    the torch-only fast path of `linear` (one bf16 row through torch.mv, several times faster here)."""
    ops.library()  # build (or rule out) the library now, not inside a traced or timed step
    for module in model.modules():
        twin = SWAPS.get(type(module))
        if twin is not None:
            module.__class__ = twin
    return model


def uninstall(model: nn.Module) -> nn.Module:
    """The plain layers back (for a reference measurement or a test); returns `model`."""
    plain = {twin: base for base, twin in SWAPS.items()}
    for module in model.modules():
        base = plain.get(type(module))
        if base is not None:
            module.__class__ = base
    return model
