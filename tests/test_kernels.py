"""qwen2.kernels: the decode-time CPU kernels equal the float64 product (within bf16 output rounding and, for
integer weights, the activations' fixed-point step), they build where the CPU can run them, they are
used by the model and the quantized layers, they work inside torch.compile, and turning them off
falls back to torch."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from qwen2.config import ModelConfig
from qwen2.generation import KVCache, decode_one, prefill
from qwen2.kernels import install
from qwen2.kernels import ops as cpu_kernels
from qwen2.kernels.layers import Attention, RMSNorm, linear
from qwen2.model import build_model
from qwen2.quantize import quantize_int4, quantize_int8, quantize_model, unpack_int4

CPU_FLAGS = (
    next((line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")), "")
    if Path("/proc/cpuinfo").exists()
    else ""
)
CAN_BUILD = (
    all(f in CPU_FLAGS.split() for f in ("avx512f", "avx512bw", "avx512_bf16", "avx512_vnni"))
    and shutil.which(os.environ.get("CC", "cc")) is not None
    and os.environ.get("QWEN2_CPU_KERNELS") != "0"
)
needs_kernels = pytest.mark.skipif(not CAN_BUILD, reason="CPU without AVX-512 BF16/VNNI or no C compiler")


def test_kernels_build_where_the_cpu_can_run_them():
    line = cpu_kernels.status()
    if CAN_BUILD:
        assert line.startswith("qwen2 CPU kernels on ("), line
    else:
        assert "torch's kernels" in line, line


def rows(m, k, gen, dtype=torch.bfloat16):
    return (torch.randn(m, k, generator=gen) * torch.rand(m, 1, generator=gen) * 4).to(dtype)


def assert_within(y, ref, extra=0.0):
    """y (bf16) is ref rounded to bf16, up to fp32 accumulation and `extra` (a bound per element)."""
    err = (y.double() - ref).abs()
    bound = ref.abs() * 2.0**-8 + extra + 1e-5 * (1 + ref.abs())
    assert bool((err <= bound).all()), f"max excess {(err - bound).max().item():.3g}"


SHAPES = [
    (1, 32, 1),
    (3, 33, 2),
    (4, 64, 1),
    (7, 100, 3),
    (130, 896, 1),
    (33, 4864, 8),
    (5, 1, 1),
    (6, 96, 5),  # activation rows past a block of 4 (the kernels take them 4 at a time): a tail of 1
    (9, 40, 11),  # a tail of 3, and weight rows past a block of 4
]


@needs_kernels
@pytest.mark.parametrize("n,k,m", SHAPES)
@pytest.mark.parametrize("with_bias", [False, True])
def test_bf16_kernel_is_the_product_rounded(n, k, m, with_bias):
    g = torch.Generator().manual_seed(n * 1000 + k + m)
    w, x = rows(n, k, g), rows(m, k, g)
    b = rows(1, n, g)[0] if with_bias else None
    y = cpu_kernels.gemv_bf16(x, w, b)
    ref = x.double() @ w.double().T + (0 if b is None else b.double())
    assert y.shape == (m, n) and y.dtype == torch.bfloat16
    assert_within(y, ref)


def fixed_point_slack(x, w_abs_rowsum, bits):
    """Half the fixed-point step of each row of x (2^(e - bits - 1), max|x| < 2^e) times sum_k |w[n, k]|."""
    amax = x.float().abs().amax(dim=1)
    e = torch.frexp(amax).exponent.double()
    return (2.0 ** (e - bits - 1))[:, None] * w_abs_rowsum[None, :]


@needs_kernels
@pytest.mark.parametrize("n,k,m", SHAPES)
def test_int8_kernel_is_the_dequantized_product(n, k, m):
    g = torch.Generator().manual_seed(n * 7 + k + m)
    w, x, b = rows(n, k, g, torch.float32), rows(m, k, g), rows(1, n, g)[0]
    q, s = quantize_int8(w, torch.bfloat16)
    deq = q.double() * s.double()[:, None]
    y = cpu_kernels.gemv_int8(x, q, s, b)
    ref = x.double() @ deq.T + b.double()
    assert_within(y, ref, fixed_point_slack(x, deq.abs().sum(1), 15))


@needs_kernels
@pytest.mark.parametrize(
    "n,k,m,group",
    [(1, 128, 1, 128), (6, 256, 2, 128), (130, 896, 1, 128), (33, 4864, 8, 128), (9, 512, 3, 256)],
)
def test_int4_kernel_is_the_dequantized_product(n, k, m, group):
    assert cpu_kernels.int4_shape_ok(k, group)
    g = torch.Generator().manual_seed(n + k + m + group)
    w, x, b = rows(n, k, g, torch.float32), rows(m, k, g), rows(1, n, g)[0]
    packed, s, z = quantize_int4(w, group, torch.bfloat16)
    q = unpack_int4(packed).double().view(n, k // group, group)
    deq = ((q - 8) * s.double()[..., None] + z.double()[..., None]).view(n, k)
    y = cpu_kernels.gemv_int4(x, packed, s, z, group, b)
    ref = x.double() @ deq.T + b.double()
    q_abs = (
        ((q - 8).abs() * s.double()[..., None]).view(n, k).abs().sum(1)
    )  # the part that meets x's rounding
    assert_within(y, ref, fixed_point_slack(x, q_abs, 14))


def test_int4_shapes_the_kernel_refuses():
    assert not cpu_kernels.int4_shape_ok(896, 32) and not cpu_kernels.int4_shape_ok(200, 128)


@needs_kernels
def test_non_finite_activations_give_nan_rows_not_garbage():
    g = torch.Generator().manual_seed(0)
    w = rows(8, 256, g, torch.float32)
    x = rows(2, 256, g)
    x[1, 3] = float("inf")
    q, s = quantize_int8(w, torch.bfloat16)
    y8 = cpu_kernels.gemv_int8(x, q, s)
    packed, s4, z4 = quantize_int4(w, 128, torch.bfloat16)
    y4 = cpu_kernels.gemv_int4(x, packed, s4, z4, 128)
    for y in (y8, y4):
        assert torch.isfinite(y[0]).all() and torch.isnan(y[1]).all()


@needs_kernels
def test_tiny_activations_keep_a_finite_fixed_point():
    """Activations near the bottom of bf16's range (max|x| < 2^-112): the fixed-point step stays finite
    (its inverse would overflow fp32), so the product is still close instead of garbage."""
    g = torch.Generator().manual_seed(1)
    w = rows(8, 256, g, torch.float32) * 2.0**100
    x = (rows(2, 256, g).double() * 2.0**-120).to(torch.bfloat16)
    q, s = quantize_int8(w, torch.bfloat16)
    ref8 = x.double() @ (q.double() * s.double()[:, None]).T
    packed, s4, z4 = quantize_int4(w, 128, torch.bfloat16)
    q4 = unpack_int4(packed).double().view(8, 2, 128)
    ref4 = x.double() @ ((q4 - 8) * s4.double()[..., None] + z4.double()[..., None]).view(8, 256).T
    for y, ref in (
        (cpu_kernels.gemv_int8(x, q, s), ref8),
        (cpu_kernels.gemv_int4(x, packed, s4, z4, 128), ref4),
    ):
        assert torch.isfinite(y).all()
        assert ((y.double() - ref).abs() <= 0.05 * ref.abs().max()).all()


def record_calls(monkeypatch, *names) -> list[str]:
    """The names of these cpu_kernels functions, in the order they are called from now on."""
    calls = []
    for name in names:
        fn = getattr(cpu_kernels, name)
        monkeypatch.setattr(
            cpu_kernels, name, lambda *a, fn=fn, name=name, **kw: calls.append(name) or fn(*a, **kw)
        )
    return calls


@needs_kernels
def test_model_linear_and_quantized_layers_use_the_kernels(monkeypatch):
    calls = record_calls(monkeypatch, "gemv_bf16", "gemv_int8", "gemv_int4", "gemv_glu")
    g = torch.Generator().manual_seed(0)
    w, x = rows(256, 256, g), rows(1, 256, g)
    linear(x, w)
    model = install(build_model(small_config(), dtype=torch.bfloat16).eval())
    for bits in (8, 4):
        q = install(quantize_model(build_model(small_config(), dtype=torch.bfloat16).eval(), bits=bits))
        with torch.no_grad():
            q(torch.tensor([[1]]))
    assert {"gemv_bf16", "gemv_int8", "gemv_int4"} <= set(calls)
    assert (
        calls.count("gemv_glu") == 2 * small_config().num_hidden_layers
    )  # int8 and int4 MLPs: one call each
    # many rows, fp32, or autograd: torch's path
    calls.clear()
    linear(rows(cpu_kernels.MAX_ROWS + 1, 256, g), w)
    linear(x.float(), w.float())
    linear(x, w.requires_grad_())
    with torch.no_grad():
        model(torch.zeros(1, cpu_kernels.MAX_ROWS + 1, dtype=torch.long))
    assert calls == []


def small_config():  # widths that int4 group 128 divides, so every layer takes the kernels
    return ModelConfig(
        vocab_size=512,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        torch_dtype="bfloat16",
    )


def decode_logits(model):
    cache = KVCache(model.config, 2, 32, dtype=model.model.embed_tokens.weight.dtype)
    prefill(model, torch.tensor([[3, 4, 5, 6], [7, 8, 9, 10]]), cache)
    return decode_one(model, torch.tensor([[11], [12]]), torch.tensor([[4], [4]]), cache)


@needs_kernels
@pytest.mark.parametrize("bits", [None, 8, 4])
def test_decode_step_with_and_without_the_kernels(bits, monkeypatch):
    model = install(build_model(small_config(), dtype=torch.bfloat16).eval())
    if bits:
        model = install(quantize_model(model, bits=bits))
    fast = decode_logits(model)
    monkeypatch.setattr(cpu_kernels, "_ready", lambda tensors: False)  # every kernel off: torch's ops
    slow = decode_logits(model)
    assert (fast - slow).norm() / slow.norm() < 2e-2  # bf16 roundings in different places only
    assert torch.equal(fast.argmax(-1), slow.argmax(-1))


@needs_kernels
@pytest.mark.parametrize("bits", [16, 8, 4])
@pytest.mark.parametrize("n,k,m", [(4864, 896, 1), (37, 256, 3), (5, 128, 4), (9, 256, 6)])
def test_glu_kernel_is_silu_of_gate_times_up(n, k, m, bits):
    g = torch.Generator().manual_seed(n + k + m + bits)
    wg, wu, x = rows(n, k, g), rows(n, k, g), rows(m, k, g)
    if bits == 16:
        gate, up, extra = (wg,), (wu,), {}
        product = cpu_kernels.gemv_bf16
    elif bits == 8:
        (qg, sg), (qu, su) = quantize_int8(wg, torch.bfloat16), quantize_int8(wu, torch.bfloat16)
        gate, up, extra = (qg, sg), (qu, su), dict(s_gate=sg, s_up=su)
        product = cpu_kernels.gemv_int8
    else:
        (qg, sg, zg), (qu, su, zu) = (
            quantize_int4(wg, 128, torch.bfloat16),
            quantize_int4(wu, 128, torch.bfloat16),
        )
        gate, up, extra = (
            (qg, sg, zg, 128),
            (qu, su, zu, 128),
            dict(s_gate=sg, s_up=su, z_gate=zg, z_up=zu, group_size=128),
        )
        product = cpu_kernels.gemv_int4
    y = cpu_kernels.gemv_glu(x, gate[0], up[0], **extra)
    ref = F.silu(product(x, *gate)) * product(
        x, *up
    )  # the kernels' own products, torch's bf16 silu and product
    assert y.shape == (m, n) and ((y.float() - ref.float()).abs() <= ref.float().abs() * 2.0**-7).all()
    assert (y != ref).float().mean() < 0.01  # silu's exp is our own: a rare last-bit difference at most


@needs_kernels
@pytest.mark.parametrize("m,k", [(1, 896), (3, 100), (5, 16)])
def test_rms_norm_kernel_rounds_where_torch_does(m, k):
    g = torch.Generator().manual_seed(m + k)
    norm = RMSNorm(k, 1e-6).to(torch.bfloat16)
    norm.weight.data = rows(1, k, g)[0]
    x = rows(m, k, g).view(m, 1, k)
    with torch.no_grad():
        y = norm(x)
        x32 = x.float()  # the module's torch path, written out
        ref = norm.weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + 1e-6)).to(torch.bfloat16)
    # the sum of squares is added up in another order: a rare last-bit difference, never more
    assert ((y.float() - ref.float()).abs() <= ref.float().abs() * 2.0**-7).all()
    assert (y != ref).float().mean() < 0.01


@needs_kernels
@pytest.mark.parametrize("b,h,d", [(1, 14, 64), (3, 2, 128), (2, 3, 40)])
def test_rotary_kernel_is_torchs_rotary(b, h, d):
    g = torch.Generator().manual_seed(b * h + d)
    x = rows(b * h, d, g).view(b, h, 1, d)
    cos, sin = rows(b, d, g).view(b, 1, d), rows(b, d, g).view(b, 1, d)
    x1, x2 = x.chunk(2, dim=-1)
    ref = x * cos.unsqueeze(1) + torch.cat((-x2, x1), dim=-1) * sin.unsqueeze(1)
    assert torch.equal(Attention.rotary(x, cos, sin), ref)
    assert torch.equal(cpu_kernels.rotary(x, cos, sin), ref)


def cache_view(b, hkv, s, w, d, g):
    """k or v as the static cache hands it to attention: [B, Hkv, W, d], a view of [B, Hkv, S, d]"""
    return rows(b * hkv * s, d, g).view(b, hkv, s, d)[:, :, :w]


@needs_kernels
@pytest.mark.parametrize(
    "b,hq,hkv,w,d", [(1, 14, 2, 300, 64), (2, 6, 2, 17, 128), (3, 4, 4, 1, 40), (2, 8, 1, 40, 64)]
)
def test_decode_attention_kernel_is_attention(b, hq, hkv, w, d):
    g = torch.Generator().manual_seed(b + hq + w + d)
    q = rows(b * hq, d, g).view(b, hq, 1, d)
    k, v = cache_view(b, hkv, w + 5, w, d, g), cache_view(b, hkv, w + 5, w, d, g)
    last = torch.tensor([w - 1 - 3 * i for i in range(b)]).clamp(min=0)  # each row sees slots 0 .. last
    mask = (torch.arange(w) <= last[:, None]).view(b, 1, 1, w)
    assert cpu_kernels.decode_attention_ok(q, k, v)
    y = cpu_kernels.decode_attention(q, k, v, mask)
    rep = hq // hkv  # float64 reference: query head a reads KV head a // rep
    kr, vr = k.double().repeat_interleave(rep, 1), v.double().repeat_interleave(rep, 1)
    ref = F.scaled_dot_product_attention(q.double(), kr, vr, attn_mask=mask)
    # e_j rounded to bf16 (as torch's kernel does), then the output: half a bf16 step of max|v| and of out
    bound = 2.0**-8 * (v.double().abs().amax() + ref.abs()) + 1e-6
    assert y.shape == q.shape and ((y.double() - ref).abs() <= bound).all()
    assert torch.equal(Attention.attend(q, k, v, mask), y)  # the kernel attention layer takes it


@needs_kernels
def test_decode_step_runs_the_small_kernels(monkeypatch):
    calls = record_calls(monkeypatch, "rms_norm", "rotary", "decode_attention", "gemv_glu")
    model = install(build_model(small_config(), dtype=torch.bfloat16).eval())
    decode_logits(model)
    assert {"rms_norm", "rotary", "decode_attention", "gemv_glu"} <= set(calls)
    calls.clear()  # fp32, or a forward that keeps autograd: torch's ops
    decode_logits(model.float())
    model.bfloat16()(torch.tensor([[1, 2, 3]]))
    assert calls == []


@needs_kernels
def test_the_kernels_inside_torch_compile():
    g = torch.Generator().manual_seed(0)
    w, b, x = rows(64, 128, g), rows(1, 64, g)[0], rows(1, 128, g)
    q, s = quantize_int8(w.float(), torch.bfloat16)
    eager = (linear(x, w, b), cpu_kernels.gemv_int8(x, q, s), cpu_kernels.gemv_glu(x, w, w))
    compiled = torch.compile(
        lambda x: (linear(x, w, b), cpu_kernels.gemv_int8(x, q, s), cpu_kernels.gemv_glu(x, w, w)),
        fullgraph=True,
    )(x)
    for a, c in zip(eager, compiled):
        assert torch.equal(a, c)
    q, k, v = (
        rows(4, 64, g).view(1, 4, 1, 64),
        cache_view(1, 2, 12, 10, 64, g),
        cache_view(1, 2, 12, 10, 64, g),
    )
    mask = (torch.arange(10) <= 6).view(1, 1, 1, 10)
    attn = torch.compile(lambda q: Attention.attend(q, k, v, mask), fullgraph=True)
    assert torch.equal(attn(q), cpu_kernels.decode_attention(q, k, v, mask))


def test_turned_off_falls_back_to_torch():
    code = (
        "import torch; from qwen2.kernels import ops as cpu_kernels; "
        "from qwen2.kernels.layers import linear; "
        "w = torch.randn(8, 16).bfloat16(); x = torch.randn(1, 16).bfloat16(); "
        "y = linear(x, w); ref = x.float() @ w.float().T; "
        "assert (y.float() - ref).abs().max() < 0.05 * ref.abs().max(); print(cpu_kernels.status())"
    )
    env = dict(os.environ, QWEN2_CPU_KERNELS="0")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "qwen2 CPU kernels off (QWEN2_CPU_KERNELS=0): torch's kernels"


@pytest.mark.parametrize("bits", [None, 8, 4])
def test_install_swaps_layers_in_place_and_their_fallbacks_are_the_plain_model(bits, monkeypatch):
    """Runs on any CPU: with every kernel predicate false, install still swaps (the torch.mv path needs no
    library), each kernel twin falls through to its parent's plain PyTorch, keeps the same parameters and
    state dict, and uninstall undoes it."""
    from qwen2 import model as core
    from qwen2.kernels import layers, uninstall

    plain = build_model(small_config(), dtype=torch.bfloat16).eval()
    if bits:
        plain = quantize_model(plain, bits=bits)
    ref = decode_logits(plain)
    keys = {k: v.data_ptr() for k, v in plain.state_dict().items()}
    monkeypatch.setattr(cpu_kernels, "_ready", lambda tensors: False)  # no kernel may run
    model = install(plain)
    assert model is plain and type(model) is layers.Qwen2
    kinds = {type(m) for m in model.modules()}
    assert {layers.Attention, layers.GatedMLP, layers.RMSNorm} <= kinds
    assert not kinds & {core.Attention, core.MLP, core.RMSNorm, torch.nn.Linear}
    assert {k: v.data_ptr() for k, v in model.state_dict().items()} == keys  # nothing copied or renamed
    assert torch.equal(decode_logits(model), ref)
    uninstall(model)
    assert type(model) is core.Qwen2 and not {type(m) for m in model.modules()} & set(layers.SWAPS.values())


def fake_kernels(monkeypatch) -> list[str]:
    """Every kernel replaced by its torch formula (and every predicate's library check passing): the kernel
    layers' glue — which call, which arguments in which order — runs on any CPU. Returns the calls made."""
    from qwen2.attention import attend
    from qwen2.rope import apply_rotary

    def dequant(w, s=None, z=None, group=0):
        if w.dtype == torch.bfloat16:
            return w
        if w.dtype == torch.int8:
            return (w.float() * s.float()[:, None]).to(torch.bfloat16)
        q = unpack_int4(w).float().reshape(w.shape[0], -1, group)
        return (
            ((q - 8) * s.float()[..., None] + z.float()[..., None]).reshape(w.shape[0], -1).to(torch.bfloat16)
        )

    fakes = {
        "gemv_bf16": lambda x, w, b=None: F.linear(x, w, b),
        "gemv_int8": lambda x, w, s, b=None: F.linear(x, dequant(w, s), b),
        "gemv_int4": lambda x, w, s, z, g, b=None: F.linear(x, dequant(w, s, z, g), b),
        "gemv_glu": lambda x, wg, wu, sg=None, su=None, zg=None, zu=None, g=0: (
            F.silu(F.linear(x, dequant(wg, sg, zg, g))) * F.linear(x, dequant(wu, su, zu, g))
        ),
        "rms_norm": lambda x, w, eps: (
            w * (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, True) + eps)).to(x.dtype)
        ),
        "rotary": lambda x, cos, sin: apply_rotary(x, cos, sin),
        "decode_attention": lambda q, k, v, mask: attend(q, k, v, mask),
    }
    calls = []
    for name, fn in fakes.items():
        monkeypatch.setattr(cpu_kernels, name, lambda *a, fn=fn, name=name: calls.append(name) or fn(*a))
    monkeypatch.setattr(cpu_kernels, "library", lambda: object())
    monkeypatch.setattr(cpu_kernels, "_ready", lambda tensors: all(t.device.type == "cpu" for t in tensors))
    return calls


@pytest.mark.parametrize("bits", [None, 8, 4])
def test_the_kernel_layers_call_each_kernel_with_the_right_arguments(bits, monkeypatch):
    plain = build_model(small_config(), dtype=torch.bfloat16).eval()
    if bits:
        plain = quantize_model(plain, bits=bits)
    ref = decode_logits(plain)
    calls = fake_kernels(monkeypatch)
    fast = decode_logits(install(plain))
    want = {"gemv_glu", "rms_norm", "rotary", "decode_attention"} | {
        None: {"gemv_bf16"},
        8: {"gemv_int8"},
        4: {"gemv_int4"},
    }[bits]
    assert want <= set(calls)
    assert (fast - ref).norm() / ref.norm() < 2e-2  # the same formulas; bf16 roundings in other places only
    assert torch.equal(fast.argmax(-1), ref.argmax(-1))


def paged_pools(blocks, bs, hkv, d, g):
    """One layer's paged pools [blocks, bs, Hkv, d] of bf16 values, the last block (scratch) all NaN."""
    k, v = (rows(blocks * bs * hkv, d, g).view(blocks, bs, hkv, d) for _ in range(2))
    k[-1], v[-1] = float("nan"), float("nan")
    return k, v


@needs_kernels
@pytest.mark.parametrize(
    "hq,hkv,bs,d,lengths",
    [
        (14, 2, 16, 64, [1]),  # one slot
        (14, 2, 16, 64, [16, 17, 32, 100]),  # block boundaries and a tail, one batch mixing lengths
        (6, 2, 5, 128, [4, 5, 6, 23]),  # a block size that is no multiple of 16
        (4, 4, 8, 40, [9, 1, 40]),  # no grouping, d not a multiple of 32
    ],
)
def test_paged_decode_attention_kernel_is_attention_over_the_block_tables(hq, hkv, bs, d, lengths):
    g = torch.Generator().manual_seed(sum(lengths) + bs)
    b, blocks = len(lengths), 40
    kp, vp = paged_pools(blocks + 1, bs, hkv, d, g)
    nb = -(-max(lengths) // bs) + 1  # one more than the longest row needs: padded with the NaN scratch
    tables = torch.full((b, nb), blocks, dtype=torch.long)
    perm = torch.randperm(blocks, generator=g)  # rows hold scattered, distinct blocks
    for i, n in enumerate(lengths):
        used = -(-n // bs)
        tables[i, :used] = perm[i * 8 : i * 8 + used]
    for t in range(nb):  # slots past each row's length (its last block's tail) hold NaN: never read
        for i, n in enumerate(lengths):
            lo = max(n - t * bs, 0)
            if lo < bs and tables[i, t] != blocks:
                kp[tables[i, t], lo:], vp[tables[i, t], lo:] = float("nan"), float("nan")
    q = rows(b * hq, d, g).view(b, hq, 1, d)
    lens = torch.tensor(lengths)
    assert cpu_kernels.paged_decode_attention_ok(q, kp, vp)
    y = cpu_kernels.paged_decode_attention(q, kp, vp, tables, lens)
    assert y.shape == q.shape and torch.isfinite(y).all()
    # the plain PyTorch path: gather the rows' blocks, float64 SDPA masked to each row's length
    k = kp[tables].view(b, nb * bs, hkv, d).transpose(1, 2).double().nan_to_num(0.0)
    v = vp[tables].view(b, nb * bs, hkv, d).transpose(1, 2).double().nan_to_num(0.0)
    mask = (torch.arange(nb * bs) < lens[:, None]).view(b, 1, 1, -1)
    rep = hq // hkv
    ref = F.scaled_dot_product_attention(
        q.double(), k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1), attn_mask=mask
    )
    bound = 2.0**-8 * (v.abs().amax() + ref.abs()) + 1e-6
    assert ((y.double() - ref).abs() <= bound).all()
    # and bit for bit the dense kernel over the gathered copy (a [B, S, Hkv, d] gather seen as [B, Hkv, S, d])
    kg = kp[tables].view(b, nb * bs, hkv, d).nan_to_num(0.0).transpose(1, 2)
    vg = vp[tables].view(b, nb * bs, hkv, d).nan_to_num(0.0).transpose(1, 2)
    assert cpu_kernels.decode_attention_ok(q, kg, vg)
    assert torch.equal(cpu_kernels.decode_attention(q, kg, vg, mask), y)


@needs_kernels
@pytest.mark.parametrize("m", [2, 4, 5, 7, 9])
def test_each_row_of_a_batched_product_is_the_row_alone(m):
    """Batch invariance: activation rows go through the kernels in blocks, each with the one-row sum."""
    g = torch.Generator().manual_seed(m)
    w, wu, x = rows(37, 200, g), rows(37, 200, g), rows(m, 200, g)
    y, glu = cpu_kernels.gemv_bf16(x, w), cpu_kernels.gemv_glu(x, w, wu)
    for i in range(m):
        assert torch.equal(y[i : i + 1], cpu_kernels.gemv_bf16(x[i : i + 1], w))
        assert torch.equal(glu[i : i + 1], cpu_kernels.gemv_glu(x[i : i + 1], w, wu))
