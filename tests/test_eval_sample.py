"""Sampling n completions per prompt on both eval backends (issue 13; pass@k and synthesis's rejection
sampling build on it): in-process = qwen2.generate with the same seeds, seeded calls reproduce,
temperature 0 = the greedy `generate` path; --base-url against our server = in-process at temperature 0,
n split over requests of at most max_n choices."""

import pytest

PROMPTS = ["def add(a, b):\n", "The capital of France is"]


@pytest.fixture(scope="module")
def backend(tiny_chat_checkpoint):
    from qwen2.checkpoint import load_model
    from qwen2.eval.harness import InProcess
    from qwen2.tokenizer.bpe import load_tokenizer

    return InProcess(load_model(tiny_chat_checkpoint), load_tokenizer(tiny_chat_checkpoint), batch_size=2)


def test_in_process_sample_is_generate_with_its_seeds(backend):
    from qwen2.generation import generate
    from qwen2.sampling import SamplingParams

    out = backend.sample(PROMPTS, 3, temperature=1.0, top_p=0.9, max_tokens=6, seed=7)
    assert [len(o) for o in out] == [3, 3]
    # prompt 1's rows are 3..5 in seed order; batch_size 2 splits them into [3, 4] and [5]
    ids = backend.tokenizer.encode(PROMPTS[1])
    params = SamplingParams(temperature=1.0, top_p=0.9, max_new_tokens=6, seed=7 + 3 + 2)
    gen = generate(backend.model, [ids], params=params, tokenizer=backend.tokenizer)
    for _ in gen:
        pass
    assert out[1][2] == gen.texts[0]
    assert backend.sample(PROMPTS, 3, temperature=1.0, top_p=0.9, max_tokens=6, seed=7) == out
    assert len({t for o in out for t in o}) > 1  # a random model at temperature 1 does not repeat itself


def test_temperature_zero_is_greedy(backend):
    greedy = backend.generate(PROMPTS, stop=(), max_tokens=6)
    out = backend.sample(PROMPTS, 2, temperature=0.0, max_tokens=6)
    assert out == [[g, g] for g in greedy]


@pytest.mark.slow
def test_endpoint_sample(start_server, backend):
    from qwen2.eval.harness import Endpoint

    srv = start_server()
    remote = Endpoint(srv.url, backend.tokenizer, concurrency=3)
    remote.max_n = 2  # n = 3 goes as requests of 2 + 1 choices
    greedy = backend.generate(PROMPTS, stop=(), max_tokens=6)
    assert remote.sample(PROMPTS, 3, temperature=0.0, max_tokens=6) == [[g] * 3 for g in greedy]
    a = remote.sample(PROMPTS, 3, temperature=1.0, top_p=0.9, max_tokens=6, seed=11)
    assert [len(o) for o in a] == [3, 3]
    assert remote.sample(PROMPTS, 3, temperature=1.0, top_p=0.9, max_tokens=6, seed=11) == a
    assert len({t for o in a for t in o}) > 1
    stopped = remote.sample(PROMPTS, 2, temperature=1.0, max_tokens=6, stop=["a"], seed=1)
    assert all("a" not in t for o in stopped for t in o)


@pytest.mark.slow
def test_endpoint_loglikelihood_sends_one_request_per_question(start_server, backend):
    from qwen2.eval.harness import Endpoint

    srv = start_server()
    remote = Endpoint(srv.url, backend.tokenizer, concurrency=2)
    sent = []
    request = remote._request
    remote._request = lambda method, path, body=None: sent.append(body) or request(method, path, body)
    pairs = [
        (q, c) for q in ("Question one?\nAnswer:", "Question two?\nAnswer:") for c in (" A", " B", " yes no")
    ]
    got = remote.loglikelihood(pairs)
    assert len(sent) == 2 and all(len(b["prompt"]) == 3 for b in sent)
    for (a, ga), (b, gb) in zip(got, backend.loglikelihood(pairs), strict=True):
        assert a == pytest.approx(b, abs=1e-3)
        assert ga == gb
