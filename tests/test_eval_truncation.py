"""Inputs longer than the model's context (issue 13): cut from the left as lm-evaluation-harness does,
the continuation kept. Log-likelihoods of over-long pairs equal lm-eval's `hf` model (HFLM keeps the
last context + 1 tokens) within 1e-4 on a checkpoint with a 48-token context; generation keeps the
prompt's last context - max_tokens tokens (in-process; context - 1 - max_tokens against a server, as
lm-eval's API models)."""

import pytest

CONTEXT = 48
LONG = " ".join(f"word{i}" for i in range(60))  # well over 48 tokens


@pytest.fixture(scope="module")
def short_checkpoint(tmp_path_factory, tokenizer_dir):
    from qwen2.checkpoint import copy_side_files, save_model
    from qwen2.config import ModelConfig
    from qwen2.model import build_model

    path = tmp_path_factory.mktemp("short-ctx")
    config = ModelConfig.preset("tiny").replace(
        vocab_size=151936, tie_word_embeddings=False, max_position_embeddings=CONTEXT
    )
    save_model(build_model(config, seed=1), path)
    copy_side_files(tokenizer_dir, path)
    return path


@pytest.fixture(scope="module")
def backend(short_checkpoint):
    from qwen2.checkpoint import load_model
    from qwen2.eval.harness import InProcess
    from qwen2.tokenizer.bpe import load_tokenizer

    return InProcess(load_model(short_checkpoint), load_tokenizer(short_checkpoint), batch_size=3)


def test_truncate_pair_and_prompt():
    from qwen2.eval.harness import truncate_pair, truncate_prompt

    assert truncate_pair(list(range(10)), [10, 11], 5) == ([7, 8, 9], [10, 11])
    assert truncate_pair([1, 2], [3], 5) == ([1, 2], [3])
    with pytest.raises(ValueError, match="continuation of 5 tokens"):
        truncate_pair([1], [1, 2, 3, 4, 5], 5)
    assert truncate_prompt(list(range(10)), 8, 3) == [5, 6, 7, 8, 9]
    with pytest.raises(ValueError, match="max_tokens 8"):
        truncate_prompt([1], 8, 8)


@pytest.mark.slow
def test_over_long_loglikelihoods_equal_lm_eval_hf(short_checkpoint, backend, monkeypatch):
    pytest.importorskip("lm_eval")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    pairs = [
        (LONG, " word60"),
        (LONG, " word60 word61 word62 word63"),  # same text, a different cut: longer continuation
        (LONG + " and", " more"),
        ("short context", " fits"),
        (LONG[:120], " word99 word98"),
    ]
    enc = [len(backend.tokenizer.encode(c + x)) for c, x in pairs]
    assert sum(n > CONTEXT + 1 for n in enc) >= 3  # the test exercises truncation
    hf = HFLM(pretrained=str(short_checkpoint), device="cpu", dtype="float32", batch_size=1)
    assert hf.max_length == CONTEXT
    reqs = [Instance("loglikelihood", {}, p, i) for i, p in enumerate(pairs)]
    theirs = hf.loglikelihood(reqs)
    mine = backend.loglikelihood(pairs)
    for (a, ga), (b, gb) in zip(mine, theirs, strict=True):
        assert a == pytest.approx(b, abs=1e-4)
        assert ga == gb


def test_generation_keeps_the_prompts_end(backend):
    from qwen2.generation import generate

    ids = backend.tokenizer.encode(LONG)
    assert len(ids) > CONTEXT
    out = backend.generate([LONG], stop=(), max_tokens=8)
    gen = generate(backend.model, [ids[-(CONTEXT - 8) :]], 8, temperature=0.0, tokenizer=backend.tokenizer)
    for _ in gen:
        pass
    assert out == gen.texts
    assert backend.sample([LONG], 2, temperature=0.0, max_tokens=8) == [gen.texts * 2]


@pytest.mark.slow
def test_endpoint_truncates_like_lm_evals_api_models(start_server, short_checkpoint, backend):
    from qwen2.checkpoint import load_model
    from qwen2.eval.harness import Endpoint

    srv = start_server(model=load_model(short_checkpoint).eval())
    remote = Endpoint(srv.url, backend.tokenizer)
    remote.context = CONTEXT  # our /v1/models card does not report max_model_len
    pairs = [(LONG, " word60 word61"), ("short context", " fits")]
    got = remote.loglikelihood(pairs)
    # lm-eval's API models keep the last context - 1 tokens: the in-process score of that cut
    from qwen2.eval.harness import encode_pair, truncate_pair
    from qwen2.generation import generate

    cuts = [truncate_pair(*encode_pair(backend.tokenizer, c, x), CONTEXT - 1) for c, x in pairs]
    assert len(cuts[0][0]) < len(backend.tokenizer.encode(LONG))  # the first pair is cut
    for (a, _), (ctx, cont) in zip(got, cuts, strict=True):
        assert a == pytest.approx(backend._score(ctx, [cont])[0][0], abs=1e-3)
    ids = backend.tokenizer.encode(LONG)
    gen = generate(
        backend.model, [ids[-(CONTEXT - 1 - 8) :]], 8, temperature=0.0, tokenizer=backend.tokenizer
    )
    for _ in gen:
        pass
    assert remote.generate([LONG], (), 8) == gen.texts
    assert remote.sample([LONG], 2, temperature=0.0, max_tokens=8) == [gen.texts * 2]
