"""The continuous-batching engine: every request's output equals `qwen2.generate` on it alone,
whatever else is in the batch, under chunked prefill, prefix reuse, cancellation and preemption."""

import pytest
import torch

from qwen2.config import ModelConfig
from qwen2.engine.blocks import BlockManager
from qwen2.engine.engine import Engine
from qwen2.generation import generate
from qwen2.model import build_model
from qwen2.sampling import SamplingParams, TokenHistory


@pytest.fixture(scope="module", params=["tiny", "tiny-moe"])
def model(request):
    return build_model(ModelConfig.preset(request.param), seed=0).eval()


def prompts(lengths, seed=1, vocab=512):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]


def alone(model, prompt, n, **kw):
    """The reference: qwen2.generate on this one prompt."""
    return list(generate(model, prompt, max_new_tokens=n, temperature=0.0, **kw))


def greedy(n):
    return SamplingParams(temperature=0.0, max_new_tokens=n)


def run(engine):
    """Step to completion (bounded); {request_id: output ids}."""
    out = {}
    for _ in range(10_000):
        if not engine.has_unfinished():
            return out
        for o in engine.step():
            out.setdefault(o.request_id, []).extend(o.token_ids)
    raise AssertionError("engine did not finish")


def test_batch_invariance_with_chunked_prefill_and_late_joiners(model):
    ps = prompts([5, 37, 3, 70, 16, 1, 29])
    # A budget of 24 tokens a step forces the long prompts into chunks beside running decodes.
    engine = Engine(model, block_size=8, num_blocks=64, max_num_batched_tokens=24)
    rids = [engine.add_request(p, greedy(10)) for p in ps[:4]]
    out = {}
    for _ in range(3):  # requests join while others are mid-prefill or decoding
        for o in engine.step():
            out.setdefault(o.request_id, []).extend(o.token_ids)
    rids += [engine.add_request(p, greedy(10)) for p in ps[4:]]
    for rid, toks in run(engine).items():
        out.setdefault(rid, []).extend(toks)
    for rid, p in zip(rids, ps):
        assert out[rid] == alone(model, p, 10), f"prompt of {len(p)} tokens"
    assert engine.blocks.num_free == engine.blocks.num_blocks  # everything released


def test_a_long_prompt_is_prefilled_in_chunks_without_stalling_decodes(model):
    short, long = prompts([4, 100], seed=2)
    engine = Engine(model, block_size=8, num_blocks=64, max_num_batched_tokens=16)
    r_short = engine.add_request(short, greedy(12))
    got = {r_short: [o.token_ids for o in engine.step()][0]}  # its prompt in one step, then one token a step
    r_long = engine.add_request(long, greedy(3))
    chunks = []
    while engine.seqs[r_long].num_computed < len(long):
        before = engine.seqs[r_long].num_computed
        outs = {o.request_id: o.token_ids for o in engine.step()}
        chunks.append(engine.seqs[r_long].num_computed - before)
        assert len(outs.get(r_short, [])) == 1  # the running request advanced this step too
        for rid, toks in outs.items():
            got.setdefault(rid, []).extend(toks)
    assert len(chunks) > 1 and max(chunks) <= 16 - 1  # the budget minus the decode's token
    for rid, toks in run(engine).items():
        got.setdefault(rid, []).extend(toks)
    assert got[r_short] == alone(model, short, 12) and got[r_long] == alone(model, long, 3)


def test_prefix_reuse_computes_fewer_prefill_tokens(model):
    system = prompts([48], seed=7)[0]  # a shared "system prompt": 6 full blocks of 8
    a, b = system + prompts([5], seed=8)[0], system + prompts([9], seed=9)[0]
    engine = Engine(model, block_size=8, num_blocks=64)
    out_a = engine.generate([a], greedy(6))[0]
    before = engine.stats.computed_tokens
    out_b = engine.generate([b], greedy(6))[0]
    computed_b = engine.stats.computed_tokens - before
    assert engine.scheduler.num_cached_tokens == len(system)
    assert computed_b == len(b) - len(system) + 6 - 1  # the suffix, then one token per decode step
    assert out_a == alone(model, a, 6) and out_b == alone(model, b, 6)


def test_cancellation_frees_blocks_at_once(model):
    engine = Engine(model, block_size=4, num_blocks=64)
    keep, gone = prompts([10, 30], seed=3)
    r_keep = engine.add_request(keep, greedy(8))
    r_gone = engine.add_request(gone, greedy(50))
    r_wait = engine.add_request(gone, greedy(5))
    out = {}
    for _ in range(3):
        for o in engine.step():
            out.setdefault(o.request_id, []).extend(o.token_ids)
    seq = engine.seqs[r_gone]
    held = len(seq.block_table)
    free = engine.blocks.num_free
    assert held > 0 and engine.abort(r_gone)
    assert engine.blocks.num_free == free + held and seq.block_table == []
    assert engine.abort(r_wait) and not engine.abort(r_wait)  # a second abort is a no-op
    assert out[r_keep] + run(engine)[r_keep] == alone(model, keep, 8)
    assert engine.blocks.num_free == engine.blocks.num_blocks


def test_preemption_under_a_tiny_cache_completes_every_request(model):
    ps = prompts([12, 20, 7, 25, 16, 9], seed=5)
    # 12 blocks of 4 = 48 tokens: room for any one request (<= 25 + 16), not for all of them at once.
    engine = Engine(model, block_size=4, num_blocks=12, max_num_batched_tokens=16)
    rids = [engine.add_request(p, greedy(16)) for p in ps]
    out = run(engine)
    assert engine.scheduler.num_preemptions > 0
    for rid, p in zip(rids, ps):
        assert out[rid] == alone(model, p, 16)
    assert engine.blocks.num_free == engine.blocks.num_blocks


def test_logprobs_match_a_full_forward(model):
    p = prompts([11], seed=11)[0]
    engine = Engine(model, block_size=4, num_blocks=32, max_num_batched_tokens=4)  # prompt scored in chunks
    rid = engine.add_request(p, greedy(3), logprobs=2, prompt_logprobs=2)
    outs = []
    while engine.has_unfinished():
        outs += [o for o in engine.step() if o.request_id == rid]
    ids = p + [t for o in outs for t in o.token_ids]
    with torch.no_grad():
        ref = torch.log_softmax(model(torch.tensor([ids]))[0].float(), -1)  # [T, V]
    scored = outs[0].prompt_logprobs + [o.logprobs[0] for o in outs]
    assert [e.token_id for e in scored] == ids[1:]
    for pos, e in enumerate(scored):  # entry for token pos+1, predicted at position pos
        assert e.logprob == pytest.approx(ref[pos, ids[pos + 1]].item(), abs=1e-4)
        assert [t for t, _ in e.top] == ref[pos].topk(2).indices.tolist()


def test_score_only_request_and_stop_tokens(model):
    p = prompts([9], seed=4)[0]
    engine = Engine(model, block_size=4, num_blocks=32)
    rid = engine.add_request(p, greedy(0), prompt_logprobs=0)
    (o,) = [o for o in engine.step() if o.request_id == rid]
    assert o.finished and o.token_ids == [] and len(o.prompt_logprobs) == len(p) - 1
    first = alone(model, p, 1)[0]
    rid = engine.add_request(p, SamplingParams(temperature=0.0, max_new_tokens=20, stop_token_ids=[first]))
    out = run(engine)[rid]
    assert out == [first]  # the stop token ends the request and is reported


def test_seeded_sampling_is_reproducible_whatever_the_batch(model):
    p, other = prompts([13, 40], seed=6)
    params = SamplingParams(temperature=0.8, top_p=0.9, max_new_tokens=12, seed=1234)
    solo = Engine(model, block_size=4, num_blocks=64).generate([p], params)[0]
    engine = Engine(model, block_size=4, num_blocks=64)
    rid = engine.add_request(p, params)
    engine.add_request(other, SamplingParams(temperature=1.0, max_new_tokens=20, seed=7))
    assert run(engine)[rid] == solo


def test_penalties_equal_generates_and_each_history_is_updated_in_place(model):
    p, other = prompts([9, 21], seed=8)
    kw = dict(repetition_penalty=1.5, presence_penalty=0.7, frequency_penalty=0.4)
    ref = alone(model, p, 16, **kw)
    engine = Engine(model, block_size=4, num_blocks=64)
    rid = engine.add_request(p, SamplingParams(temperature=0.0, max_new_tokens=16, **kw))
    engine.add_request(other, greedy(10))  # another row in the batch, without penalties
    seq = engine.seqs[rid]
    assert (
        engine.seqs[engine.add_request(other, greedy(3))].history is None
    )  # only penalised requests keep one
    storage = (seq.history.seen.data_ptr(), seq.history.counts.data_ptr())
    out = []
    while engine.has_unfinished():
        for o in engine.step():
            if o.request_id == rid:
                out += o.token_ids
        # The sequence's own [1, V] statistics, written in place, equal ones built from its tokens.
        assert (seq.history.seen.data_ptr(), seq.history.counts.data_ptr()) == storage
        want = TokenHistory([p], model.config.vocab_size, outputs=[seq.output])
        assert torch.equal(seq.history.seen, want.seen) and torch.equal(seq.history.counts, want.counts)
    assert out == ref and len(out) == 16


def test_requests_that_can_never_run_are_refused(model):
    engine = Engine(model, block_size=4, num_blocks=8, max_model_len=64)
    with pytest.raises(ValueError, match="empty"):
        engine.add_request([], greedy(1))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        engine.add_request([1, 512], greedy(1))
    with pytest.raises(ValueError, match="exceeds the context of 32"):  # the cache holds 8 * 4 tokens
        engine.add_request([1] * 30, greedy(3))
    with pytest.raises(ValueError, match="stop strings"):
        engine.add_request([1], SamplingParams(temperature=0.0, stop=["x"]))


def test_block_manager_reuses_named_blocks_until_they_are_recycled():
    bm = BlockManager(num_blocks=3, block_size=2)
    table = []
    assert bm.grow(table, 4) and bm.num_free == 1
    bm.name(table[0], b"h0")
    bm.release(table)
    assert bm.num_free == 3 and bm.match_prefix([b"h0", b"h1"]) == [0]
    cached = bm.take(bm.match_prefix([b"h0"]))
    assert cached == [0] and bm.ref[0] == 1 and bm.num_free == 2
    other = []
    assert bm.grow(other, 4) and not bm.grow(other, 6)  # only two free blocks, neither the named one
    bm.release(other)
    bm.release(cached)
    assert bm.grow([], 6) and bm.match_prefix([b"h0"]) == []  # recycled as a fresh block: name erased


# ---- non-finite logits: the request fails, the batch goes on ---------------------------------------
def test_a_row_of_nan_logits_fails_only_its_request(model, monkeypatch):
    ps = prompts([7, 12, 5], seed=11)
    engine = Engine(model, block_size=4, num_blocks=64)
    rids = [engine.add_request(p, greedy(6)) for p in ps]
    bad, forward = rids[1], engine.runner.forward

    def poisoned(batch):  # the model's logits for `bad` turn NaN on its third sampled token
        logits = forward(batch)
        for (seq, _), lg in zip(batch, logits):
            if seq.request_id == bad and len(seq.output) == 2:
                lg[-1, 5] = float("nan")
        return logits

    monkeypatch.setattr(engine.runner, "forward", poisoned)
    out, errors = {}, {}
    while engine.has_unfinished():
        for o in engine.step():
            out.setdefault(o.request_id, []).extend(o.token_ids)
            if o.finish_reason == "error":
                errors[o.request_id] = o.error
    assert list(errors) == [bad] and "non-finite logits" in errors[bad]
    assert out[bad] == alone(model, ps[1], 2)  # what it produced before the NaN step
    for rid, p in zip(rids, ps):
        if rid != bad:
            assert out[rid] == alone(model, p, 6)
    assert engine.blocks.num_free == engine.blocks.num_blocks


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_a_model_with_non_finite_weights_fails_each_request_with_an_error(value):
    broken = build_model(ModelConfig.preset("tiny"), seed=0).eval()
    with torch.no_grad():
        broken.model.norm.weight[0] = value  # every position's final hidden state, so every logit row
    engine = Engine(broken, block_size=4, num_blocks=64)
    rids = [engine.add_request(p, greedy(4)) for p in prompts([3, 9])]
    rids.append(
        engine.add_request(prompts([4])[0], SamplingParams(temperature=1.0, max_new_tokens=4, seed=0))
    )
    outs = [o for _ in range(5) for o in engine.step()]
    assert sorted(o.request_id for o in outs) == sorted(rids)  # each reported once, in the first step
    for o in outs:
        assert o.finished and o.finish_reason == "error" and o.token_ids == [] and "NaN or Inf" in o.error
    assert not engine.has_unfinished() and engine.blocks.num_free == engine.blocks.num_blocks


def test_a_request_hitting_a_nan_weight_cannot_poison_the_others():
    """A NaN embedding row (untied: only prompts holding that token see it) fails that request alone.
    Its K/V sit in its blocks and, via its padding, in the scratch block: slots the other rows' masks
    hide, but 0 * NaN is NaN, so the paged cache must zero them (now, and after the blocks are reused)."""
    net = build_model(ModelConfig.preset("tiny").replace(tie_word_embeddings=False), seed=0).eval()
    clean = prompts([5, 19, 3], seed=3)
    refs = [alone(net, p, 8) for p in clean]
    bad_id = next(i for i in range(1, 512) if all(i not in p + r for p, r in zip(clean, refs)))
    with torch.no_grad():
        net.model.embed_tokens.weight[bad_id] = float("nan")
    engine = Engine(net, block_size=4, num_blocks=64)
    for round in range(2):  # the second round reuses the failed request's freed blocks
        rids = [engine.add_request(p, greedy(8)) for p in clean]
        bad = engine.add_request([bad_id] * 6, greedy(8))  # last: its padding is written to scratch last
        out, errors = {}, []
        while engine.has_unfinished():
            for o in engine.step():
                out.setdefault(o.request_id, []).extend(o.token_ids)
                if o.finish_reason == "error":
                    errors.append(o.request_id)
        assert errors == [bad], f"round {round}"
        assert [out[r] for r in rids] == refs, f"round {round}"
