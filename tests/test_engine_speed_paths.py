"""The engine's fast decode paths (bf16 on CPU with qwen2.kernels installed): attention straight over the
block tables (kernels.ops.paged_decode_attention, no gathered copy), and outputs still equal to
`qwen2.generate` on each request alone at temperature 0, for a batch mixing lengths and block boundaries."""

import pytest
import torch

from qwen2.config import ModelConfig
from qwen2.engine.engine import Engine
from qwen2.generation import generate
from qwen2.kernels import install, ops
from qwen2.model import build_model
from qwen2.sampling import SamplingParams

needs_kernels = pytest.mark.skipif(ops.library() is None, reason=ops.status())


@pytest.fixture(scope="module")
def model():
    return install(build_model(ModelConfig.preset("tiny"), seed=0, dtype=torch.bfloat16).eval())


def prompts(lengths, seed=3):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 512, (n,), generator=g).tolist() for n in lengths]


@needs_kernels
def test_decode_attends_over_the_block_tables_and_equals_generate(model, monkeypatch):
    calls = []
    real = ops.paged_decode_attention
    monkeypatch.setattr(ops, "paged_decode_attention", lambda *a: calls.append(a[3].shape) or real(*a))
    # Block size 8: the rows cross block boundaries at different steps; lengths 1..29 in one batch.
    engine = Engine(model, block_size=8, num_blocks=64, max_num_batched_tokens=64)
    ps = prompts([7, 1, 16, 29])
    rids, out = [], {}
    for p in ps:  # one joins per step, beside the others' decodes (each prefill runs alone, as generate's)
        rids.append(engine.add_request(p, SamplingParams(temperature=0.0, max_new_tokens=12)))
        for o in engine.step():
            out.setdefault(o.request_id, []).extend(o.token_ids)
    while engine.has_unfinished():
        for o in engine.step():
            out.setdefault(o.request_id, []).extend(o.token_ids)
    assert calls and max(shape[0] for shape in calls) == len(ps)  # the whole batch in one call per layer
    for rid, p in zip(rids, ps):
        assert out[rid] == list(generate(model, p, max_new_tokens=12, temperature=0.0)), f"prompt of {len(p)}"


@needs_kernels
def test_without_the_kernel_the_paged_cache_gathers_and_gives_the_same_tokens(model, monkeypatch):
    ps = prompts([5, 12], seed=4)
    want = Engine(model, block_size=4, num_blocks=32).generate(
        ps, SamplingParams(temperature=0.0, max_new_tokens=8)
    )
    monkeypatch.setattr(ops, "paged_decode_attention_ok", lambda *a: False)  # PagedBatch.update + attend
    got = Engine(model, block_size=4, num_blocks=32).generate(
        ps, SamplingParams(temperature=0.0, max_new_tokens=8)
    )
    assert got == want
