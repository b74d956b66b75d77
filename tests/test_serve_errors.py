"""Bad input never takes the server down: each class gets a 4xx with OpenAI's error body (never
FastAPI's 422 shape, never a 500), and a canary request right after proves the server still serves.
Also: API keys (401), overload (fast 503), and a client that disconnects mid-stream frees its cache."""

import asyncio
import contextlib
import json
import socket
import time

import httpx2
import openai
import pytest

CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
COMPLETION = {"model": "tiny", "prompt": "hi", "max_tokens": 2}
HOST = "127.0.0.1"
CH, CO = "/v1/chat/completions", "/v1/completions"


@pytest.fixture(scope="module")
def srv(start_server):
    return start_server(max_body_bytes=64 * 1024)


@pytest.fixture(scope="module")
def client(srv):
    return openai.OpenAI(
        base_url=srv.url + "/v1",
        api_key="unused",
        max_retries=0,
        timeout=60,
        _strict_response_validation=True,
    )


def canary(client):
    r = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "still there?"}], max_tokens=2, temperature=0
    )
    assert r.choices[0].message.role == "assistant" and r.usage.completion_tokens >= 1


def assert_openai_error(resp: httpx2.Response, status: int, param: str | None = "?"):
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    if param != "?":
        assert body["error"]["param"] == param, body


def post(srv, path, body, **headers):
    content = body if isinstance(body, (bytes, str)) else json.dumps(body)
    headers = {"content-type": "application/json", **headers}
    return httpx2.post(srv.url + path, content=content, headers=headers, timeout=60)


RAW = {  # bodies no well-behaved client sends: (path, body, expected param)
    "malformed json": (CH, b'{"model": "tiny", "messages": [', None),
    "not an object": (CO, b"[1, 2, 3]", None),
    "invalid utf-8": (CO, b'{"model": "tiny", "prompt": "\xff\xfe"}', None),
    "NaN": (
        CH,
        b'{"model": "tiny", "messages": [{"role": "user", "content": "x"}], "temperature": NaN}',
        None,
    ),
    "Infinity": (CO, b'{"model": "tiny", "prompt": "x", "top_p": Infinity}', None),
    "-Infinity": (CO, b'{"model": "tiny", "prompt": "x", "temperature": -Infinity}', None),
    "1e999": (CO, b'{"model": "tiny", "prompt": "x", "temperature": 1e999}', None),
    "huge integer": (CO, b'{"model": "tiny", "prompt": "x", "max_tokens": 1' + b"0" * 5000 + b"}", None),
    "deep nesting": (CO, b'{"model": "tiny", "prompt": ' + b"[" * 100000 + b"]" * 100000 + b"}", None),
    "lone surrogate": (
        CH,
        b'{"model": "tiny", "messages": [{"role": "user", "content": "a\\ud800b"}]}',
        "messages.0.content",
    ),
    "empty body": (CH, b"", None),
}


@pytest.mark.parametrize("case", list(RAW))
def test_raw_bad_bodies_get_400(srv, client, case):
    path, body, param = RAW[case]
    resp = post(srv, path, body)
    want = 413 if len(body) > 64 * 1024 else 400
    assert_openai_error(resp, want, param if want == 400 else "?")
    canary(client)


BAD = {  # (path, body, status, param)
    "wrong type: max_tokens as string": (CH, dict(CHAT, max_tokens="5"), 400, "max_tokens"),
    "wrong type: messages as object": (CH, dict(CHAT, messages={"role": "user"}), 400, "messages"),
    "wrong type: stream as int": (CO, dict(COMPLETION, stream=1), 400, "stream"),
    "wrong type: prompt as number": (CO, dict(COMPLETION, prompt=3.5), 400, "prompt"),
    "missing model": (CO, {"prompt": "x"}, 400, "model"),
    "empty messages": (CH, dict(CHAT, messages=[]), 400, "messages"),
    "unknown role": (CH, dict(CHAT, messages=[{"role": "wizard", "content": "x"}]), 400, "messages.0.role"),
    "content of wrong type": (
        CH,
        dict(CHAT, messages=[{"role": "user", "content": 5}]),
        400,
        "messages.0.content",
    ),
    "message not an object": (CH, dict(CHAT, messages=["hello"]), 400, "messages.0"),
    "tool call arguments not JSON": (
        CH,
        dict(
            CHAT,
            messages=[
                {"role": "user", "content": "x"},
                {
                    "role": "assistant",
                    "tool_calls": [
                        {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{oops"}}
                    ],
                },
            ],
        ),
        400,
        "messages",
    ),
    "unknown model (chat)": (CH, dict(CHAT, model="gpt-4o"), 404, "model"),
    "unknown model (completions)": (CO, dict(COMPLETION, model="davinci"), 404, "model"),
    "temperature above 2": (CH, dict(CHAT, temperature=2.5), 400, "temperature"),
    "negative temperature": (CO, dict(COMPLETION, temperature=-0.1), 400, "temperature"),
    "top_p 0": (CO, dict(COMPLETION, top_p=0), 400, "top_p"),
    "n 0": (CH, dict(CHAT, n=0), 400, "n"),
    "n 1000": (CH, dict(CHAT, n=1000), 400, "n"),
    "max_tokens 0 in chat": (CH, dict(CHAT, max_tokens=0), 400, "max_tokens"),
    "negative max_tokens": (CO, dict(COMPLETION, max_tokens=-1), 400, "max_tokens"),
    "top_logprobs 50": (CH, dict(CHAT, logprobs=True, top_logprobs=50), 400, "top_logprobs"),
    "top_logprobs without logprobs": (CH, dict(CHAT, top_logprobs=2), 400, "top_logprobs"),
    "logprobs 21": (CO, dict(COMPLETION, logprobs=21), 400, "logprobs"),
    "presence_penalty 3": (CH, dict(CHAT, presence_penalty=3), 400, "presence_penalty"),
    "five stop strings": (CO, dict(COMPLETION, stop=["a", "b", "c", "d", "e"]), 400, "stop"),
    "empty stop string": (CO, dict(COMPLETION, stop=""), 400, "stop"),
    "seed too large": (CO, dict(COMPLETION, seed=2**64), 400, "seed"),
    "max_tokens over the context": (CO, dict(COMPLETION, max_tokens=5000), 400, "max_tokens"),
    "prompt over the context": (CO, dict(COMPLETION, prompt=[1] * 2100, max_tokens=1), 400, "max_tokens"),
    "chat over the context": (CH, dict(CHAT, max_completion_tokens=2040), 400, "max_completion_tokens"),
    "token id past the vocabulary": (CO, dict(COMPLETION, prompt=[1, 151646]), 400, "prompt"),
    "negative token id": (CO, dict(COMPLETION, prompt=[[5], [-1]]), 400, "prompt.1"),
    "token id over int64": (CO, dict(COMPLETION, prompt=[2**70]), 400, "prompt"),
    "empty prompt": (CO, dict(COMPLETION, prompt=[]), 400, "prompt"),
    "empty list of prompts": (CO, dict(COMPLETION, prompt=[[]]), 400, "prompt"),
    "body over the size limit": (CO, dict(COMPLETION, prompt="x" * 70_000), 413, None),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_requests_get_openai_errors(srv, client, case):
    path, body, status, param = BAD[case]
    resp = post(srv, path, body)
    assert_openai_error(resp, status, param)
    canary(client)


def test_openai_client_raises_typed_errors(client):
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "x"}], temperature=9
        )
    assert e.value.body["param"] == "temperature"
    canary(client)


def test_unknown_routes_and_methods(srv, client):
    assert_openai_error(httpx2.get(srv.url + "/v1/nothing"), 404)
    assert_openai_error(httpx2.get(srv.url + "/v1/chat/completions"), 405)
    assert_openai_error(httpx2.get(srv.url + "/v1/models/other"), 404, "model")
    canary(client)


def test_api_key(start_server):
    s = start_server(api_key="sekret")
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=s.url + "/v1", api_key="wrong", max_retries=0).models.list()
    assert_openai_error(post(s, "/v1/chat/completions", CHAT), 401)  # no key at all
    assert_openai_error(post(s, "/v1/completions", COMPLETION, authorization="Bearer wrong"), 401)
    good = openai.OpenAI(
        base_url=s.url + "/v1", api_key="sekret", max_retries=0, _strict_response_validation=True
    )
    canary(good)
    assert httpx2.get(s.url + "/health").status_code == 200  # health checks need no key


def test_disconnect_mid_stream_frees_the_cache(srv, client):
    engine = srv.engine
    with httpx2.stream(
        "POST",
        srv.url + "/v1/chat/completions",
        timeout=60,
        json=dict(CHAT, max_tokens=1500, temperature=0, stream=True, ignore_eos=True),
    ) as resp:
        lines = resp.iter_lines()
        got = [next(lines) for _ in range(6)]  # a few events: the request is running
        assert any(line.startswith("data: ") for line in got)
        assert engine.seqs  # it holds the cache now
    wait_until_idle(engine)  # the server notices the disconnect, aborts, frees
    canary(client)


def test_disconnect_before_a_whole_reply_frees_the_cache(srv, client):
    # A non-streamed request: the client hangs up while the reply is being generated (raw socket, so
    # the hang-up comes exactly when the request is known to be running).
    engine = srv.engine
    body = json.dumps(dict(CHAT, max_tokens=2000, temperature=0, ignore_eos=True)).encode()
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: {HOST}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    with socket.create_connection((HOST, int(srv.url.rsplit(":", 1)[1]))) as sock:
        sock.sendall(head + body)
        seqs = []
        deadline = time.monotonic() + 60
        while not seqs and time.monotonic() < deadline:
            seqs = list(engine.seqs.values())
            time.sleep(0.01)
        assert seqs, "the request never reached the engine"
    wait_until_idle(engine)
    assert seqs[0].finish_reason == "abort" and len(seqs[0].output) < seqs[0].max_tokens  # stopped early
    canary(client)


def test_chunked_body_over_the_limit_gets_413(srv, client):
    # No Content-Length to refuse up front: the limit applies while the body streams in.
    def chunks():
        yield b'{"model": "tiny", "prompt": "'
        for _ in range(80):
            yield b"x" * 1024
        yield b'"}'

    resp = httpx2.post(
        srv.url + "/v1/completions",
        content=chunks(),
        headers={"content-type": "application/json"},
        timeout=60,
    )
    assert "content-length" not in resp.request.headers
    assert_openai_error(resp, 413)
    canary(client)


def wait_until_idle(engine, timeout=60.0):
    """Bounded wait until the engine holds no request; then every cache block must be free."""
    deadline = time.monotonic() + timeout
    while engine.seqs and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not engine.seqs and engine.blocks.num_free == engine.blocks.num_blocks


def test_overload_gets_a_fast_503_not_a_hang(start_server):
    """Two requests hold the server's two slots (streaming, through stop tokens, for most of the
    context); while they are still generating, four more get 503 "overloaded" at once instead of
    queueing; once the holders hang up, the server serves again."""
    s = start_server(max_pending=2)
    engine = s.engine
    hold = dict(CHAT, max_tokens=2000, temperature=0, stream=True, ignore_eos=True)
    with contextlib.ExitStack() as stack:
        held = [
            stack.enter_context(httpx2.stream("POST", s.url + CH, json=hold, timeout=60)) for _ in range(2)
        ]
        lines = [r.iter_lines() for r in held]
        for it in lines:  # each holder's first event: its request was accepted
            assert next(line for line in it if line.startswith("data: "))
        deadline = time.monotonic() + 60
        while len(engine.seqs) < 2 and time.monotonic() < deadline:  # accepted requests join at the next step
            time.sleep(0.01)
        assert len(engine.seqs) == 2
        aclient = openai.AsyncOpenAI(base_url=s.url + "/v1", api_key="x", max_retries=0, timeout=60)

        async def refused():
            with pytest.raises(openai.APIStatusError) as e:
                await aclient.chat.completions.create(
                    model="tiny", max_tokens=2, temperature=0, messages=[{"role": "user", "content": "go"}]
                )
            return e.value

        async def main():
            return await asyncio.gather(*(refused() for _ in range(4)))

        for e in asyncio.run(main()):
            assert e.status_code == 503 and e.body["code"] == "overloaded", e.body
        # Refused at once, not after waiting for a slot: both holders are still mid-generation and stream on.
        assert len(engine.seqs) == 2  # a finished request leaves engine.seqs
        for it in lines:
            assert next(line for line in it if line.startswith("data: ")) != "data: [DONE]"
    wait_until_idle(engine)  # the holders hung up: their requests are aborted and the slots free
    canary(openai.OpenAI(base_url=s.url + "/v1", api_key="x", max_retries=0))


def test_prompt_checks_are_sampling_check_prompt(srv):
    """The server runs the one prompt check (sampling.check_prompt): its messages come back as they are,
    with OpenAI's `param` naming the field to fix and `code` saying which limit broke."""
    from qwen2.sampling import check_prompt
    from qwen2.tokenizer.chat import encode_chat

    limits = srv.app.state.server
    cases = [  # (prompt, max_tokens, param, code)
        ([1] * (limits.max_model_len - 1), 2, "max_tokens", "context_length_exceeded"),
        ([1] * limits.max_model_len, 1, "max_tokens", "context_length_exceeded"),
        ([1, limits.vocab], 1, "prompt", "invalid_value"),
    ]
    for prompt, max_tokens, param, code in cases:
        with pytest.raises(ValueError) as want:
            check_prompt(
                prompt,
                context=limits.max_model_len,
                vocab_size=limits.vocab,
                max_new_tokens=max_tokens,
                limit=limits.limit,
            )
        resp = post(srv, "/v1/completions", dict(COMPLETION, prompt=prompt, max_tokens=max_tokens))
        assert_openai_error(resp, 400, param)
        assert resp.json()["error"]["message"] == str(want.value) and resp.json()["error"]["code"] == code
    # Chat without max_tokens takes the room left; a conversation that fills the context alone is the
    # messages' fault.
    messages = [{"role": "user", "content": "hi " * limits.max_model_len}]
    ids, _ = encode_chat(srv.tokenizer, messages, add_generation_prompt=True)
    with pytest.raises(ValueError) as want:
        check_prompt(ids, context=limits.max_model_len, vocab_size=limits.vocab, limit=limits.limit)
    resp = post(srv, "/v1/chat/completions", {"model": "tiny", "messages": messages})
    assert_openai_error(resp, 400, "messages")
    assert resp.json()["error"]["message"] == str(want.value)
    assert resp.json()["error"]["code"] == "context_length_exceeded"
