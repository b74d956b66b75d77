"""Weight-only int8 / int4 linear layers, swapped into a built model from outside (gpt-fast's quantize.py).

int8: symmetric, one scale per output channel:   w[n, k] ~ q[n, k] * scale[n],             q in [-127, 127]
int4: asymmetric, one (scale, zero) per group of `group_size` input channels (default 128):
      w[n, k] ~ (q[n, k] - 8) * scale[n, g] + zero[n, g],   q in [0, 15], g = k // group_size
      (torch's int4 kernels' convention: `zero` is the value q = 8 stands for; scale = (max - min) / 15.)
Activations stay in the model's dtype. The matmul on CPU: for many rows (prefill, from DEQUANTIZE_ROWS) a
float matmul over the dequantized weight; below that torch's weight-only kernels (`torch._weight_int8pack_mm`;
`aten._weight_int4pack_mm_for_cpu` over the layout made by `aten._convert_weight_to_int4pack_for_cpu`).
Elsewhere it dequantizes and runs a plain matmul. For a few bf16 rows (decode) qwen2.kernels swaps in
layers whose kernels read the saved layout directly.

Which layers (the policy, one place: `_targets`):
- every nn.Linear in the decoder layers (q/k/v/o projections, the MLP, MoE experts and shared expert);
  q/k/v keep their float bias;
- not the MoE router (`mlp.gate`) or `shared_expert_gate`: tiny, and the routing decision is sensitive;
- the output layer when `lm_head=True` (the default): it is a quarter of Qwen2-0.5B's weight bytes per
  token, so decode speed needs it. With tied embeddings the quantized output layer becomes its own
  `lm_head` module and config.json says `tie_word_embeddings: false`;
- never the input embedding: a lookup reads one row per token, so quantizing it saves memory, not time.

On disk (safetensors, beside the float tensors), for a layer `P` (HF name prefix):
  int8: `P.weight` int8 [N, K], `P.scales` [N]
  int4: `P.weight` uint8 [N, K/2] (two 4-bit values per byte: column 2j in the low nibble, 2j+1 in the
        high), `P.scales` and `P.zeros` [N, K / group_size]
  and `P.bias` where the layer has one. config.json gets
  `"quantization": {"method": "weight_only", "bits": 8 | 4, "group_size": null | G, "lm_head": bool}`,
  which `qwen2.checkpoint.load_model` hands to `apply_quantization` before loading the tensors.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

METHOD = "weight_only"


# ---- kernels --------------------------------------------------------------------------------------
def _has(op: str) -> bool:
    return hasattr(torch.ops.aten, op)


HAS_INT8_MM = hasattr(torch, "_weight_int8pack_mm")
HAS_INT4_MM = _has("_weight_int4pack_mm_for_cpu") and _has("_convert_weight_to_int4pack_for_cpu")
# From this many rows (prefill) a float matmul over the dequantized weight beats torch's int kernels,
# which are built for few rows (a 512 x 896 x 4864 product on the 2-core machine: int8 32 ms vs 3.5 ms
# dequantized, int4 30 ms vs 16 ms).
DEQUANTIZE_ROWS = {8: 32, 4: 256}


def quantize_int8(w: torch.Tensor, scale_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] float -> (q int8 [N, K], scales [N]); q = round(w / s), s = max|w[n]| / 127."""
    w = w.float()
    scales = (w.abs().amax(dim=1) / 127).clamp(min=1e-12).to(scale_dtype)
    q = torch.round(w / scales.float()[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scales


def quantize_int4(w: torch.Tensor, group_size: int, scale_dtype: torch.dtype):
    """w [N, K] float -> (packed uint8 [N, K/2], scales [N, G], zeros [N, G]), G = K / group_size.
    Scales and zeros are rounded to `scale_dtype` first and q is chosen against the rounded values."""
    n, k = w.shape
    g = w.float().reshape(n, k // group_size, group_size)
    lo, hi = g.amin(dim=-1), g.amax(dim=-1)
    scales = ((hi - lo) / 15).clamp(min=1e-6).to(scale_dtype)
    zeros = (lo + 8 * scales.float()).to(scale_dtype)
    q = torch.round((g - zeros.float()[..., None]) / scales.float()[..., None] + 8).clamp(0, 15)
    q = q.to(torch.uint8).reshape(n, k)
    return q[:, 0::2] | (q[:, 1::2] << 4), scales, zeros


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [N, K/2] -> uint8 [N, K] values in 0..15 (low nibble = even column)."""
    return torch.stack((packed & 0xF, packed >> 4), dim=-1).reshape(packed.shape[0], -1)


class Int8Linear(nn.Module):
    """Weight-only int8 linear: y = x (q * scales)^T + bias."""

    def __init__(
        self, in_features: int, out_features: int, bias: bool = False, *, dtype=torch.bfloat16, device=None
    ):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer(
            "weight", torch.empty(out_features, in_features, dtype=torch.int8, device=device)
        )
        self.register_buffer("scales", torch.empty(out_features, dtype=dtype, device=device))
        self.bias = (
            nn.Parameter(torch.empty(out_features, dtype=dtype, device=device), requires_grad=False)
            if bias
            else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        s = self.scales if self.scales.dtype == x.dtype else self.scales.to(x.dtype)
        if HAS_INT8_MM and x.device.type == "cpu" and x2.shape[0] < DEQUANTIZE_ROWS[8]:
            y = torch._weight_int8pack_mm(x2, self.weight, s)
        else:
            y = F.linear(x2, self.weight.to(x.dtype)) * s
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.view(*shape[:-1], self.out_features)

    def dequantize(self) -> torch.Tensor:
        return self.weight.float() * self.scales.float()[:, None]

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, bits=8"
        )


class Int4Linear(nn.Module):
    """Weight-only int4 linear, group-wise asymmetric (see the module docstring for the format).

    `weight`, `scales`, `zeros` are what is saved; the kernel's own layout (`packed`, `scales_and_zeros`)
    is derived from them after quantizing or loading (`prepare`), kept as non-persistent buffers."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = False,
        *,
        group_size: int = 128,
        dtype=torch.bfloat16,
        device=None,
    ):
        super().__init__()
        if in_features % group_size or in_features % 2:
            raise ValueError(f"int4: group_size {group_size} must divide in_features {in_features}")
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        groups = in_features // group_size
        self.register_buffer(
            "weight", torch.empty(out_features, in_features // 2, dtype=torch.uint8, device=device)
        )
        self.register_buffer("scales", torch.empty(out_features, groups, dtype=dtype, device=device))
        self.register_buffer("zeros", torch.empty(out_features, groups, dtype=dtype, device=device))
        self.bias = (
            nn.Parameter(torch.empty(out_features, dtype=dtype, device=device), requires_grad=False)
            if bias
            else None
        )
        self.register_buffer("packed", None, persistent=False)
        self.register_buffer("scales_and_zeros", None, persistent=False)
        self.register_load_state_dict_post_hook(lambda module, _incompatible: module.prepare())

    @property
    def uses_kernel(self) -> bool:
        return HAS_INT4_MM and self.weight.device.type == "cpu" and self.out_features % 16 == 0

    def prepare(self) -> None:
        """Build the kernel layout from the saved tensors (after quantizing, loading or moving devices)."""
        if self.weight.device.type == "meta" or not self.uses_kernel:
            self.packed = self.scales_and_zeros = None
            return
        q = unpack_int4(self.weight).to(torch.int32)
        self.packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
        self.scales_and_zeros = torch.stack(
            (self.scales.t(), self.zeros.t()), dim=-1
        ).contiguous()  # [G, N, 2]

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        if self.packed is not None and (
            self.packed.device != self.weight.device or self.scales_and_zeros.dtype != self.scales.dtype
        ):
            self.prepare()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if self.packed is not None and x.device.type == "cpu" and x2.shape[0] < DEQUANTIZE_ROWS[4]:
            sz = (
                self.scales_and_zeros
                if self.scales_and_zeros.dtype == x.dtype
                else self.scales_and_zeros.to(x.dtype)
            )
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, self.packed, self.group_size, sz)
        else:
            y = F.linear(x2, self.dequantize().to(x.dtype))
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.view(*shape[:-1], self.out_features)

    def dequantize(self) -> torch.Tensor:
        q = unpack_int4(self.weight).float().reshape(self.out_features, -1, self.group_size)
        w = (q - 8) * self.scales.float()[..., None] + self.zeros.float()[..., None]
        return w.reshape(self.out_features, self.in_features)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, bits=4, group_size={self.group_size}"
        )


# ---- which layers, and swapping them ---------------------------------------------------------------
def _spec(bits: int, group_size: int | None, lm_head: bool) -> dict:
    if bits not in (4, 8):
        raise ValueError(f"quantization bits must be 8 or 4, got {bits!r}")
    if bits == 4 and (not isinstance(group_size, int) or group_size <= 0 or group_size % 2):
        raise ValueError(
            f"int4 group_size must be a positive even integer (32, 64, 128, ...), got {group_size!r}"
        )
    return {
        "method": METHOD,
        "bits": bits,
        "group_size": group_size if bits == 4 else None,
        "lm_head": bool(lm_head),
    }


def check_spec(spec: dict) -> dict:
    """Validate a config.json `quantization` entry; returns it normalised."""
    if not isinstance(spec, dict) or spec.get("method", METHOD) != METHOD:
        raise ValueError(
            f"config.json: quantization must be {{'method': '{METHOD}', 'bits': 8|4, ...}}, got {spec!r}"
        )
    return _spec(spec.get("bits"), spec.get("group_size"), spec.get("lm_head", False))


def _targets(model, lm_head: bool) -> list[tuple[nn.Module, str, nn.Linear]]:
    """(parent, attribute, linear) for every layer the policy quantizes."""
    out = []
    for layer in model.model.layers:
        for _name, module in layer.named_modules():
            for attr, child in module.named_children():
                if isinstance(child, nn.Linear) and not (attr == "gate" or attr == "shared_expert_gate"):
                    out.append((module, attr, child))
    if lm_head and isinstance(model.lm_head, nn.Linear):
        out.append((model, "lm_head", model.lm_head))
    return out


def _shell(linear: nn.Linear, spec: dict, dtype, device) -> nn.Module:
    has_bias = linear.bias is not None
    if spec["bits"] == 8:
        return Int8Linear(linear.in_features, linear.out_features, has_bias, dtype=dtype, device=device)
    return Int4Linear(
        linear.in_features,
        linear.out_features,
        has_bias,
        group_size=spec["group_size"],
        dtype=dtype,
        device=device,
    )


def _check_shapes(targets, spec: dict) -> None:
    if spec["bits"] == 4:
        for parent, attr, lin in targets:
            if lin.in_features % spec["group_size"]:
                raise ValueError(
                    f"int4 group_size {spec['group_size']} does not divide "
                    f"in_features {lin.in_features} of a {type(parent).__name__}.{attr}; "
                    "choose a group size that divides the model's widths (e.g. 32)"
                )


def apply_quantization(model, spec: dict):
    """Swap the quantized layers' structure into `model` (built on the meta device, or anywhere) so that
    a quantized checkpoint's state dict loads into it. Called by qwen2.checkpoint.load_model with
    config.json's `quantization` entry; the tensors are filled by load_state_dict."""
    spec = check_spec(spec)
    if spec["lm_head"] and model.lm_head is None:
        raise ValueError(
            "config.json: quantization.lm_head is true but tie_word_embeddings is true; "
            "a quantized output layer is untied (set tie_word_embeddings to false)"
        )
    targets = _targets(model, spec["lm_head"])
    _check_shapes(targets, spec)
    for parent, attr, lin in targets:
        setattr(parent, attr, _shell(lin, spec, lin.weight.dtype, lin.weight.device))
    model.config = model.config.replace(quantization=spec)
    return model


@torch.no_grad()
def quantize_model(model, bits: int = 8, group_size: int = 128, lm_head: bool = True):
    """Quantize a loaded float model in place (see the module docstring for the policy); returns it.
    `save_model(model, dir)` then writes the quantized checkpoint with its config.json entry."""
    if model.config.quantization:
        raise ValueError("the model is already quantized")
    spec = _spec(bits, group_size, lm_head)
    if lm_head and model.lm_head is None:  # tied: the quantized output layer becomes its own module
        emb = model.model.embed_tokens.weight
        model.lm_head = nn.Linear(emb.shape[1], emb.shape[0], bias=False, device=emb.device, dtype=emb.dtype)
        model.lm_head.weight = emb  # shared until quantized below; the embedding itself stays float
        model.config = model.config.replace(tie_word_embeddings=False)
    targets = _targets(model, lm_head)
    _check_shapes(targets, spec)
    for parent, attr, lin in targets:
        dtype = lin.weight.dtype
        q = _shell(lin, spec, dtype, lin.weight.device)
        if bits == 8:
            q.weight, q.scales = quantize_int8(lin.weight, dtype)
        else:
            q.weight, q.scales, q.zeros = quantize_int4(lin.weight, group_size, dtype)
            q.prepare()
        if lin.bias is not None:
            q.bias.copy_(lin.bias)
        setattr(parent, attr, q)
    model.config = model.config.replace(quantization=spec)
    return model


def weight_bytes_per_token(model) -> int:
    """Bytes of weights one decode step reads: every parameter and buffer except the embedding table
    (one row per token) and the kernel-layout copies (the saved tensors stand for them)."""
    total = 0
    emb = model.model.embed_tokens.weight
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t is emb and model.lm_head is not None:
            continue
        if name.endswith(("packed", "scales_and_zeros")):
            continue
        total += t.numel() * t.element_size()
    return total
