"""Dynamic YaRN: the factor follows the current length, max(1, L / L0): below L0 it is exactly plain RoPE,
at length L it is static YaRN with factor L / L0; keys already computed keep the factor of their time."""

import torch

from qwen2.config import ModelConfig
from qwen2.model import build_model
from qwen2.rope import Rope

L0 = 32


def config(rope_scaling):
    return ModelConfig.preset("tiny").replace(max_position_embeddings=256, rope_scaling=rope_scaling)


DYNAMIC = config({"type": "yarn", "factor": 8.0, "dynamic": True, "original_max_position_embeddings": L0})


def static(factor):
    return config({"type": "yarn", "factor": factor, "original_max_position_embeddings": L0})


def test_below_the_original_length_it_is_plain_rope():
    pos = torch.arange(L0).expand(1, L0)
    for a, b in zip(
        Rope(DYNAMIC).cos_sin(pos, torch.float32), Rope(config(None)).cos_sin(pos, torch.float32)
    ):
        assert torch.equal(a, b)


def test_at_length_l_it_is_static_yarn_with_factor_l_over_l0():
    for length in (48, 64, 100):
        pos = torch.arange(length).expand(1, length)
        ours = Rope(DYNAMIC).cos_sin(pos, torch.float32)
        ref = Rope(static(length / L0)).cos_sin(pos, torch.float32)
        assert all(torch.equal(a, b) for a, b in zip(ours, ref))


def test_model_logits_follow_the_length():
    model = build_model(DYNAMIC, seed=0).eval()
    plain, yarn2 = build_model(config(None), seed=0).eval(), build_model(static(2.0), seed=0).eval()
    ids = torch.randint(0, DYNAMIC.vocab_size, (1, 2 * L0), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(ids[:, :20]), plain(ids[:, :20]))
        assert torch.equal(model(ids), yarn2(ids))
        assert not torch.allclose(model(ids), plain(ids))


def test_a_decode_step_past_l0_uses_the_new_factor_for_its_own_position_only():
    """Keys are rotated once: a step at position p (length p + 1 > L0) rotates its query and key with factor
    (p + 1) / L0, while the keys cached before keep the factor they were computed with."""
    rope = Rope(DYNAMIC)
    p = torch.tensor([[40]])
    step = rope.cos_sin(p, torch.float32)
    ref = Rope(static(41 / L0)).cos_sin(p, torch.float32)
    assert all(torch.equal(a, b) for a, b in zip(step, ref))
    earlier = rope.cos_sin(torch.arange(20).expand(1, 20), torch.float32)  # what the prefill's keys got
    plain = Rope(config(None)).cos_sin(torch.arange(20).expand(1, 20), torch.float32)
    assert all(torch.equal(a, b) for a, b in zip(earlier, plain))
