"""CPU kernels for a bf16 / int8 / int4 decode step: matrix-vector products, RMSNorm, RoPE, attention.

One-token decode reads every weight once per token, so it runs at the speed weights stream from
memory. torch's bf16 GEMV and its int8/int4 weight-only kernels stream at well under the machine's
bandwidth (bench/decode.py); cpu_kernels.c, beside this file, streams near it with AVX-512 BF16 and
VNNI. Around those products a decode step is ~60 small torch ops a layer, a few microseconds each
(SDPA's setup ~100 us): rms_norm, rotary and decode_attention do their work in one call each.
The C file is compiled on first use with the machine's C compiler (`cc -O3 -march=native -fopenmp`)
into ~/.cache/qwen2 (or $XDG_CACHE_HOME/qwen2), keyed by the source, the flags and the CPU, then
loaded with ctypes: no build step at install, nothing to download. Where it cannot be built (no compiler,
a CPU without those instructions, not Linux x86-64) or QWEN2_CPU_KERNELS=0 is set, the predicates below
are False and callers keep torch's ops; `status()` says which and why.

Callers: the kernel layers of layers.py, swapped into a model by `qwen2.kernels.install`: the linears
(GEMV, at most MAX_ROWS rows: `usable`), RMSNorm and RoPE (`eager_usable`), attention
(`decode_attention_ok`); never with autograd. Inside torch.compile the GEMVs and the attention are the
ops torch.ops.qwen2.*; RMSNorm and RoPE are left to inductor, which fuses them itself.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch

from qwen2.files import atomic_path

MAX_ROWS = 4  # from 4-5 rows on torch's GEMM and int kernels are as fast (bench: a 4864 x 896 layer, 2 cores)
SOURCE = Path(__file__).with_name("cpu_kernels.c")
FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC"]

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_status: str | None = None


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return platform.processor()


def _cache_dir() -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "qwen2"
    try:
        base.mkdir(parents=True, exist_ok=True)
        return base
    except OSError:
        return Path(tempfile.gettempdir())


def _build() -> tuple[ctypes.CDLL | None, str]:
    if os.environ.get("QWEN2_CPU_KERNELS", "1") == "0":
        return None, "off (QWEN2_CPU_KERNELS=0): torch's kernels"
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        return None, f"not built on {platform.system()} {platform.machine()}: torch's kernels"
    cc = os.environ.get("CC", "cc")
    if shutil.which(cc) is None:
        return None, f"no C compiler ({cc}): torch's kernels"
    key = hashlib.sha256(
        b"\0".join([SOURCE.read_bytes(), " ".join([cc, *FLAGS]).encode(), _cpu_flags().encode()])
    )
    path = _cache_dir() / f"cpu_kernels-{key.hexdigest()[:16]}.so"
    if not path.exists():
        with atomic_path(path) as tmp:
            done = subprocess.run(
                [cc, *FLAGS, str(SOURCE), "-o", str(tmp), "-lm"], capture_output=True, text=True
            )
            if done.returncode:
                first = (done.stderr.strip().splitlines() or ["?"])[0]
                raise OSError(f"{cc} failed: {first}")
    lib = ctypes.CDLL(str(path))
    p, i64, c_int = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    lib.q2_gemv_bf16.argtypes = [p, i64, i64, p, i64, p, p, c_int]
    lib.q2_gemv_int8.argtypes = [p, p, i64, i64, p, i64, p, p, c_int]
    lib.q2_gemv_int4.argtypes = [p, p, p, i64, i64, i64, p, i64, p, p, c_int]
    lib.q2_glu.argtypes = [c_int, p, p, p, p, p, p, i64, i64, i64, p, i64, p, c_int]
    lib.q2_rms_norm.argtypes = [p, p, i64, i64, ctypes.c_float, p]
    lib.q2_rotary.argtypes = [p, p, p, i64, i64, i64, p]
    lib.q2_decode_attention.argtypes = [
        p,
        p,
        p,
        i64,
        i64,
        i64,
        p,
        i64,
        i64,
        i64,
        i64,
        i64,
        ctypes.c_float,
        p,
        c_int,
    ]
    lib.q2_paged_decode_attention.argtypes = [
        p, p, p, p, i64, p, i64, i64, i64, i64, i64, ctypes.c_float, p, c_int
    ]  # fmt: skip
    return lib, f"on ({path})"


def library() -> ctypes.CDLL | None:
    """The built library (built on first call), or None where it cannot be (status() says why)."""
    global _lib, _status
    if _status is None:
        with _lock:
            if _status is None:
                try:
                    _lib, _status = _build()
                except OSError as e:  # a failed compile or load: torch's kernels, and say why
                    _lib, _status = None, f"not available ({e}): torch's kernels"
    return _lib


def status() -> str:
    """One line: whether the kernels are in use, and why not."""
    library()
    return f"qwen2 CPU kernels {_status}"


def _ready(tensors) -> bool:
    """On CPU, no autograd, the library built (built before compiling, so a traced graph only reads it)."""
    if any(t.device.type != "cpu" for t in tensors):
        return False
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return False
    return (_lib if torch.compiler.is_compiling() else library()) is not None


def usable(x: torch.Tensor, *weights: torch.Tensor) -> bool:
    """True when x [..., K] times these weights may go through the GEMV kernels: bf16 activations on CPU,
    at most MAX_ROWS rows, no autograd, and the library built."""
    return x.dtype == torch.bfloat16 and x.numel() <= MAX_ROWS * x.shape[-1] and _ready((x, *weights))


def eager_usable(*tensors: torch.Tensor) -> bool:
    """True when rms_norm / rotary / decode_attention may take these tensors: all bf16 on CPU, no autograd,
    outside torch.compile (they are not torch ops: inductor fuses the small ops they replace itself)."""
    return (
        not torch.compiler.is_compiling()
        and all(t.dtype == torch.bfloat16 for t in tensors)
        and _ready(tensors)
    )


def _bf16_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.dtype == torch.bfloat16 and t.is_contiguous() else t.to(torch.bfloat16).contiguous()


def _call(name: str, x: torch.Tensor, n: int, bias: torch.Tensor | None, *weight_args) -> torch.Tensor:
    """Run kernel `name` on x [..., K] (bf16); weight_args are its pointer and size arguments before x.
    The tensors behind the pointers must stay referenced by the caller until this returns."""
    lib = library()
    if lib is None:
        raise RuntimeError(status())
    x = x if x.is_contiguous() else x.contiguous()
    y = torch.empty(*x.shape[:-1], n, dtype=torch.bfloat16)
    if bias is not None:
        bias = _bf16_contiguous(bias)
    getattr(lib, name)(
        *weight_args,
        x.data_ptr(),
        x.numel() // x.shape[-1],
        None if bias is None else bias.data_ptr(),
        y.data_ptr(),
        torch.get_num_threads(),
    )
    return y


def _bf16(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    n, k = weight.shape
    w = weight.contiguous()
    return _call("q2_gemv_bf16", x, n, bias, w.data_ptr(), n, k)


_KINDS = {torch.bfloat16: 0, torch.int8: 1, torch.uint8: 2}  # q2_glu's `kind`: bf16, int8, packed int4


def _glu(x, w_gate, w_up, s_gate, s_up, z_gate, z_up, group_size: int) -> torch.Tensor:
    kind = _KINDS[w_gate.dtype]
    n, k = w_gate.shape[0], w_gate.shape[1] * (2 if kind == 2 else 1)
    wg, wu, x = w_gate.contiguous(), w_up.contiguous(), x.contiguous()
    sg, zg, su, zu = (None if t is None else _bf16_contiguous(t) for t in (s_gate, z_gate, s_up, z_up))
    y = torch.empty(*x.shape[:-1], n, dtype=torch.bfloat16)
    library().q2_glu(
        kind,
        *(None if t is None else t.data_ptr() for t in (wg, sg, zg, wu, su, zu)),
        group_size,
        n,
        k,
        x.data_ptr(),
        x.numel() // k,
        y.data_ptr(),
        torch.get_num_threads(),
    )
    return y


def _int8(x, weight, scales, bias) -> torch.Tensor:
    n, k = weight.shape
    w, s = weight.contiguous(), _bf16_contiguous(scales)
    return _call("q2_gemv_int8", x, n, bias, w.data_ptr(), s.data_ptr(), n, k)


def _int4(x, weight, scales, zeros, group_size: int, bias) -> torch.Tensor:
    n, k = weight.shape[0], 2 * weight.shape[1]
    w, s, z = weight.contiguous(), _bf16_contiguous(scales), _bf16_contiguous(zeros)
    return _call("q2_gemv_int4", x, n, bias, w.data_ptr(), s.data_ptr(), z.data_ptr(), group_size, n, k)


# The same functions as torch ops, so that a compiled decode step keeps them in its graph (a ctypes
# call would break it). Eager code calls the functions directly: the dispatcher adds ~4 us a call.
_ops = torch.library.Library("qwen2", "DEF")
for _name, _schema, _fn in (
    ("gemv_bf16", "(Tensor x, Tensor weight, Tensor? bias) -> Tensor", _bf16),
    (
        "gemv_glu",
        "(Tensor x, Tensor weight, Tensor w_up, Tensor? s_gate, Tensor? s_up, Tensor? z_gate, Tensor? z_up, "
        "int group_size) -> Tensor",
        _glu,
    ),
    ("gemv_int8", "(Tensor x, Tensor weight, Tensor scales, Tensor? bias) -> Tensor", _int8),
    (
        "gemv_int4",
        "(Tensor x, Tensor weight, Tensor scales, Tensor zeros, int group_size, Tensor? bias) -> Tensor",
        _int4,
    ),
):
    _ops.define(_name + _schema)
    _ops.impl(_name, _fn, "CPU")
    torch.library.register_fake(
        f"qwen2::{_name}", lambda x, weight, *rest: x.new_empty(*x.shape[:-1], weight.shape[0]), lib=_ops
    )


def _run(name: str, fn, *args) -> torch.Tensor:
    return getattr(torch.ops.qwen2, name)(*args) if torch.compiler.is_compiling() else fn(*args)


def gemv_bf16(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] @ weight[N, K]^T + bias, weight bf16."""
    return _run("gemv_bf16", _bf16, x, weight, bias)


def gemv_glu(
    x, w_gate, w_up, s_gate=None, s_up=None, z_gate=None, z_up=None, group_size: int = 0
) -> torch.Tensor:
    """silu(x @ G^T) * (x @ U^T) in one call, G and U of one kind: bf16 weights [N, K], int8 with scales, or
    int4 with scales, zeros and group_size (as gemv_int8 / gemv_int4 take them). Each step is rounded to
    bf16 where torch's ops round: the gate and up products, the silu, the product."""
    return _run("gemv_glu", _glu, x, w_gate, w_up, s_gate, s_up, z_gate, z_up, group_size)


def gemv_int8(x, weight, scales, bias=None) -> torch.Tensor:
    """x @ (weight * scales[:, None])^T + bias; weight int8 [N, K], scales [N]."""
    return _run("gemv_int8", _int8, x, weight, scales, bias)


def int4_shape_ok(in_features: int, group_size: int) -> bool:
    return group_size % 128 == 0 and in_features % group_size == 0


def gemv_int4(x, weight, scales, zeros, group_size: int, bias=None) -> torch.Tensor:
    """x @ W^T + bias for quantize.py's int4 layout: weight uint8 [N, K/2] (column 2j in the low nibble
    of byte j), W[n, k] = (q - 8) * scales[n, g] + zeros[n, g], g = k // group_size."""
    return _run("gemv_int4", _int4, x, weight, scales, zeros, group_size, bias)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Qwen2's RMSNorm of bf16 x [..., K] with a bf16 weight [K], rounded where transformers' rounds."""
    x = x.contiguous()
    y = torch.empty_like(x)
    k = x.shape[-1]
    library().q2_rms_norm(x.data_ptr(), weight.contiguous().data_ptr(), x.numel() // k, k, eps, y.data_ptr())
    return y


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """rope.apply_rotary for one position per row: x [B, H, 1, d], cos / sin [B, 1, d]."""
    b, h, _, d = x.shape
    x, cos, sin = x.contiguous(), cos.contiguous(), sin.contiguous()
    y = torch.empty_like(x)
    library().q2_rotary(x.data_ptr(), cos.data_ptr(), sin.data_ptr(), b, h, d, y.data_ptr())
    return y


def decode_attention_ok(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """True when decode_attention may take these (also inside torch.compile, as an op): bf16 on CPU, no
    autograd, one query per row, k and v alike with each slot's d values contiguous (any batch / head /
    slot strides: the paged cache's gathered [B, S, Hkv, d] seen as [B, Hkv, S, d] too)."""
    return (
        q.dtype == k.dtype == v.dtype == torch.bfloat16
        and q.shape[2] == 1
        and q.shape[1] % k.shape[1] == 0
        and k.shape == v.shape
        and k.stride() == v.stride()
        and k.stride(-1) == 1
        and _ready((q, k, v))
    )


def _decode_attention(q, k, v, mask) -> torch.Tensor:
    b, hq, _, d = q.shape
    q = q.contiguous()
    m = mask.reshape(b, -1).contiguous()
    out = torch.empty_like(q)
    library().q2_decode_attention(
        q.data_ptr(),
        k.data_ptr(),
        v.data_ptr(),
        k.stride(0),
        k.stride(1),
        k.stride(2),
        m.data_ptr(),
        b,
        hq,
        k.shape[1],
        k.shape[2],
        d,
        d**-0.5,
        out.data_ptr(),
        torch.get_num_threads(),
    )
    return out


_ops.define("decode_attention(Tensor q, Tensor k, Tensor v, Tensor mask) -> Tensor")
_ops.impl("decode_attention", _decode_attention, "CPU")
torch.library.register_fake("qwen2::decode_attention", lambda q, k, v, mask: torch.empty_like(q), lib=_ops)


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """SDPA for one query per row: q [B, Hq, 1, d]; k, v [B, Hkv, W, d] (views of a cache: see
    decode_attention_ok); mask [B, 1, 1, W] bool (True: may attend). Query head a reads KV head
    a // (Hq / Hkv)."""
    return _run("decode_attention", _decode_attention, q, k, v, mask)


def paged_decode_attention_ok(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor) -> bool:
    """True when paged_decode_attention may take these: eager, bf16 on CPU, no autograd, one query per row,
    one layer's pools [blocks, block_size, Hkv, d] contiguous and alike."""
    return (
        not torch.compiler.is_compiling()
        and q.dtype == k_pool.dtype == v_pool.dtype == torch.bfloat16
        and q.dim() == 4
        and q.shape[2] == 1
        and k_pool.dim() == 4
        and q.shape[1] % k_pool.shape[2] == 0
        and q.shape[3] == k_pool.shape[3]
        and k_pool.shape == v_pool.shape
        and k_pool.is_contiguous()
        and v_pool.is_contiguous()
        and _ready((q, k_pool, v_pool))
    )


def paged_decode_attention(
    q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, tables: torch.Tensor, lengths: torch.Tensor
) -> torch.Tensor:
    """decode_attention read straight from a paged KV pool, with no gather: q [B, Hq, 1, d]; k_pool, v_pool
    one layer's blocks [blocks, block_size, Hkv, d]; tables [B, nb] int64 block ids; lengths [B] int64, at
    most nb * block_size: row b attends to its slots 0..lengths[b]-1 (slot j at offset j % block_size of
    block tables[b, j // block_size]) and reads nothing past them."""
    b, hq, _, d = q.shape
    _, bs, hkv, _ = k_pool.shape
    q = q.contiguous()
    tables = tables.to(torch.int64).contiguous()
    lengths = lengths.to(torch.int64).contiguous()
    out = torch.empty_like(q)
    library().q2_paged_decode_attention(
        q.data_ptr(),
        k_pool.data_ptr(),
        v_pool.data_ptr(),
        tables.data_ptr(),
        tables.shape[1],
        lengths.data_ptr(),
        b,
        hq,
        hkv,
        bs,
        d,
        d**-0.5,
        out.data_ptr(),
        torch.get_num_threads(),
    )
    return out
