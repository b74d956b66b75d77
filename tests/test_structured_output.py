"""Structured output (qwen2.grammar, constrained decoding through llguidance): from a tiny random model,
json_schema output parses and validates against its schema, json_object output parses, rows without a
format in the same batch are untouched; through the server with the openai client and LangChain's
`with_structured_output(..., method="json_schema")`; a missing library or a bad schema is one line."""

import json
import sys

import pytest

from qwen2.config import ModelConfig
from qwen2.engine.engine import Engine
from qwen2.extras import MissingExtra
from qwen2.generation import generate
from qwen2.model import build_model
from qwen2.sampling import SamplingParams

pytest.importorskip("llguidance", reason="structured output needs the `structured` extra (llguidance)")
jsonschema = pytest.importorskip("jsonschema", reason="jsonschema is in the `test` extra")

from qwen2.grammar import GrammarCompiler, token_mask  # noqa: E402

# Bounded, so a random model completes it within max_tokens: enums, booleans, small integers, short strings.
SCHEMA = {
    "type": "object",
    "properties": {
        "colour": {"enum": ["red", "green", "blue"]},
        "ok": {"type": "boolean"},
        "count": {"type": "integer", "minimum": 0, "maximum": 99},
        "tag": {"type": "string", "maxLength": 6},
        "items": {"type": "array", "items": {"type": "boolean"}, "maxItems": 3},
    },
    "required": ["colour", "ok", "count", "tag", "items"],
    "additionalProperties": False,
}
JSON_SCHEMA = {"type": "json_schema", "json_schema": {"name": "thing", "schema": SCHEMA, "strict": True}}


@pytest.fixture(scope="module")
def model():
    """The tiny preset at Qwen2's vocabulary (151,936 rows), untied (tied, a random model echoes)."""
    config = ModelConfig.preset("tiny").replace(vocab_size=151936, tie_word_embeddings=False)
    return build_model(config, seed=0).eval()


@pytest.fixture(scope="module")
def compiler(tok, model):
    return GrammarCompiler(tok, model.config.vocab_size, [tok.im_end_id, tok.endoftext_id])


def run(engine, rids):
    out, reasons = {r: [] for r in rids}, {}
    while engine.has_unfinished():
        for o in engine.step():
            out[o.request_id].extend(o.token_ids)
            if o.finished:
                reasons[o.request_id] = o.finish_reason
    return out, reasons


def text(tok, ids):
    return tok.decode([t for t in ids if t < tok.n_regular])


def test_json_schema_output_parses_and_validates_and_other_rows_are_untouched(tok, model, compiler):
    grammar = compiler.compile(JSON_SCHEMA)
    prompt = tok.encode("Describe a thing:")
    plain = list(generate(model, prompt, max_new_tokens=12, temperature=0.0))
    engine = Engine(model, block_size=16, num_blocks=64)
    rids = [
        engine.add_request(prompt, SamplingParams(temperature=t, seed=s, max_new_tokens=96, grammar=grammar))
        for t, s in [(0.0, None), (1.0, 1), (1.0, 2), (1.5, 3)]
    ]
    free = engine.add_request(prompt, SamplingParams(temperature=0.0, max_new_tokens=12))
    out, reasons = run(engine, rids + [free])
    for rid in rids:
        assert reasons[rid] == "stop", text(tok, out[rid])
        doc = json.loads(text(tok, out[rid]))
        jsonschema.validate(doc, SCHEMA)
    assert out[free] == plain  # the batch's mask leaves an unconstrained row bit for bit
    assert len({text(tok, out[r]) for r in rids[1:]}) > 1  # sampling still samples, within the grammar


def test_json_object_output_parses(tok, model, compiler):
    """Any JSON object: the grammar's mask overrides what the model wants (a bias towards '}' and '"'
    makes the random model close what it opens, so the document completes)."""
    grammar = compiler.compile({"type": "json_object"})
    bias = {tok.encode("}")[0]: 100.0, tok.encode('"')[0]: 50.0}
    engine = Engine(model, block_size=16, num_blocks=64)
    rids = [
        engine.add_request(
            tok.encode(p),
            SamplingParams(temperature=0.0, max_new_tokens=32, grammar=grammar, logit_bias=bias),
        )
        for p in ("JSON please:", "An object:")
    ]
    out, reasons = run(engine, rids)
    for rid in rids:
        assert reasons[rid] == "stop"
        assert isinstance(json.loads(text(tok, out[rid])), dict)
    # Without the grammar the same bias writes '}' first: not a JSON object.
    free = engine.generate(
        [tok.encode("JSON please:")], SamplingParams(temperature=0.0, max_new_tokens=4, logit_bias=bias)
    )
    assert text(tok, free[0]).startswith("}")


def test_the_mask_allows_exactly_the_grammars_tokens(tok, compiler):
    grammar = compiler.compile(JSON_SCHEMA)
    m = grammar.matcher()
    mask = token_mask([m, None], compiler.vocab_size)
    allowed = mask[0].nonzero().flatten().tolist()
    assert all(tok.decode([t]).startswith("{") for t in allowed) and mask[1].all()
    doc = '{"colour": "red", "ok": true, "count": 7, "tag": "ab", "items": []}'
    for t in tok.encode(doc):
        assert token_mask([m], compiler.vocab_size)[0, t]
        assert m.accept(t)
    assert m.done
    assert not token_mask([grammar.matcher()], compiler.vocab_size)[0, compiler.stop_token_ids].any()


def test_bad_formats_name_the_field(compiler):
    with pytest.raises(ValueError, match="response_format.json_schema.schema"):
        compiler.compile({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "objectx"}}})
    with pytest.raises(ValueError, match="response_format.type"):
        compiler.compile({"type": "xml"})
    assert compiler.compile({"type": "text"}) is None


def test_a_missing_library_is_one_line_naming_the_extra(tok, monkeypatch):
    monkeypatch.setitem(sys.modules, "llguidance", None)  # how Python blocks an import
    with pytest.raises(MissingExtra, match=r"pip install 'qwen2\[structured\]'"):
        GrammarCompiler(tok, 151936, [tok.im_end_id]).compile({"type": "json_object"})


def test_the_engine_refuses_a_grammar_for_another_vocabulary(tok, compiler):
    small = build_model(ModelConfig.preset("tiny"), seed=0).eval()
    with pytest.raises(ValueError, match="compiled for 151936 tokens but the model has"):
        Engine(small).add_request(
            [1, 2], SamplingParams(max_new_tokens=2, grammar=compiler.compile(JSON_SCHEMA))
        )


# ---- through the server -----------------------------------------------------------------------------
MSGS = [{"role": "user", "content": "Describe a thing as JSON."}]


@pytest.fixture(scope="module")
def srv(start_server):
    return start_server()


@pytest.fixture(scope="module")
def client(srv):
    import openai

    return openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def test_the_server_answers_in_the_schema_on_both_endpoints(srv, client):
    for seed in (0, 1):
        r = client.chat.completions.create(
            model="tiny",
            messages=MSGS,
            max_tokens=96,
            temperature=1.0,
            seed=seed,
            response_format=JSON_SCHEMA,
        )
        assert r.choices[0].finish_reason == "stop"
        jsonschema.validate(json.loads(r.choices[0].message.content), SCHEMA)
    r = client.completions.create(
        model="tiny",
        prompt="A thing:",
        max_tokens=96,
        temperature=0,
        extra_body={"response_format": JSON_SCHEMA},
    )
    jsonschema.validate(json.loads(r.choices[0].text), SCHEMA)
    stream = client.chat.completions.create(
        model="tiny", messages=MSGS, max_tokens=96, temperature=0, response_format=JSON_SCHEMA, stream=True
    )
    jsonschema.validate(json.loads("".join(c.choices[0].delta.content or "" for c in stream)), SCHEMA)


def test_the_server_refuses_a_bad_schema_naming_it(srv):
    import httpx2

    body = {
        "model": "tiny",
        "messages": MSGS,
        "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}},
    }
    resp = httpx2.post(srv.url + "/v1/chat/completions", json=body, timeout=60)
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "response_format.json_schema.schema"
    body["response_format"] = {"type": "json_schema"}
    resp = httpx2.post(srv.url + "/v1/chat/completions", json=body, timeout=60)
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "response_format.json_schema"


def test_langchain_with_structured_output_json_schema(srv):
    lc = pytest.importorskip("langchain_openai", reason="langchain-openai is not installed")
    from pydantic import BaseModel, Field

    class Thing(BaseModel):
        colour: str = Field(json_schema_extra={"enum": ["red", "green", "blue"]})
        ok: bool
        count: int = Field(ge=0, le=99)

    llm = lc.ChatOpenAI(
        base_url=srv.url + "/v1", api_key="unused", model="tiny", temperature=0, max_tokens=64
    )
    got = llm.with_structured_output(Thing, method="json_schema").invoke("Describe a thing.")
    assert isinstance(got, Thing) and got.colour in {"red", "green", "blue"} and 0 <= got.count <= 99
    as_dict = llm.with_structured_output(SCHEMA | {"title": "thing"}, method="json_schema").invoke("A thing.")
    jsonschema.validate(as_dict, SCHEMA)
