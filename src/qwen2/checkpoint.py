"""Hugging Face checkpoints: load and save `config.json` + safetensors (one file or index + shards).

Loading reads every shard's header first and checks the whole checkpoint against the config
(missing / unexpected / duplicate tensor names, shapes, missing or truncated shards) before any
tensor is materialised; the model is built on the meta device and the tensors are memory-mapped
and assigned, so a bf16 checkpoint loaded as bf16 costs no copy. Only safetensors are read: a
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
def read_header(file: Path) -> tuple[dict, int]:
    """Parse a safetensors header: ({name: {dtype, shape, data_offsets}}, offset of the data)."""
    size = file.stat().st_size
    with open(file, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{file}: truncated ({size} bytes), not a safetensors file")
        (n,) = struct.unpack("<Q", head)
        if n > min(size - 8, 100_000_000):
            raise CheckpointError(
                f"{file}: corrupt safetensors header (claims {n} header bytes in a {size}-byte file)"
            )
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{file}: corrupt safetensors header ({e})") from None
    header.pop("__metadata__", None)
    end = 0
    for name, info in header.items():
        if not isinstance(info, dict) or info.get("dtype") not in _DTYPES or "data_offsets" not in info:
            raise CheckpointError(f"{file}: corrupt safetensors header entry for {name!r}")
        end = max(end, info["data_offsets"][1])
    if 8 + n + end > size:
        raise CheckpointError(f"{file}: truncated: its header needs {8 + n + end} bytes, the file has {size}")
    return header, 8 + n


def _shard_files(directory: Path) -> list[Path]:
    if (directory / INDEX).is_file():
        index_file = directory / INDEX
        try:
            weight_map = json.loads(index_file.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(
                f"{index_file}: not a valid index (needs a 'weight_map' object): {e}"
            ) from None
        files = sorted(set(weight_map.values()))
        for name in files:
            if not (directory / name).is_file():
                raise CheckpointError(
                    f"{index_file}: names shard {name!r}, which does not exist in {directory}"
                )
        return [directory / f for f in files]
    if (directory / SINGLE).is_file():
        return [directory / SINGLE]
    pickles = [p.name for p in directory.glob("*.bin")] + [p.name for p in directory.glob("*.pt")]
    hint = (
        f" Found {pickles}: pickled weights are not loaded; convert them to safetensors." if pickles else ""
    )
    raise FileNotFoundError(f"{directory}: no {SINGLE} or {INDEX}.{hint}")


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
) -> Qwen2:
    """Load a Hugging Face Qwen2 / Qwen2-MoE checkpoint directory.

    dtype: floating tensors are cast to it (default: config.json's torch_dtype); quantized integer
    tensors keep theirs. Everything is checked before the first tensor is materialised.
    kernels: on CPU, swap in the decode kernels (qwen2.kernels.install); False keeps plain PyTorch layers.
    dual_chunk_attention: add Dual Chunk Attention with ModelConfig.with_dual_chunk_attention's defaults
    when config.json has no dual_chunk_attention_config (a config that has one is used as it is).
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
    files = _shard_files(directory)
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

    headers: dict[str, tuple[Path, dict, int]] = {}
    for file in files:
        header, start = read_header(file)
        for name in header:
            if name in headers:
                raise CheckpointError(f"tensor {name!r} appears twice: in {headers[name][0]} and in {file}")
            headers[name] = (file, header[name], start)
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
