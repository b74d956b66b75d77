"""The sampling fields a request may send are honoured, and checked: logit_bias (OpenAI's) against
transformers' SequenceBiasLogitsProcessor, per row in one batched call, in the engine; top_k, min_p,
repetition_penalty (vLLM's extras) and logit_bias through the server change the output as they should;
out-of-range values and fields the server does not know get a 400 naming the field."""

import httpx2
import openai
import pytest
import torch
from transformers.generation.logits_process import SequenceBiasLogitsProcessor

from qwen2.config import ModelConfig
from qwen2.engine.engine import Engine
from qwen2.generation import generate
from qwen2.model import build_model
from qwen2.sampling import SamplingParams, process_logits, sample
from qwen2.tokenizer.chat import encode_chat

V = 1000


def random_logits(seed, b=4):
    return torch.randn(b, V, generator=torch.Generator().manual_seed(seed)) * 3


# ---- logit_bias in qwen2.sampling -------------------------------------------------------------------
def test_logit_bias_equals_transformers_sequence_bias_on_single_tokens():
    logits = random_logits(0)
    bias = {3: 2.5, 17: -7.0, 999: 100.0}
    ref = SequenceBiasLogitsProcessor({(t,): b for t, b in bias.items()})(torch.zeros(4, 1).long(), logits)
    got = process_logits(logits, SamplingParams(temperature=1.0, logit_bias=bias))
    torch.testing.assert_close(got, ref, rtol=0, atol=0)


def test_logit_bias_100_forces_and_minus_100_bans_per_row_in_one_batch():
    logits = random_logits(1)
    top = logits.argmax(-1)
    rows = [
        SamplingParams(temperature=1.0, logit_bias={5: 100.0}),
        SamplingParams(temperature=0.0, logit_bias={6: 100.0}),  # greedy rows get the bias too
        SamplingParams(temperature=0.0, logit_bias={int(top[2]): -100.0}),
        SamplingParams(temperature=0.0),
    ]
    for seed in range(5):
        out = sample(logits, rows, torch.Generator().manual_seed(seed))
        assert out[0] == 5 and out[1] == 6 and out[2] != top[2] and out[3] == top[3]


@pytest.mark.parametrize(
    "bias,match",
    [
        ({1: 100.5}, r"logit_bias\[1\]"),
        ({-1: 1.0}, "logit_bias keys"),
        ({1: float("nan")}, r"logit_bias\[1\]"),
    ],
)
def test_bad_logit_bias_names_the_field(bias, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(logit_bias=bias)


def test_the_engine_honours_logit_bias_and_refuses_ids_outside_the_vocabulary():
    model = build_model(ModelConfig.preset("tiny"), seed=0).eval()
    engine = Engine(model, block_size=4, num_blocks=32)
    prompt = [1, 2, 3, 4]
    plain = list(generate(model, prompt, max_new_tokens=6, temperature=0.0))
    forced = next(t for t in range(V) if t not in plain)
    out = engine.generate([prompt, prompt], SamplingParams(temperature=0.0, max_new_tokens=6))
    biased = engine.generate(
        [prompt], SamplingParams(temperature=0.0, max_new_tokens=6, logit_bias={forced: 100})
    )
    assert out == [plain, plain] and biased == [[forced] * 6]
    with pytest.raises(ValueError, match="logit_bias: token id 512 is outside the vocabulary"):
        engine.add_request(prompt, SamplingParams(max_new_tokens=2, logit_bias={512: 1.0}))


# ---- through the server -----------------------------------------------------------------------------
MSGS = [{"role": "user", "content": "Count to ten."}]


@pytest.fixture(scope="module")
def srv(start_server):
    return start_server()


@pytest.fixture(scope="module")
def client(srv):
    return openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def chat(client, **kw):
    r = client.chat.completions.create(model="tiny", messages=MSGS, max_tokens=12, **kw)
    return r.choices[0].message.content, r.choices[0].finish_reason


def reference(srv, **params):
    """The chat prompt's reply from qwen2.generate with these SamplingParams (ids, text)."""
    ids = encode_chat(srv.tokenizer, MSGS, add_generation_prompt=True)[0]
    stops = [srv.tokenizer.endoftext_id, srv.tokenizer.im_end_id]
    out = list(generate(srv.model, ids, max_new_tokens=12, stop_token_ids=stops, **params))
    shown = [t for t in out if t not in stops]
    return out, srv.tokenizer.decode(shown)


def test_top_k_1_and_min_p_1_sample_the_greedy_reply(srv, client):
    greedy, _ = chat(client, temperature=0)
    assert greedy == reference(srv, temperature=0.0)[1]
    for seed in (1, 2):
        hot, _ = chat(client, temperature=2.0, seed=seed)
        assert chat(client, temperature=2.0, seed=seed, extra_body={"top_k": 1})[0] == greedy
        assert chat(client, temperature=2.0, seed=seed, extra_body={"min_p": 1.0})[0] == greedy
        assert chat(client, temperature=2.0, seed=seed, extra_body={"top_k": -1})[0] == hot  # -1: off
    assert hot != greedy  # the fields did the work, not the temperature


def test_repetition_penalty_is_applied_as_qwen2_sampling_applies_it(srv, client):
    plain_ids, plain = reference(srv, temperature=0.0)
    ids, text = reference(srv, temperature=0.0, repetition_penalty=3.0)
    assert ids != plain_ids, "the penalty must change this reply for the test to mean anything"
    assert chat(client, temperature=0, extra_body={"repetition_penalty": 3.0})[0] == text


def test_logit_bias_forces_a_token_on_both_endpoints(srv, client):
    tid = srv.tokenizer.encode(" hello")[0]
    text, _ = chat(client, temperature=0, logit_bias={str(tid): 100})
    assert text == " hello" * 12
    r = client.completions.create(
        model="tiny", prompt="Hi", max_tokens=4, temperature=1.0, logit_bias={str(tid): 100}
    )
    assert r.choices[0].text == " hello" * 4


def post(srv, path, body):
    return httpx2.post(srv.url + path, json=body, timeout=60)


CHAT = {"model": "tiny", "messages": MSGS, "max_tokens": 2}
COMPLETION = {"model": "tiny", "prompt": "Hi", "max_tokens": 2}
BAD = {
    "top_k below -1": ({"top_k": -2}, "top_k"),
    "top_k a float": ({"top_k": 1.5}, "top_k"),
    "min_p above 1": ({"min_p": 1.5}, "min_p"),
    "repetition_penalty 0": ({"repetition_penalty": 0}, "repetition_penalty"),
    "logit_bias above 100": ({"logit_bias": {"5": 101}}, "logit_bias"),
    "logit_bias key not an id": ({"logit_bias": {"hello": 1}}, "logit_bias"),
    "logit_bias id outside the vocabulary": ({"logit_bias": {"151646": 1}}, "logit_bias"),
    "logit_bias over 300 entries": ({"logit_bias": {str(i): 1 for i in range(301)}}, "logit_bias"),
    "an unknown field": ({"temprature": 0.5}, "temprature"),
    "an unsupported OpenAI field": ({"functions": [{"name": "f"}]}, "functions"),
    "an unknown nested field": ({"stream_options": {"include_usage": True, "x": 1}}, "stream_options.x"),
    "response_format of an unknown type": ({"response_format": {"type": "xml"}}, "response_format.type"),
}


@pytest.mark.parametrize("path,base", [("/v1/chat/completions", CHAT), ("/v1/completions", COMPLETION)])
@pytest.mark.parametrize("case", BAD)
def test_bad_or_unknown_fields_get_a_400_naming_them(srv, path, base, case):
    extra, param = BAD[case]
    resp = post(srv, path, dict(base, **extra))
    assert resp.status_code == 400, resp.text
    err = resp.json()["error"]
    assert err["param"] == param and param.split(".")[0] in err["message"]


def test_an_unknown_message_field_gets_a_400_naming_it(srv):
    body = dict(CHAT, messages=[{"role": "user", "content": "hi", "audio": {"id": "x"}}])
    resp = post(srv, "/v1/chat/completions", body)
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "messages.0.audio"
