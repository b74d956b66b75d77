"""Our model against transformers' Qwen2 / Qwen2-MoE, through the checkpoint files in both directions."""

import pytest
import torch
import transformers

from hf_reference import hf_model, scaled_config
from qwen2 import load_model, save_model
from qwen2.config import ModelConfig
from qwen2.generation import KVCache

YARN = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}
CASES = {
    "0.5B": {},
    "1.5B": {},
    "7B": {},
    "72B": {},
    "57B-A14B": {},
    "7B-yarn-x4": {"rope_scaling": YARN},
    "57B-A14B-normtopk": {"norm_topk_prob": True},
}


def config_for(case: str) -> ModelConfig:
    base = case.split("-yarn")[0].removesuffix("-normtopk")
    return scaled_config(base, **CASES[case])


def ids(config, b=2, t=96, seed=1):
    return torch.randint(0, config.vocab_size, (b, t), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("case", CASES)
def test_hf_saves_we_load_same_logits_fp32(case, tmp_path):
    config = config_for(case)
    hf = hf_model(config)
    hf.save_pretrained(tmp_path)
    ours = load_model(tmp_path, dtype=torch.float32)
    x = ids(config)  # 96 tokens > original_max_position_embeddings, so YaRN's interpolated dims matter
    with torch.no_grad():
        ref = hf(x).logits
        out = ours(x)
    assert (out - ref).abs().max().item() < 1e-4


@pytest.mark.parametrize("case", ["0.5B", "72B", "57B-A14B"])
def test_we_save_hf_loads_identical_logits(case, tmp_path):
    config = config_for(case)
    hf = hf_model(config, seed=3)
    hf.save_pretrained(tmp_path / "hf")
    ours = load_model(tmp_path / "hf", dtype=torch.float32)
    save_model(ours, tmp_path / "ours", max_shard_size="200KB")  # forces several shards + an index
    assert (tmp_path / "ours" / "model.safetensors.index.json").is_file()
    cls = transformers.Qwen2MoeForCausalLM if config.is_moe else transformers.Qwen2ForCausalLM
    back = cls.from_pretrained(tmp_path / "ours", dtype=torch.float32, attn_implementation="eager").eval()
    x = ids(config)
    with torch.no_grad():
        assert torch.equal(back(x).logits, hf(x).logits)


@pytest.mark.parametrize("case", ["1.5B", "57B-A14B"])
def test_bf16_within_bf16_tolerance(case, tmp_path):
    config = config_for(case)
    hf = hf_model(config)
    hf.save_pretrained(tmp_path)
    ours = load_model(tmp_path, dtype=torch.bfloat16)
    assert ours.model.embed_tokens.weight.dtype == torch.bfloat16
    x = ids(config)
    with torch.no_grad():
        ref = hf(x).logits  # fp32 reference
        out = ours(x).float()
    scale = ref.abs().max().item()
    # bf16 keeps 8 bits of mantissa: errors of a few parts in 100 of the logit range, never more.
    assert (out - ref).abs().max().item() < 0.05 * scale
    assert (out.argmax(-1) == ref.argmax(-1)).float().mean() > 0.9


@pytest.mark.parametrize("case", ["0.5B", "7B-yarn-x4", "57B-A14B"])
def test_cached_decode_equals_full_forward(case):
    from qwen2.model import build_model

    config = config_for(case)
    model = build_model(config, seed=0)
    x = ids(config, b=3, t=40)
    with torch.no_grad():
        full = model(x)
        cache = KVCache(config, batch_size=3, max_len=64)
        steps = [model(x[:, :17], torch.arange(17), cache)]
        for t in range(17, 40):
            steps.append(model(x[:, t : t + 1], torch.full((3, 1), t), cache))
    assert (torch.cat(steps, 1) - full).abs().max().item() < 1e-4


@pytest.mark.slow
def test_real_0_5b_shape_parity(tmp_path):
    """The real Qwen2-0.5B shape (random weights), HF saves -> we load -> same logits."""
    config = ModelConfig.preset("Qwen2-0.5B")
    hf = hf_model(config, std=0.02)
    hf.save_pretrained(tmp_path)
    del hf
    ours = load_model(tmp_path, dtype=torch.float32)
    x = ids(config, b=1, t=64)
    with torch.no_grad():
        out = ours(x)
    del ours
    hf = transformers.Qwen2ForCausalLM.from_pretrained(
        tmp_path, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    with torch.no_grad():
        ref = hf(x).logits
    assert (out - ref).abs().max().item() < 1e-4
