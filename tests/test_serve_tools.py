"""Tool calls end to end: a tiny model trained here to answer one tool-calling conversation with a
hermes `<tool_call>` block; the server must hand that back as OpenAI `tool_calls` (non-streamed and
streamed), parsed by qwen2.tokenizer.tools, with finish_reason "tool_calls" and no markup in the content."""

import json

import openai
import pytest
import torch
import torch.nn.functional as F

from qwen2.config import ModelConfig
from qwen2.generation import generate
from qwen2.model import build_model
from qwen2.tokenizer.chat import encode_chat

CITY = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
TOOLS = [
    {
        "type": "function",
        "function": {"name": "get_weather", "description": "Current weather in a city", "parameters": CITY},
    }
]
MESSAGES = [{"role": "user", "content": "What is the weather in Paris?"}]
REPLY = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'


@pytest.fixture(scope="module")
def srv(start_server):
    probe = start_server()  # only for its tokenizer
    tok = probe.tokenizer
    prompt = encode_chat(tok, MESSAGES, add_generation_prompt=True, tools=TOOLS)[0]
    target = tok.encode(REPLY) + [tok.im_end_id]
    torch.manual_seed(0)
    model = build_model(ModelConfig.preset("tiny").replace(vocab_size=151936), seed=0)
    ids = torch.tensor([prompt + target])
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(400):  # memorise the reply (bounded); stop as soon as greedy decoding reproduces it
        h = model.hidden_states(ids[:, :-1])[0, len(prompt) - 1 :]  # the 151,936-wide output: reply only
        logits = model.logits(h)
        loss = F.cross_entropy(logits.float(), ids[0, len(prompt) :])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if loss.item() < 0.05 and logits.argmax(-1).tolist() == target:
            break
    model.eval()
    got = list(
        generate(
            model, prompt, max_new_tokens=len(target) + 4, temperature=0.0, stop_token_ids=[tok.im_end_id]
        )
    )
    assert got == target, "the tiny model did not learn the reply"
    return start_server(model=model)


@pytest.fixture(scope="module")
def client(srv):
    return openai.OpenAI(
        base_url=srv.url + "/v1", api_key="x", max_retries=0, timeout=60, _strict_response_validation=True
    )


def test_tool_call_comes_back_in_openai_shape(client):
    r = client.chat.completions.create(
        model="tiny", messages=MESSAGES, tools=TOOLS, temperature=0, max_tokens=64
    )
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call")
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris"}


def test_streamed_tool_call_holds_back_the_markup(client):
    chunks = list(
        client.chat.completions.create(
            model="tiny", messages=MESSAGES, tools=TOOLS, temperature=0, max_tokens=64, stream=True
        )
    )
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    calls = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
    assert "<tool_call>" not in content and content.strip() == ""
    assert len(calls) == 1 and calls[0].index == 0 and calls[0].function.name == "get_weather"
    assert json.loads(calls[0].function.arguments) == {"city": "Paris"}
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_without_tools_the_same_text_is_plain_content(client, srv):
    # tool_choice "none" renders no tools, so the model sees another prompt; ask the completions
    # endpoint for the trained prompt instead and check the raw text is the hermes block.
    tok = srv.tokenizer
    prompt = encode_chat(tok, MESSAGES, add_generation_prompt=True, tools=TOOLS)[0]
    r = client.completions.create(model="tiny", prompt=prompt, max_tokens=64, temperature=0)
    assert r.choices[0].text == REPLY and r.choices[0].finish_reason == "stop"


def test_ignore_eos_generates_through_the_stop_token(client, srv):
    # The trained reply ends with <|im_end|>: normally the request stops there; with vLLM's
    # `ignore_eos` it runs to max_tokens, the stop token's text included.
    tok = srv.tokenizer
    prompt = encode_chat(tok, MESSAGES, add_generation_prompt=True, tools=TOOLS)[0]
    n = len(tok.encode(REPLY)) + 5
    normal = client.completions.create(model="tiny", prompt=prompt, max_tokens=n, temperature=0)
    assert normal.usage.completion_tokens == len(tok.encode(REPLY)) + 1
    assert normal.choices[0].finish_reason == "stop"
    r = client.completions.create(
        model="tiny", prompt=prompt, max_tokens=n, temperature=0, extra_body={"ignore_eos": True}
    )
    want = list(generate(srv.model, prompt, max_new_tokens=n, temperature=0.0))  # no stop tokens at all
    assert r.usage.completion_tokens == n and r.choices[0].finish_reason == "length"
    assert r.choices[0].text == tok.decode(want) and r.choices[0].text.startswith(REPLY + "<|im_end|>")
