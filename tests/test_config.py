import json

import pytest
import torch
import transformers

from qwen2.cli import main
from qwen2.config import (
    PRESETS,
    ModelConfig,
    kv_cache_bytes_per_token,
    matches_published,
    param_counts,
    published_counts,
)
from qwen2.model import Qwen2


@pytest.mark.parametrize("name", [n for n in PRESETS if published_counts(n)])
def test_preset_parameter_counts_match_published(name):
    assert matches_published(ModelConfig.preset(name), published_counts(name))


@pytest.mark.parametrize("name", ["Qwen2-0.5B", "Qwen2-7B", "Qwen2-57B-A14B", "tiny", "tiny-moe"])
def test_counts_equal_the_built_model(name):
    config = ModelConfig.preset(name)
    with torch.device("meta"):
        model = Qwen2(config)
    assert param_counts(config).total == sum(p.numel() for p in model.parameters())


def test_moe_active_counts_spec():
    c = param_counts(ModelConfig.preset("Qwen2-57B-A14B"))
    assert round(c.active / 1e9, 2) == 14.25 and round((c.active - c.embedding) / 1e9, 2) == 13.16


@pytest.mark.parametrize("name", ["Qwen2-7B", "Qwen2-72B", "Qwen2-57B-A14B", "Qwen2-0.5B-Instruct"])
def test_preset_round_trips_through_transformers_config(name, tmp_path):
    config = ModelConfig.preset(name)
    config.save(tmp_path)
    hf = transformers.AutoConfig.from_pretrained(tmp_path)
    assert hf.model_type == config.model_type
    for field in (
        "vocab_size",
        "hidden_size",
        "num_hidden_layers",
        "num_key_value_heads",
        "tie_word_embeddings",
        "rms_norm_eps",
        "max_position_embeddings",
    ):
        assert getattr(hf, field) == getattr(config, field), field
    hf.save_pretrained(tmp_path / "hf")  # and the file transformers writes back reads as the same config
    again = ModelConfig.from_json(tmp_path / "hf")
    assert again.rope_theta == config.rope_theta and again.num_experts == config.num_experts


def test_real_values():
    assert (
        ModelConfig.preset("Qwen2-7B").vocab_size == 152064
        and ModelConfig.preset("Qwen2-1.5B").vocab_size == 151936
    )
    assert (
        ModelConfig.preset("Qwen2-72B").rms_norm_eps == 1e-5
        and ModelConfig.preset("Qwen2-72B-Instruct").rms_norm_eps == 1e-6
    )
    assert ModelConfig.preset("Qwen2-7B-Instruct").eos_token_id == 151645
    assert ModelConfig.preset("Qwen2-57B-A14B").shared_expert_intermediate_size == 8 * 2560
    assert kv_cache_bytes_per_token(ModelConfig.preset("Qwen2-7B")) == 2 * 28 * 4 * 128 * 2


def test_unknown_keys_kept(tmp_path):
    d = ModelConfig.preset("tiny").to_dict() | {"transformers_version": "4.40.1", "my_note": [1, 2]}
    (tmp_path / "config.json").write_text(json.dumps(d))
    config = ModelConfig.from_json(tmp_path)
    config.save(tmp_path / "out")
    back = json.loads((tmp_path / "out" / "config.json").read_text())
    assert back["my_note"] == [1, 2] and back["transformers_version"] == "4.40.1"


@pytest.mark.parametrize(
    "field,value,msg",
    [
        ("hidden_size", 64.5, "field 'hidden_size' must be int"),
        ("rms_norm_eps", "1e-6", "field 'rms_norm_eps' must be float"),
        ("tie_word_embeddings", "yes", "field 'tie_word_embeddings' must be bool"),
        ("num_key_value_heads", 3, "not a multiple of num_key_value_heads"),
        (
            "rope_scaling",
            {"type": "longrope", "factor": 2.0},
            "rope_scaling type 'longrope' is not supported",
        ),
        ("use_sliding_window", True, "use_sliding_window=true is not supported"),
    ],
)
def test_bad_values_name_the_field(field, value, msg, tmp_path):
    d = ModelConfig.preset("tiny").to_dict() | {field: value}
    (tmp_path / "config.json").write_text(json.dumps(d))
    with pytest.raises(ValueError, match=msg):
        ModelConfig.from_json(tmp_path)


def test_yarn_accepts_both_key_spellings():
    for key in ("type", "rope_type"):
        c = ModelConfig.preset("tiny").replace(
            rope_scaling={key: "yarn", "factor": 4.0, "original_max_position_embeddings": 512}
        )
        assert c.rope_type == "yarn"


def test_info_command_checks_published_counts(capsys):
    assert main(["info", "Qwen2-57B-A14B"]) == 0
    out = capsys.readouterr().out
    assert "active per token" in out and "published counts" in out and ": match" in out


def test_info_on_checkpoint_and_bad_path(tmp_path, capsys):
    ModelConfig.preset("tiny").save(tmp_path)
    assert main(["info", str(tmp_path)]) == 0
    assert (
        "KV cache per token: 256 bytes" in capsys.readouterr().out
    )  # K+V * 2 layers * 2 kv heads * 16 * 2 bytes
    assert main(["info", str(tmp_path / "missing")]) == 2
    assert "neither a checkpoint directory nor a preset" in capsys.readouterr().err
