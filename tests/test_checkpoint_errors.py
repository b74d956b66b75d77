"""Every kind of bad checkpoint gets an error that names the file or tensor, before loading anything."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from qwen2 import load_model, save_model
from qwen2.checkpoint import CheckpointError
from qwen2.config import ModelConfig
from qwen2.model import build_model


@pytest.fixture
def ckpt(tmp_path):
    """A tiny untied checkpoint in two shards (so index cases can be tested)."""
    config = ModelConfig.preset("tiny").replace(tie_word_embeddings=False)
    d = tmp_path / "ckpt"
    save_model(build_model(config), d, max_shard_size="60KB")
    return d


def shards(d):
    return json.loads((d / "model.safetensors.index.json").read_text())["weight_map"]


def rewrite(d, name, fn):
    """Apply fn to the shard holding tensor `name` and write it back (index updated)."""
    file = d / shards(d)[name]
    tensors = load_file(file)
    fn(tensors)
    save_file(tensors, file, metadata={"format": "pt"})
    index = json.loads((d / "model.safetensors.index.json").read_text())
    index["weight_map"] = {k: v for k, v in index["weight_map"].items() if k != name or name in tensors}
    for k in tensors:
        index["weight_map"][k] = file.name
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    return file


def test_round_trip_loads(ckpt):
    model = load_model(ckpt, dtype=torch.float32)
    assert model.lm_head is not None
    assert len(set(shards(ckpt).values())) > 1


def test_missing_tensor_named(ckpt):
    rewrite(ckpt, "model.layers.1.mlp.up_proj.weight", lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"missing 1 tensor.*model\.layers\.1\.mlp\.up_proj\.weight"):
        load_model(ckpt)


def test_unknown_tensor_named_with_its_file(ckpt):
    name = "model.layers.0.mlp.up_proj.weight"
    file = rewrite(ckpt, name, lambda t: t.update({"model.layers.0.mlp.mystery": torch.zeros(3)}))
    with pytest.raises(CheckpointError, match=rf"unexpected 1 tensor.*mystery.*{file.name}"):
        load_model(ckpt)


def test_duplicate_tensor_names_both_files(ckpt):
    files = sorted(set(shards(ckpt).values()))
    a, b = load_file(ckpt / files[0]), load_file(ckpt / files[1])
    dup = next(iter(a))
    b[dup] = a[dup]
    save_file(b, ckpt / files[1], metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=rf"{dup}.*twice.*{files[0]}.*{files[1]}"):
        load_model(ckpt)


def test_shape_mismatch_names_both_shapes(ckpt):
    name = "model.layers.0.self_attn.k_proj.weight"
    rewrite(ckpt, name, lambda t: t.update({name: torch.zeros(8, 64)}))
    with pytest.raises(CheckpointError, match=rf"{name}.*\[8, 64\].*config.json implies \[32, 64\]"):
        load_model(ckpt)


def test_missing_shard_named(ckpt):
    victim = sorted(set(shards(ckpt).values()))[-1]
    (ckpt / victim).unlink()
    with pytest.raises(CheckpointError, match=rf"names shard '{victim}', which does not exist"):
        load_model(ckpt)


def test_truncated_file(ckpt):
    file = ckpt / sorted(set(shards(ckpt).values()))[0]
    data = file.read_bytes()
    file.write_bytes(data[: len(data) - 100])
    with pytest.raises(CheckpointError, match=rf"{file.name}: truncated"):
        load_model(ckpt)


def test_corrupt_header(ckpt):
    file = ckpt / sorted(set(shards(ckpt).values()))[0]
    data = bytearray(file.read_bytes())
    data[8:20] = b"#garbage####"
    file.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=rf"{file.name}: corrupt safetensors header"):
        load_model(ckpt)


def test_unknown_model_type(ckpt):
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["model_type"] = "llama"
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"config.json: model_type 'llama' is not a Qwen2 model"):
        load_model(ckpt)


def test_lm_head_missing_without_tied_embeddings(ckpt):
    rewrite(ckpt, "lm_head.weight", lambda t: t.pop("lm_head.weight"))
    with pytest.raises(
        CheckpointError, match=r"lm_head.weight is missing and config.json has tie_word_embeddings=false"
    ):
        load_model(ckpt)


def test_wrong_type_in_config_names_the_field(ckpt):
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["num_hidden_layers"] = "2"
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"config.json: field 'num_hidden_layers' must be int, got '2'"):
        load_model(ckpt)


def test_pickle_refused_not_loaded(tmp_path):
    d = tmp_path / "pickled"
    d.mkdir()
    ModelConfig.preset("tiny").save(d)
    (d / "pytorch_model.bin").write_bytes(b"not to be unpickled")
    with pytest.raises(FileNotFoundError, match=r"pytorch_model.bin.*convert them to safetensors"):
        load_model(d)


def test_missing_directory_and_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a directory"):
        load_model(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_model(tmp_path)


def test_tied_checkpoint_has_no_lm_head_and_tolerates_one(tmp_path):
    config = ModelConfig.preset("tiny")
    model = build_model(config)
    save_model(model, tmp_path)
    assert "lm_head.weight" not in load_file(tmp_path / "model.safetensors")
    tensors = load_file(tmp_path / "model.safetensors")
    tensors["lm_head.weight"] = tensors[
        "model.embed_tokens.weight"
    ].clone()  # some exports write the tied copy
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    x = torch.randint(0, config.vocab_size, (1, 9))
    assert torch.equal(load_model(tmp_path, dtype=torch.float32)(x), model(x))


def test_resave_with_fewer_shards_removes_stale_ones(ckpt):
    model = load_model(ckpt, dtype=torch.float32)
    save_model(model, ckpt)  # one file now
    assert sorted(p.name for p in ckpt.glob("model*")) == ["model.safetensors"]
    assert torch.equal(load_model(ckpt, dtype=torch.float32).lm_head.weight, model.lm_head.weight)


def test_bf16_load_is_memory_mapped(tmp_path):
    model = build_model(ModelConfig.preset("tiny"), dtype=torch.bfloat16)
    save_model(model, tmp_path)
    loaded = load_model(tmp_path)  # torch_dtype bfloat16 from config.json
    w = loaded.model.embed_tokens.weight
    assert w.dtype == torch.bfloat16 and torch.equal(w, model.model.embed_tokens.weight)
    # The tensor's storage is the file mapping itself (no copy): it spans the whole file.
    assert w.untyped_storage().nbytes() == (tmp_path / "model.safetensors").stat().st_size


def test_generation_config_is_attached_and_a_bad_one_is_named(ckpt):
    assert load_model(ckpt).generation_config is None
    (ckpt / "generation_config.json").write_text(json.dumps({"do_sample": True, "top_k": 20}))
    assert load_model(ckpt).generation_config == {"do_sample": True, "top_k": 20}  # generate()'s defaults
    for text in ("{not json", "[1, 2]"):
        (ckpt / "generation_config.json").write_text(text)
        with pytest.raises(ValueError, match="generation_config.json"):
            load_model(ckpt)
