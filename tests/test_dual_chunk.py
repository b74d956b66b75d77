"""Dual Chunk Attention (paper 2.2.2, SPEC 3): equal to full causal attention within one chunk, and beyond
it equal to a naive reference written here: the full [T, T] score matrix assembled from the three query
copies at SPEC 3.2's remapped positions, one softmax. Gradients agree with the reference too."""

import pytest
import torch

from qwen2.attention import attend, dual_chunk_attend
from qwen2.rope import apply_rotary, dual_chunk_positions, rope_cos_sin

D, HQ, HKV = 16, 4, 2


def rotate(x, positions, inv_freq):
    cos, sin = rope_cos_sin(inv_freq, positions, 1.0, x.dtype)
    return apply_rotary(x, cos, sin)


def inputs(b, t, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, HQ, t, D, generator=g, dtype=dtype)
    k = torch.randn(b, HKV, t, D, generator=g, dtype=dtype)
    v = torch.randn(b, HKV, t, D, generator=g, dtype=dtype)
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, D, 2, dtype=torch.float64) / D))
    return q, k, v, inv_freq


def rotated(q, k, positions, inv_freq, chunk, local):
    kp, qi, qs, qe = dual_chunk_positions(positions, chunk, local)
    return (
        rotate(q, qi, inv_freq),
        rotate(q, qs, inv_freq),
        rotate(q, qe, inv_freq),
        rotate(k, kp, inv_freq),
    )


def naive(q, k, v, positions, inv_freq, chunk, local):
    """One softmax over scores chosen per (query, key) pair from the three rotated query copies."""
    lc = chunk - local
    qi, qs, qe, kr = rotated(q, k, positions, inv_freq, chunk, local)
    kr, vr = kr.repeat_interleave(HQ // HKV, 1), v.repeat_interleave(HQ // HKV, 1)
    s_i, s_s, s_e = (x @ kr.transpose(-1, -2) / D**0.5 for x in (qi, qs, qe))
    t = k.shape[2]
    p, j = positions[:, None, :, None], torch.arange(t)[None, None, None, :]
    cq, ck = p // lc, j // lc
    scores = torch.where(ck == cq, s_i, torch.where(ck == cq - 1, s_s, s_e))
    scores = scores.masked_fill(j > p, float("-inf"))
    return torch.softmax(scores, -1) @ vr


@pytest.mark.parametrize("t", [1, 5, 24])
def test_within_one_chunk_it_is_full_causal_attention(t):
    chunk, local = 32, 8  # Lc = 24: up to 24 tokens fit in one chunk
    q, k, v, inv_freq = inputs(2, t, dtype=torch.float32)
    pos = torch.arange(t).expand(2, t)
    qi, qs, qe, kr = rotated(q, k, pos, inv_freq, chunk, local)
    full = attend(rotate(q, pos, inv_freq), rotate(k, pos, inv_freq), v)
    ours = dual_chunk_attend(qi, qs, qe, kr, v, pos, chunk - local)
    assert (ours - full).abs().max() <= 1e-5


@pytest.mark.parametrize("chunks,tail", [(1, 0), (2, 0), (3, 0), (10, 0), (2, 5), (3, 11), (10, 7)])
@pytest.mark.parametrize("block", [1024, 7])
def test_prefill_beyond_one_chunk_equals_the_naive_reference(chunks, tail, block):
    chunk, local = 12, 4
    t = chunks * (chunk - local) + tail
    q, k, v, inv_freq = inputs(2, t, seed=chunks + tail)
    pos = torch.arange(t).expand(2, t)
    ours = dual_chunk_attend(*rotated(q, k, pos, inv_freq, chunk, local), v, pos, chunk - local, block=block)
    assert (ours - naive(q, k, v, pos, inv_freq, chunk, local)).abs().max() <= 1e-10


@pytest.mark.parametrize("chunks,tail", [(1, 0), (3, 0), (10, 7)])
@pytest.mark.parametrize("block", [1024, 5])
def test_the_fused_inference_path_equals_the_naive_reference(chunks, tail, block):
    """fp32 / bf16 without gradients take torch's flash kernel per key range (a different computation
    from the fp64 matmul form above): the same attention, to fp32 rounding, and bf16 to bf16's."""
    chunk, local = 12, 4
    t = chunks * (chunk - local) + tail
    q, k, v, inv_freq = inputs(2, t, seed=chunks + tail)
    pos = torch.arange(t).expand(2, t)
    ref = naive(q, k, v, pos, inv_freq, chunk, local)
    parts = [x.float() for x in rotated(q, k, pos, inv_freq, chunk, local)]
    ours = dual_chunk_attend(*parts, v.float(), pos, chunk - local, block=block)
    assert (ours.double() - ref).abs().max() <= 1e-5
    half = dual_chunk_attend(*[x.bfloat16() for x in parts], v.bfloat16(), pos, chunk - local, block=block)
    assert half.dtype == torch.bfloat16 and (half.double() - ref).abs().max() <= 0.05
    # one new query at the end (decode) against the whole cache
    last = [x[:, :, -1:] for x in parts[:3]]
    step = dual_chunk_attend(*last, parts[3], v.float(), pos[:, -1:], chunk - local)
    assert (step.double() - ref[:, :, -1:]).abs().max() <= 1e-5


def test_decode_rows_at_different_positions_equal_the_reference():
    chunk, local, t = 12, 4, 50
    q, k, v, inv_freq = inputs(3, t, seed=3)
    ref = naive(q, k, v, torch.arange(t).expand(3, t), inv_freq, chunk, local)
    last = torch.tensor(
        [49, 23, 8]
    )  # one query per row, each at its own position, cache slots past it invalid
    pos = last[:, None]
    q_rows = torch.stack([q[r, :, last[r]] for r in range(3)])[:, :, None]  # [3, HQ, 1, D]
    qi, qs, qe, _ = rotated(q_rows, k, pos, inv_freq, chunk, local)
    kr = rotate(k, dual_chunk_positions(torch.arange(t).expand(3, t), chunk, local)[0], inv_freq)  # the cache
    valid = torch.arange(t)[None] <= last[:, None]
    ours = dual_chunk_attend(qi, qs, qe, kr, v, pos, chunk - local, valid=valid)
    for r in range(3):
        assert (ours[r, :, 0] - ref[r, :, last[r]]).abs().max() <= 1e-10


def test_gradients_flow_and_equal_the_reference():
    chunk, local, t = 12, 4, 30
    q, k, v, inv_freq = inputs(1, t, seed=5)
    pos = torch.arange(t).expand(1, t)
    grads = []
    for fn in ("ours", "naive"):
        qq, kk, vv = (x.clone().requires_grad_() for x in (q, k, v))
        if fn == "ours":
            out = dual_chunk_attend(
                *rotated(qq, kk, pos, inv_freq, chunk, local), vv, pos, chunk - local, block=8
            )
        else:
            out = naive(qq, kk, vv, pos, inv_freq, chunk, local)
        (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
        grads.append([x.grad for x in (qq, kk, vv)])
    for a, b in zip(*grads):
        assert (a - b).abs().max() <= 1e-10


# ---- in the model: the static cache (generate) and the paged cache (engine) -----------------------------
def dca_model(chunk, local, l0=0, layers=2):
    from qwen2.config import ModelConfig
    from qwen2.model import build_model

    base = ModelConfig.preset("tiny").replace(num_hidden_layers=layers, max_position_embeddings=512)
    dca = base.replace(
        dual_chunk_attention_config={
            "chunk_size": chunk,
            "local_size": local,
            "original_max_position_embeddings": l0,
        }
    )
    return build_model(base, seed=0).eval(), build_model(dca, seed=0).eval()


def ids(n, seed=0):
    return torch.randint(0, 200, (1, n), generator=torch.Generator().manual_seed(seed))


def test_a_dca_model_within_one_chunk_equals_the_plain_model():
    plain, dca = dca_model(chunk=48, local=8)  # Lc = 40
    x = ids(40)
    with torch.no_grad():
        assert (dca(x) - plain(x)).abs().max() <= 1e-5
    from qwen2.generation import generate

    a = list(generate(plain, x[0, :30].tolist(), max_new_tokens=10, temperature=0.0))
    b = list(generate(dca, x[0, :30].tolist(), max_new_tokens=10, temperature=0.0))
    assert a == b


def test_yarn_temperature_is_off_up_to_l0_and_follows_spec_3_3_beyond():
    from qwen2.rope import dual_chunk_temperature

    assert dual_chunk_temperature(1_010_000, 262_144) == pytest.approx(1.135, abs=5e-4)  # SPEC 3.3's example
    assert dual_chunk_temperature(100, 0) == 1.0 and dual_chunk_temperature(16, 16) == 1.0
    _, off = dca_model(chunk=12, local=4, l0=0)
    _, on = dca_model(chunk=12, local=4, l0=24)
    x = ids(40, seed=1)
    with torch.no_grad():
        assert torch.equal(on(x[:, :24]), off(x[:, :24]))  # L <= l0: s = 1
        assert not torch.allclose(on(x), off(x))  # L = 40 > 24: s > 1 sharpens the scores


def test_generate_and_engine_equal_the_full_forward_with_dca():
    from qwen2.engine import Engine
    from qwen2.generation import KVCache, decode_one, prefill
    from qwen2.sampling import SamplingParams

    _, dca = dca_model(chunk=12, local=4)  # Lc = 8, no temperature: every path must agree exactly
    x = ids(45, seed=2)
    with torch.no_grad():
        full = dca(x)[0]
        cache = KVCache(dca.config, 1, 64)
        prefill(dca, x[:, :20], cache)
        for p in range(20, 45):
            step = decode_one(dca, x[:, p : p + 1], torch.tensor([[p]]), cache)
            assert (step[0] - full[p]).abs().max() <= 1e-4
    prompts = [x[0, :n].tolist() for n in (37, 9, 26)]
    greedy = SamplingParams(max_new_tokens=6, temperature=0.0)
    engine = Engine(dca, block_size=4, num_blocks=128, max_num_batched_tokens=16)  # chunked prefill, 3 rows
    from qwen2.generation import generate

    for prompt, out in zip(prompts, engine.generate(prompts, greedy)):
        assert out == list(generate(dca, prompt, max_new_tokens=6, temperature=0.0))


def test_gradients_flow_through_a_dca_model():
    _, dca = dca_model(chunk=12, local=4, l0=8)
    dca.train()
    loss = dca(ids(30, seed=3)).logsumexp(-1).mean()
    loss.backward()
    assert all(
        p.grad is not None and torch.isfinite(p.grad).all() for p in dca.parameters() if p.requires_grad
    )


def test_dual_chunk_defaults_from_the_trained_length():
    from qwen2.config import ModelConfig

    config = ModelConfig.preset("Qwen2-7B-Instruct").with_dual_chunk_attention()
    assert config.dual_chunk_attention_config == {
        "chunk_size": 24576,
        "local_size": 2048,
        "original_max_position_embeddings": 32768,
    }
    assert config.max_position_embeddings == 131072 and config.rope_scaling is None
    yarn = ModelConfig.preset("Qwen2-7B-Instruct-YaRN").with_dual_chunk_attention()
    assert yarn.dual_chunk_attention_config["original_max_position_embeddings"] == 32768


def test_the_generate_command_adds_dual_chunk_attention(tiny_chat_checkpoint, capsys):
    from qwen2.checkpoint import load_model
    from qwen2.cli import main

    model = load_model(tiny_chat_checkpoint, dual_chunk_attention=True)
    assert model.config.dual_chunk_attention_config is not None
    assert load_model(tiny_chat_checkpoint).config.dual_chunk_attention_config is None
    argv = [
        "generate",
        "--model",
        str(tiny_chat_checkpoint),
        "--prompt",
        "Hello",
        "--max-new-tokens",
        "4",
        "--temperature",
        "0",
        "--quiet",
    ]
    assert main(argv + ["--dual-chunk-attention"]) == 0
    with_dca = capsys.readouterr().out
    assert main(argv) == 0
    assert with_dca == capsys.readouterr().out  # a short prompt lies within one chunk: the same text
