"""Strict reading of checkpoints: every malformed safetensors header, index or config.json is refused in one
line naming the file (and the tensor or field) before anything is loaded; weights get the permissions
the JSON beside them gets."""

import json
import os
import struct

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from qwen2 import load_model, save_model
from qwen2.checkpoint import CheckpointError, read_header
from qwen2.config import ModelConfig
from qwen2.model import build_model

INDEX = "model.safetensors.index.json"


@pytest.fixture
def single(tmp_path):
    """A tiny checkpoint in one file (fp32)."""
    d = tmp_path / "single"
    save_model(build_model(ModelConfig.preset("tiny"), dtype=torch.float32), d)
    return d


@pytest.fixture
def sharded(tmp_path):
    """A tiny untied checkpoint in several shards."""
    d = tmp_path / "sharded"
    save_model(
        build_model(ModelConfig.preset("tiny").replace(tie_word_embeddings=False)), d, max_shard_size="60KB"
    )
    return d


def split(file):
    """(header dict, header bytes, data bytes) of a safetensors file."""
    raw = file.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 : 8 + n], raw[8 + n :]


def write(file, header, data: bytes, length: int | None = None):
    """Write a safetensors file by hand: `header` as a dict or raw bytes; `length` overrides the length."""
    hb = header if isinstance(header, bytes) else json.dumps(header).encode()
    file.write_bytes(struct.pack("<Q", len(hb) if length is None else length) + hb + data)


def by_offset(header):
    """Tensor names in the order of their data (the last one ends the file)."""
    return sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"])


# ---- safetensors headers: one case per way a header can lie ------------------------------------------
def _trailing(h, data):
    return h, data + b"\0" * 8, r"8 trailing bytes after the last tensor"


def _hole(h, data):
    last = by_offset(h)[-1]
    b, e = h[last]["data_offsets"]
    h[last]["data_offsets"] = [b + 4, e + 4]
    return h, data + b"\0" * 4, rf"data bytes {b}..{b + 4} belong to no tensor.*before tensor '{last}'"


def _hole_at_start(h, data):
    for k in by_offset(h):
        b, e = h[k]["data_offsets"]
        h[k]["data_offsets"] = [b + 8, e + 8]
    return h, b"\0" * 8 + data, r"data bytes 0..8 belong to no tensor \(a hole before the first tensor"


def _overlap(h, data):
    names = by_offset(h)
    last, prev = names[-1], names[-2]
    b, e = h[last]["data_offsets"]
    h[last]["data_offsets"] = [b - 4, e - 4]
    return h, data[:-4], rf"tensor '{last}' \(bytes {b - 4}\.\.{e - 4}\) overlaps tensor '{prev}'"


def _duplicate_key(h, data):
    name = by_offset(h)[0]
    text = json.dumps(h)
    return (
        (text[:-1] + f', "{name}": ' + json.dumps(h[name]) + "}").encode(),
        data,
        rf"key '{name}' appears twice",
    )


def _negative_offset(h, data):
    name = by_offset(h)[0]
    h[name]["data_offsets"][0] = -1
    return h, data, rf"entry for tensor '{name}': data_offsets \[-1, .*non-negative integers"


def _begin_after_end(h, data):
    name = by_offset(h)[1]
    b, e = h[name]["data_offsets"]
    h[name]["data_offsets"] = [e, b]
    return h, data, rf"entry for tensor '{name}': data_offsets \[{e}, {b}\] end before they begin"


def _wrong_length(h, data):
    name = next(k for k in by_offset(h) if len(h[k]["shape"]) == 2)
    rows, cols = h[name]["shape"]
    h[name]["shape"] = [rows, cols - 1]  # the offsets still span the old shape's bytes
    return (
        h,
        data,
        rf"entry for tensor '{name}': data_offsets .* span {rows * cols * 4} bytes"
        rf".* needs {rows * (cols - 1) * 4}",
    )


def _negative_dim(h, data):
    name = by_offset(h)[0]
    h[name]["shape"] = [-1] + h[name]["shape"][1:]
    return h, data, rf"entry for tensor '{name}': shape \[-1.*not a list of non-negative integers"


def _bad_dtype(h, data):
    name = by_offset(h)[0]
    h[name]["dtype"] = "Q4_K"
    return h, data, rf"entry for tensor '{name}': dtype 'Q4_K' is not one of F64, F32"


def _entry_not_object(h, data):
    name = by_offset(h)[0]
    h[name] = [1, 2]
    return h, data, rf"entry for tensor '{name}': a JSON list, not an object"


def _not_object(h, data):
    return b"[1, 2, 3]", data, r"corrupt safetensors header \(a JSON list, not an object\)"


def _not_utf8(h, data):
    hb = json.dumps(h).encode()
    i = hb.index(b'"', 2) + 1  # inside the first tensor's name
    return hb[:i] + b"\xff" + hb[i + 1 :], data, r"corrupt safetensors header: not UTF-8 \(byte 0xff"


def _bad_metadata(h, data):
    h["__metadata__"] = {"format": 1}
    return h, data, r"__metadata__ must map strings to strings"


def _invalid_json(h, data):
    return b"{" + json.dumps(h).encode()[1:-1] + b",}", data, r"corrupt safetensors header: not valid JSON"


CASES = {
    "trailing bytes": _trailing,
    "hole": _hole,
    "hole at the start": _hole_at_start,
    "overlap": _overlap,
    "duplicate key": _duplicate_key,
    "negative offset": _negative_offset,
    "begin after end": _begin_after_end,
    "wrong length": _wrong_length,
    "negative dimension": _negative_dim,
    "bad dtype": _bad_dtype,
    "entry not an object": _entry_not_object,
    "header not an object": _not_object,
    "header not UTF-8": _not_utf8,
    "metadata not str->str": _bad_metadata,
    "invalid JSON": _invalid_json,
}


@pytest.mark.parametrize("case", list(CASES))
def test_malformed_header_refused_naming_file_and_tensor(single, case):
    file = single / "model.safetensors"
    header, _, data = split(file)
    header, data, msg = CASES[case](header, data)
    write(file, header, data)
    with pytest.raises(CheckpointError, match=rf"{file}: .*{msg}") as e:
        load_model(single)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("length", ["beyond the file", "huge", "zero"])
def test_header_length_beyond_file(single, length):
    file = single / "model.safetensors"
    _, hb, data = split(file)
    n = {"beyond the file": len(hb) + len(data) + 1, "huge": 2**63, "zero": 0}[length]
    write(file, hb, data, length=n)
    with pytest.raises(
        CheckpointError, match=rf"{file}: corrupt safetensors header \(claims {n} header bytes"
    ):
        load_model(single)


def test_valid_files_with_empty_tensors_and_metadata_read(tmp_path):
    """What safetensors itself writes (empty tensors, padding, metadata) passes the strict reader."""
    file = tmp_path / "x.safetensors"
    save_file(
        {
            "a": torch.zeros(0),
            "b": torch.ones(3, dtype=torch.bfloat16),
            "c": torch.zeros(2, 0),
            "d": torch.ones(1),
        },
        file,
        metadata={"format": "pt", "note": "x"},
    )
    header, start = read_header(file)
    assert sorted(header) == ["a", "b", "c", "d"] and start % 8 == 0


# ---- index files -------------------------------------------------------------------------------------
def edit_index(d, fn):
    index = json.loads((d / INDEX).read_text())
    fn(index)
    (d / INDEX).write_text(json.dumps(index))


@pytest.mark.parametrize(
    "target", ["../../x.safetensors", "../sharded/model-00001-of-00003.safetensors", "/etc/passwd"]
)
def test_index_path_outside_the_folder(sharded, target):
    name = "model.layers.0.mlp.up_proj.weight"
    edit_index(sharded, lambda ix: ix["weight_map"].update({name: target}))
    with pytest.raises(CheckpointError, match=rf"{INDEX}: tensor '{name}' maps to '{target}', outside"):
        load_model(sharded)


def test_shards_linked_like_the_hugging_face_cache_load(sharded, tmp_path):
    """A snapshot's shards are symlinks to blobs outside the snapshot folder: that is not an escape."""
    blobs, snapshot = tmp_path / "blobs", tmp_path / "snapshots" / "abc"
    blobs.mkdir()
    snapshot.mkdir(parents=True)
    for f in sharded.iterdir():
        (blobs / f.name).write_bytes(f.read_bytes())
        (snapshot / f.name).symlink_to(os.path.relpath(blobs / f.name, snapshot))
    a, b = load_model(sharded, dtype=torch.float32), load_model(snapshot, dtype=torch.float32)
    assert torch.equal(a.lm_head.weight, b.lm_head.weight)


def test_index_names_a_missing_file(sharded):
    edit_index(sharded, lambda ix: ix["weight_map"].update({"model.norm.weight": "model-nope.safetensors"}))
    with pytest.raises(CheckpointError, match=r"names shard 'model-nope.safetensors', which does not exist"):
        load_model(sharded)


def test_index_maps_a_tensor_to_a_file_without_it(sharded):
    wm = json.loads((sharded / INDEX).read_text())["weight_map"]
    name = "model.norm.weight"
    other = next(f for f in sorted(set(wm.values())) if f != wm[name])
    edit_index(sharded, lambda ix: ix["weight_map"].update({name: other}))
    with pytest.raises(
        CheckpointError,
        match=rf"maps tensor '{name}' to {other}, which does not hold it \(it is in {wm[name]}\)",
    ):
        load_model(sharded)


def test_index_naming_a_tensor_no_file_has(sharded):
    first = sorted(set(json.loads((sharded / INDEX).read_text())["weight_map"].values()))[0]
    edit_index(sharded, lambda ix: ix["weight_map"].update({"model.ghost": first}))
    with pytest.raises(
        CheckpointError, match=rf"maps tensor 'model.ghost' to {first}, which does not hold it"
    ):
        load_model(sharded)


@pytest.mark.parametrize(
    "text,msg",
    [
        ("[]", "not a valid index"),
        ('{"weight_map": ["a"]}', "not a valid index"),
        ('{"weight_map": {"a": "x", "a": "y"}}', "key 'a' appears twice"),
        ('{"weight_map": {"a": 3}}', "tensor 'a' maps to 3, not a file name"),
        ('{"weight_map": {', "not valid JSON"),
    ],
)
def test_index_not_a_weight_map(sharded, text, msg):
    (sharded / INDEX).write_text(text)
    with pytest.raises(CheckpointError, match=rf"{INDEX}: {msg}"):
        load_model(sharded)


# ---- non-finite values ---------------------------------------------------------------------------------
def test_check_finite_names_the_nan_tensor(single):
    file = single / "model.safetensors"
    tensors = load_file(file)
    name = "model.layers.1.self_attn.v_proj.weight"
    tensors[name][3, 5] = float("nan")
    tensors["model.norm.weight"][0] = float("inf")  # later in the file: the first bad one is named
    save_file(tensors, file, metadata={"format": "pt"})
    load_model(single)  # off by default: loading does not read every value
    with pytest.raises(CheckpointError, match=rf"{file}: tensor '{name}' holds 1 NaN/Inf value\(s\)"):
        load_model(single, check_finite=True)


def test_check_finite_names_an_overflow_from_the_cast(single):
    file = single / "model.safetensors"
    tensors = load_file(file)
    tensors["model.norm.weight"][0] = 1e6  # finite in float32, Inf in float16
    save_file(tensors, file, metadata={"format": "pt"})
    load_model(single, dtype=torch.float32, check_finite=True)
    with pytest.raises(CheckpointError, match=r"tensor 'model.norm.weight' overflows float16"):
        load_model(single, dtype=torch.float16, check_finite=True)


# ---- config.json ---------------------------------------------------------------------------------------
def test_config_missing_hidden_size_is_refused(tmp_path):
    d = ModelConfig.preset("tiny").to_dict()
    del d["hidden_size"], d["vocab_size"]
    (tmp_path / "config.json").write_text(json.dumps(d))
    with pytest.raises(
        ValueError, match=rf"{tmp_path / 'config.json'}: field 'hidden_size' is missing \(and 'vocab_size'\)"
    ):
        ModelConfig.from_json(tmp_path)


@pytest.mark.parametrize("theta", [0, -10000.0])
def test_rope_theta_not_positive_is_refused(tmp_path, theta):
    (tmp_path / "config.json").write_text(
        json.dumps(ModelConfig.preset("tiny").to_dict() | {"rope_theta": theta})
    )
    with pytest.raises(ValueError, match=r"config.json: field 'rope_theta' must be positive"):
        ModelConfig.from_json(tmp_path)
    with pytest.raises(ValueError, match=r"'rope_theta' must be positive"):
        ModelConfig.preset("tiny").replace(rope_theta=0.0)


def test_config_not_utf8_or_not_json_named(tmp_path):
    path = tmp_path / "config.json"
    path.write_bytes(
        json.dumps(ModelConfig.preset("tiny").to_dict()).encode().replace(b"qwen2", b"qw\xe9n2", 1)
    )
    with pytest.raises(ValueError, match=rf"{path}: not UTF-8 text \(byte 0xe9 at offset \d+\)"):
        ModelConfig.from_json(tmp_path)
    path.write_text('{"hidden_size": 64,')
    with pytest.raises(ValueError, match=rf"{path}: not valid JSON"):
        ModelConfig.from_json(tmp_path)


@pytest.mark.parametrize(
    "keys,expected",
    [
        ({"dtype": "float16"}, "float16"),  # transformers 5
        ({"torch_dtype": "float16"}, "float16"),  # older files
        ({"dtype": "float16", "torch_dtype": "float32"}, "float16"),  # both: dtype wins, as in transformers
        ({}, "bfloat16"),
    ],
)
def test_dtype_read_from_dtype_or_torch_dtype(tmp_path, keys, expected):
    d = {k: v for k, v in ModelConfig.preset("tiny").to_dict().items() if k not in ("dtype", "torch_dtype")}
    (tmp_path / "config.json").write_text(json.dumps(d | keys))
    config = ModelConfig.from_json(tmp_path)
    assert config.torch_dtype == expected and "dtype" not in config.extra


def test_dtype_written_under_both_names_and_read_by_transformers(tmp_path):
    ModelConfig.preset("tiny").replace(torch_dtype="float16").save(tmp_path)
    written = json.loads((tmp_path / "config.json").read_text())
    assert written["dtype"] == written["torch_dtype"] == "float16"
    assert transformers.AutoConfig.from_pretrained(tmp_path).dtype == torch.float16
    hf_dir = tmp_path / "hf"  # and what transformers 5 writes ("dtype" only) reads back
    transformers.AutoConfig.from_pretrained(tmp_path).save_pretrained(hf_dir)
    assert "dtype" in json.loads((hf_dir / "config.json").read_text())
    assert ModelConfig.from_json(hf_dir).torch_dtype == "float16"


def test_load_model_uses_config_dtype_key(single):
    cfg = json.loads((single / "config.json").read_text())
    cfg.pop("torch_dtype")
    cfg["dtype"] = "float16"
    (single / "config.json").write_text(json.dumps(cfg))
    assert load_model(single).model.norm.weight.dtype == torch.float16


def test_presets_still_build():
    for name in ("tiny", "tiny-moe", "Qwen2-7B", "Qwen2-57B-A14B", "Qwen2-72B-Instruct-YaRN"):
        c = ModelConfig.preset(name)
        back = ModelConfig.from_dict(c.to_dict())
        assert back.replace(extra={}) == c and back.extra == {"architectures": c.to_dict()["architectures"]}


# ---- permissions ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("umask", [0o022, 0o027, 0o002])
def test_weights_get_the_permissions_of_the_json_beside_them(tmp_path, umask):
    old = os.umask(umask)
    try:
        single = tmp_path / "one"
        save_model(build_model(ModelConfig.preset("tiny")), single)
        shards = tmp_path / "shards"
        save_model(build_model(ModelConfig.preset("tiny")), shards, max_shard_size="60KB")
    finally:
        os.umask(old)

    def mode(p):
        return p.stat().st_mode & 0o777

    want = 0o666 & ~umask
    assert mode(single / "config.json") == want
    assert mode(single / "model.safetensors") == want
    assert {mode(p) for p in shards.glob("*.safetensors")} == {want}
    assert mode(shards / INDEX) == want
