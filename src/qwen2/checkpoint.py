"""Hugging Face checkpoints: load and save `config.json` + safetensors (one file or index + shards).

Loading reads every shard's header first and checks the whole checkpoint against the config
(missing / unexpected / duplicate tensor names, shapes, missing or truncated shards) before any
tensor is materialised. Headers are parsed strictly (read_header, the rules of the safetensors format):
one JSON object of UTF-8 with no repeated key; every entry a known dtype, a shape of non-negative
integers and data_offsets spanning exactly the shape's bytes; the tensors tiling the data area (no
hole, no overlap, nothing after the last one); __metadata__ strings to strings. An index must name
files inside the folder that exist and hold the tensors mapped to them. Each error is one line
naming the file and the tensor, raised before anything is allocated for the tensors. The model is
built on the meta device and the tensors are memory-mapped and assigned, so a bf16 checkpoint loaded
as bf16 costs no copy. Only safetensors are read: a
pickle (`pytorch_model.bin`) is refused, never unpickled.

Saving writes each file under a temporary name, fsyncs it, then renames it: shards, then
config.json, then the index. Saving into a fresh folder (as the training loop does, renaming the
folder when complete) is atomic as a whole; overwriting a checkpoint in place is atomic per file.

A checkpoint's side files (tokenizer files, chat template, generation defaults) are one list,
SIDE_FILES, copied by copy_side_files wherever a checkpoint is derived from another (export, quantize).
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path

import torch

from qwen2.config import ModelConfig
from qwen2.files import atomic_path, atomic_write_text, read_json_object
from qwen2.kernels import install as install_kernels
from qwen2.model import Qwen2
from qwen2.quantize import apply_quantization

SINGLE, INDEX = "model.safetensors", "model.safetensors.index.json"
# Everything of a Hugging Face checkpoint folder that is neither weights nor config.json: the tokenizer in
# each of its layouts (tokenizer.json; vocab.json + merges.txt; qwen.tiktoken), its config and extra
# tokens, the chat template newer transformers save beside the config, and the sampling defaults.
SIDE_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.json",
    "merges.txt",
    "qwen.tiktoken",
    "added_tokens.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "generation_config.json",
)

_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


class CheckpointError(ValueError):
    """A checkpoint on disk does not match what its config.json describes."""


# ---- reading ----------------------------------------------------------------------------------
_MAX_HEADER = 100_000_000  # safetensors' own limit on the header's length


class _DuplicateKey(Exception):
    pass


def _unique_object(pairs: list[tuple[str, object]]) -> dict:
    """json object_pairs_hook: a repeated key is an error (json.loads would keep the last silently)."""
    d = {}
    for k, v in pairs:
        if k in d:
            raise _DuplicateKey(k)
        d[k] = v
    return d


def _parse_json(raw: bytes, where: str) -> object:
    """Strict JSON: UTF-8, no repeated key. CheckpointError naming `where` otherwise."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{where}: not UTF-8 (byte {raw[e.start]:#04x} at offset {e.start})") from None
    try:
        return json.loads(text, object_pairs_hook=_unique_object)
    except _DuplicateKey as e:
        raise CheckpointError(f"{where}: key {e.args[0]!r} appears twice") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{where}: not valid JSON ({e})") from None


def _is_count(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def read_header(file: Path) -> tuple[dict, int]:
    """Parse and check a safetensors header: ({name: {dtype, shape, data_offsets}}, offset of the data).

    Only the 8-byte length and the header are read; every entry is checked against the format (and the
    file's size) so that a tensor is never mapped from bytes that are not its own."""
    file = Path(file)
    size = file.stat().st_size
    with open(file, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{file}: truncated ({size} bytes), not a safetensors file")
        (n,) = struct.unpack("<Q", head)
        if n < 2 or n > size - 8 or n > _MAX_HEADER:
            raise CheckpointError(
                f"{file}: corrupt safetensors header (claims {n} header bytes in a {size}-byte file)"
            )
        raw = f.read(n)
    header = _parse_json(raw, f"{file}: corrupt safetensors header")
    if not isinstance(header, dict):
        raise CheckpointError(
            f"{file}: corrupt safetensors header (a JSON {type(header).__name__}, not an object)"
        )
    meta = header.pop("__metadata__", None)
    if meta is not None and not (
        isinstance(meta, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items())
    ):
        raise CheckpointError(
            f"{file}: corrupt safetensors header (__metadata__ must map strings to strings)"
        )
    spans = []
    for name, info in header.items():
        bad = _bad_entry(info)
        if bad:
            raise CheckpointError(f"{file}: corrupt safetensors header entry for tensor {name!r}: {bad}")
        spans.append((*info["data_offsets"], name))
    spans.sort()
    covered, last = 0, None  # bytes of the data area tiled so far; the tensor that ends there
    for begin, end, name in spans:
        if begin > covered:
            after = f"after tensor {last!r}" if last else "before the first tensor"
            raise CheckpointError(
                f"{file}: corrupt safetensors header: data bytes {covered}..{begin} belong to no tensor "
                f"(a hole {after}, before tensor {name!r})"
            )
        if begin < covered:
            raise CheckpointError(
                f"{file}: corrupt safetensors header: tensor {name!r} (bytes {begin}..{end}) overlaps "
                f"tensor {last!r} (ends at {covered})"
            )
        if end > begin or last is None:  # an empty tensor sits between two others and ends nothing
            last = name
        covered = end
    data = size - 8 - n
    if covered > data:
        raise CheckpointError(
            f"{file}: truncated: its header needs {8 + n + covered} bytes, the file has {size}"
            + (f" (tensor {last!r} is cut off)" if last else "")
        )
    if covered < data:
        raise CheckpointError(
            f"{file}: {data - covered} trailing bytes after the last tensor"
            + (f" ({last!r})" if last else "")
            + "; a safetensors file ends with its last tensor (re-save it)"
        )
    return header, 8 + n


def _bad_entry(info) -> str | None:
    """What is wrong with one header entry (None: nothing)."""
    if not isinstance(info, dict):
        return f"a JSON {type(info).__name__}, not an object"
    dtype = info.get("dtype")
    if dtype not in _DTYPES:
        return f"dtype {dtype!r} is not one of {', '.join(_DTYPES)}"
    shape = info.get("shape")
    if not (isinstance(shape, list) and all(_is_count(d) for d in shape)):
        return f"shape {shape!r} is not a list of non-negative integers"
    offsets = info.get("data_offsets")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(o) for o in offsets)):
        return f"data_offsets {offsets!r} is not [begin, end] of non-negative integers"
    begin, end = offsets
    if begin > end:
        return f"data_offsets {offsets} end before they begin"
    numel = 1
    for d in shape:
        numel *= d
    need = numel * _itemsize(_DTYPES[dtype])
    if end - begin != need:
        return f"data_offsets {offsets} span {end - begin} bytes, its shape {shape} of {dtype} needs {need}"
    return None


def _read_index(directory: Path) -> dict[str, str]:
    """model.safetensors.index.json's weight_map, checked: one object whose weight_map maps tensor
    names to files inside `directory` that exist. The names are checked, not where a file's symlink
    points: the Hugging Face cache links each snapshot's shards to blobs outside the snapshot."""
    index_file = directory / INDEX
    index = _parse_json(index_file.read_bytes(), f"{index_file}")
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict):
        raise CheckpointError(f"{index_file}: not a valid index (needs a 'weight_map' object)")
    root = directory.resolve()
    for name, rel in weight_map.items():
        if not isinstance(rel, str) or not rel:
            raise CheckpointError(f"{index_file}: tensor {name!r} maps to {rel!r}, not a file name")
        if (
            Path(rel).is_absolute()
            or "\\" in rel
            or ".." in Path(rel).parts
            or not (directory / rel).parent.resolve().is_relative_to(root)  # a linked sub-folder
        ):
            raise CheckpointError(
                f"{index_file}: tensor {name!r} maps to {rel!r}, outside {directory}; "
                "an index names files in its own folder"
            )
    for rel in sorted(set(weight_map.values())):
        if not (directory / rel).is_file():
            raise CheckpointError(f"{index_file}: names shard {rel!r}, which does not exist in {directory}")
    return weight_map


def _shard_files(directory: Path) -> tuple[list[Path], dict[str, str] | None]:
    """The weight files and the index's weight_map (None for a single file)."""
    if (directory / INDEX).is_file():
        weight_map = _read_index(directory)
        return [directory / f for f in sorted(set(weight_map.values()))], weight_map
    if (directory / SINGLE).is_file():
        return [directory / SINGLE], None
    pickles = [p.name for p in directory.glob("*.bin")] + [p.name for p in directory.glob("*.pt")]
    hint = (
        f" Found {pickles}: pickled weights are not loaded; convert them to safetensors." if pickles else ""
    )
    raise FileNotFoundError(f"{directory}: no {SINGLE} or {INDEX}.{hint}")


def read_headers(directory: str | os.PathLike) -> dict[str, tuple[Path, dict, int]]:
    """Every tensor of a checkpoint folder, checked and not yet read: {name: (file, header entry, offset
    of the file's data)}. The index (if any) and each file's header are checked (read_header); a name in
    two files, or in another file than the index says, is a CheckpointError. FileNotFoundError when the
    folder has no safetensors (naming any pickles, which are never loaded)."""
    directory = Path(directory)
    files, weight_map = _shard_files(directory)
    headers: dict[str, tuple[Path, dict, int]] = {}
    for file in files:
        header, start = read_header(file)
        for name in header:
            if name in headers:
                raise CheckpointError(f"tensor {name!r} appears twice: in {headers[name][0]} and in {file}")
            headers[name] = (file, header[name], start)
    for name, rel in (weight_map or {}).items():
        if name not in headers or headers[name][0] != directory / rel:
            where = f" (it is in {headers[name][0].name})" if name in headers else ""
            raise CheckpointError(
                f"{directory / INDEX}: maps tensor {name!r} to {rel}, which does not hold it{where}"
            )
    return headers


def _check_finite(name: str, file: Path, t: torch.Tensor, loaded: torch.Tensor) -> None:
    """CheckpointError if `t` (as stored) or `loaded` (cast) holds NaN/Inf; in chunks, not a full mask."""

    def bad(x: torch.Tensor) -> int:
        flat, step = x.reshape(-1), 1 << 22
        return sum(int((~torch.isfinite(flat[i : i + step])).sum()) for i in range(0, flat.numel(), step))

    if n := bad(t):
        raise CheckpointError(f"{file}: tensor {name!r} holds {n} NaN/Inf value(s) of {t.numel()}")
    if loaded.dtype != t.dtype and (n := bad(loaded)):
        raise CheckpointError(
            f"{file}: tensor {name!r} overflows {str(loaded.dtype).removeprefix('torch.')} "
            f"({n} value(s) become Inf); load it as float32 or bfloat16"
        )


def _mmap_tensor(storage: torch.UntypedStorage, data_start: int, info: dict) -> torch.Tensor:
    dtype = _DTYPES[info["dtype"]]
    begin, end = info["data_offsets"]
    shape = info["shape"]
    itemsize = torch.empty((), dtype=dtype).element_size()
    offset = data_start + begin
    if offset % itemsize:  # unaligned: copy the bytes (never happens for files written by safetensors)
        raw = torch.empty(0, dtype=torch.uint8).set_(storage, offset, (end - begin,))
        return raw.clone().view(dtype).reshape(shape)
    return torch.empty(0, dtype=dtype).set_(storage, offset // itemsize, shape)


def load_model(
    path: str | os.PathLike,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    *,
    kernels: bool = True,
    dual_chunk_attention: bool = False,
    check_finite: bool = False,
) -> Qwen2:
    """Load a Hugging Face Qwen2 / Qwen2-MoE checkpoint directory.

    dtype: floating tensors are cast to it (default: config.json's torch_dtype); quantized integer
    tensors keep theirs. Everything is checked before the first tensor is materialised.
    kernels: on CPU, swap in the decode kernels (qwen2.kernels.install); False keeps plain PyTorch layers.
    dual_chunk_attention: add Dual Chunk Attention with ModelConfig.with_dual_chunk_attention's defaults
    when config.json has no dual_chunk_attention_config (a config that has one is used as it is).
    check_finite: read every floating tensor once more and refuse the first that holds NaN or Inf (or
    overflows to Inf when cast to `dtype`), naming it and its file; off by default: it reads all weights.
    """
    directory = Path(path)
    if not directory.is_dir():
        raise FileNotFoundError(
            f"{directory}: not a directory (expected a Hugging Face model folder with config.json)"
        )
    config = ModelConfig.from_json(directory / "config.json")
    if dual_chunk_attention and config.dual_chunk_attention_config is None:
        config = config.with_dual_chunk_attention()
    generation_config = _generation_config(directory)
    headers = read_headers(directory)
    files = sorted({file for file, _, _ in headers.values()})
    if dtype is None:
        dtype = getattr(torch, config.torch_dtype, None)
        if not isinstance(dtype, torch.dtype):
            raise CheckpointError(
                f"{directory / 'config.json'}: torch_dtype {config.torch_dtype!r} is not a torch dtype"
            )

    with torch.device("meta"):
        model = Qwen2(config)
    if config.quantization:
        apply_quantization(model, config.quantization)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}

    if config.tie_word_embeddings:
        headers.pop(
            "lm_head.weight", None
        )  # some exports write the tied copy too; the embedding is the one we use
    elif "lm_head.weight" not in headers and "model.embed_tokens.weight" in headers:
        raise CheckpointError(
            f"{directory}: lm_head.weight is missing and config.json has tie_word_embeddings=false; "
            "set tie_word_embeddings to true if the output layer shares the embedding"
        )
    missing = sorted(set(expected) - set(headers))
    unexpected = sorted(set(headers) - set(expected))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} tensor(s), e.g. {missing[:3]}")
        if unexpected:
            where = headers[unexpected[0]][0]
            parts.append(f"unexpected {len(unexpected)} tensor(s), e.g. {unexpected[:3]} (in {where})")
        raise CheckpointError(f"{directory}: does not match its config.json: " + "; ".join(parts))
    for name, (file, info, _) in headers.items():
        if tuple(info["shape"]) != expected[name]:
            raise CheckpointError(
                f"{file}: tensor {name!r} has shape {list(info['shape'])}, "
                f"but config.json implies {list(expected[name])}"
            )

    storages = {
        f: torch.UntypedStorage.from_file(str(f), shared=False, nbytes=f.stat().st_size) for f in files
    }
    state = {}
    for name, (file, info, start) in headers.items():
        t = _mmap_tensor(storages[file], start, info)
        state[name] = t.to(device=device, dtype=dtype) if t.is_floating_point() else t.to(device)
        if check_finite and t.is_floating_point():
            _check_finite(name, file, t, state[name])
    model.load_state_dict(state, strict=True, assign=True)
    model.generation_config = generation_config  # qwen2.generate's sampling defaults
    if kernels and torch.device(device).type == "cpu":
        install_kernels(model)
    return model.eval()


def _generation_config(directory: Path) -> dict | None:
    """The checkpoint's generation_config.json as a dict (None when it has none)."""
    path = directory / "generation_config.json"
    return read_json_object(path) if path.is_file() else None


# ---- writing ----------------------------------------------------------------------------------
def _parse_size(size: int | str) -> int:
    if isinstance(size, int):
        return size
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    s = size.strip().upper()
    for unit, mult in sorted(units.items(), key=lambda u: -len(u[0])):
        if s.endswith(unit):
            return int(float(s[: -len(unit)]) * mult)
    return int(s)


def _write_safetensors(tensors: dict[str, torch.Tensor], file: Path) -> None:
    from safetensors.torch import save_file

    with atomic_path(file) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt"})


def save_model(model: Qwen2, path: str | os.PathLike, max_shard_size: int | str = "5GB") -> Path:
    """Write `model` as a Hugging Face checkpoint (config.json + safetensors), atomically per file.

    Other files in the folder (tokenizer, generation_config.json) are kept; shards of an earlier
    save that the new index no longer names are removed after the new index is in place.
    """
    directory = Path(path)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    limit = _parse_size(max_shard_size)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in state.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > limit:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    old = {p.name for p in directory.glob("model*.safetensors")}
    float_dtypes = {t.dtype for t in state.values() if t.is_floating_point()}
    config = (
        model.config.replace(torch_dtype=str(next(iter(float_dtypes))).removeprefix("torch."))
        if len(float_dtypes) == 1
        else model.config
    )
    if len(shards) == 1:
        _write_safetensors(shards[0], directory / SINGLE)
        written = {SINGLE}
        config.save(directory)
        (directory / INDEX).unlink(missing_ok=True)
    else:
        names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
        for shard, name in zip(shards, names):
            _write_safetensors(shard, directory / name)
        index = {
            "metadata": {"total_size": sum(t.numel() * t.element_size() for t in state.values())},
            "weight_map": {k: name for shard, name in zip(shards, names) for k in shard},
        }
        config.save(directory)
        atomic_write_text(directory / INDEX, json.dumps(index, indent=2) + "\n")  # the commit point
        written = set(names)
    for stale in old - written:
        (directory / stale).unlink(missing_ok=True)
    return directory


def copy_side_files(src_dir: str | os.PathLike, dst_dir: str | os.PathLike) -> list[str]:
    """Copy each of SIDE_FILES that `src_dir` has into `dst_dir` (each to a temporary name, then renamed);
    returns the names copied, in SIDE_FILES order."""
    src_dir, dst_dir = Path(src_dir), Path(dst_dir)
    dst_dir.mkdir(parents=True, exist_ok=True)
    copied = []
    for name in SIDE_FILES:
        if (src_dir / name).is_file():
            with atomic_path(dst_dir / name) as tmp:
                shutil.copyfile(src_dir / name, tmp)
            copied.append(name)
    return copied
