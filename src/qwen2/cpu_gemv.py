"""Decode-time matrix-vector products on CPU: bf16, int8 and int4 weights times a few bf16 rows.

One-token decode reads every weight once per token, so it runs at the speed weights stream from
memory. torch's bf16 GEMV and its int8/int4 weight-only kernels stream at well under the machine's
bandwidth (bench/decode.py); cpu_gemv.c, beside this file, streams near it with AVX-512 BF16 and
VNNI. It is compiled on first use with the machine's C compiler (`cc -O3 -march=native -fopenmp`)
into ~/.cache/qwen2 (or $XDG_CACHE_HOME/qwen2), keyed by the source, the flags and the CPU, then
loaded with ctypes: no build step at install, nothing to download. Where it cannot be built (no compiler,
a CPU without those instructions, not Linux x86-64) or QWEN2_CPU_GEMV=0 is set, `usable()` is False
and callers keep torch's kernels; `status()` says which and why.

Callers (model.linear, quantize.Int8Linear / Int4Linear) use it for at most MAX_ROWS rows, without
autograd; everything else is torch's. Inside torch.compile the kernels are the ops torch.ops.qwen2.*.
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
SOURCE = Path(__file__).with_name("cpu_gemv.c")
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
    if os.environ.get("QWEN2_CPU_GEMV", "1") == "0":
        return None, "off (QWEN2_CPU_GEMV=0): torch's kernels"
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        return None, f"not built on {platform.system()} {platform.machine()}: torch's kernels"
    cc = os.environ.get("CC", "cc")
    if shutil.which(cc) is None:
        return None, f"no C compiler ({cc}): torch's kernels"
    key = hashlib.sha256(b"\0".join([SOURCE.read_bytes(), " ".join([cc, *FLAGS]).encode(), _cpu_flags().encode()]))
    path = _cache_dir() / f"cpu_gemv-{key.hexdigest()[:16]}.so"
    if not path.exists():
        with atomic_path(path) as tmp:
            done = subprocess.run([cc, *FLAGS, str(SOURCE), "-o", str(tmp), "-lm"], capture_output=True, text=True)
            if done.returncode:
                first = (done.stderr.strip().splitlines() or ["?"])[0]
                raise OSError(f"{cc} failed: {first}")
    lib = ctypes.CDLL(str(path))
    p, i64, c_int = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    lib.q2_gemv_bf16.argtypes = [p, i64, i64, p, i64, p, p, c_int]
    lib.q2_gemv_int8.argtypes = [p, p, i64, i64, p, i64, p, p, c_int]
    lib.q2_gemv_int4.argtypes = [p, p, p, i64, i64, i64, p, i64, p, p, c_int]
    return lib, f"on ({path})"


def _library() -> ctypes.CDLL | None:
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
    _library()
    return f"qwen2 CPU GEMV kernels {_status}"


def usable(x: torch.Tensor, *weights: torch.Tensor) -> bool:
    """True when x [..., K] (and the weights) may go through these kernels: bf16 activations on CPU,
    at most MAX_ROWS rows, no autograd, and the library built (built before compiling, so a traced
    graph only reads the result)."""
    if x.device.type != "cpu" or x.dtype != torch.bfloat16 or x.numel() > MAX_ROWS * x.shape[-1]:
        return False
    if torch.is_grad_enabled() and (x.requires_grad or any(w.requires_grad for w in weights)):
        return False
    return (_lib if torch.compiler.is_compiling() else _library()) is not None


def _bf16_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.dtype == torch.bfloat16 and t.is_contiguous() else t.to(torch.bfloat16).contiguous()


def _call(name: str, x: torch.Tensor, n: int, bias: torch.Tensor | None, *weight_args) -> torch.Tensor:
    """Run kernel `name` on x [..., K] (bf16); weight_args are its pointer and size arguments before x.
    The tensors behind the pointers must stay referenced by the caller until this returns."""
    lib = _library()
    if lib is None:
        raise RuntimeError(status())
    x = x if x.is_contiguous() else x.contiguous()
    y = torch.empty(*x.shape[:-1], n, dtype=torch.bfloat16)
    if bias is not None:
        bias = _bf16_contiguous(bias)
    getattr(lib, name)(*weight_args, x.data_ptr(), x.numel() // x.shape[-1], None if bias is None else bias.data_ptr(),
                       y.data_ptr(), torch.get_num_threads())
    return y


def _bf16(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    n, k = weight.shape
    w = weight.contiguous()
    return _call("q2_gemv_bf16", x, n, bias, w.data_ptr(), n, k)


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
    ("gemv_int8", "(Tensor x, Tensor weight, Tensor scales, Tensor? bias) -> Tensor", _int8),
    ("gemv_int4", "(Tensor x, Tensor weight, Tensor scales, Tensor zeros, int group_size, Tensor? bias) -> Tensor",
     _int4),
):
    _ops.define(_name + _schema)
    _ops.impl(_name, _fn, "CPU")
    torch.library.register_fake(f"qwen2::{_name}",
                                lambda x, weight, *rest: x.new_empty(*x.shape[:-1], weight.shape[0]), lib=_ops)


def _run(name: str, fn, *args) -> torch.Tensor:
    return getattr(torch.ops.qwen2, name)(*args) if torch.compiler.is_compiling() else fn(*args)


def gemv_bf16(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] @ weight[N, K]^T + bias, weight bf16."""
    return _run("gemv_bf16", _bf16, x, weight, bias)


def gemv_int8(x, weight, scales, bias=None) -> torch.Tensor:
    """x @ (weight * scales[:, None])^T + bias; weight int8 [N, K], scales [N]."""
    return _run("gemv_int8", _int8, x, weight, scales, bias)


def int4_shape_ok(in_features: int, group_size: int) -> bool:
    return group_size % 128 == 0 and in_features % group_size == 0


def gemv_int4(x, weight, scales, zeros, group_size: int, bias=None) -> torch.Tensor:
    """x @ W^T + bias for quantize.py's int4 layout: weight uint8 [N, K/2] (column 2j in the low nibble
    of byte j), W[n, k] = (q - 8) * scales[n, g] + zeros[n, g], g = k // group_size."""
    return _run("gemv_int4", _int4, x, weight, scales, zeros, group_size, bias)
