"""The server under hostile load (issue 18): heavy requests do not stall the others, one request cannot
take every slot, an engine fault fails only its requests, slow clients meet read deadlines, and a web
page cannot drive a server that has no API key. Each runs a real server (uvicorn in a thread) over
the tiny random checkpoint."""

import json
import logging
import socket
import threading
import time

import httpx2
import openai
import pytest

from qwen2.engine.engine import Engine, StepOutput
from qwen2.serve import create_app
from qwen2.serve.deadlines import uvicorn_config
from qwen2.serve.guard import ENV_KEY, resolve_api_key

CH, CO = "/v1/chat/completions", "/v1/completions"
HI = [{"role": "user", "content": "hi"}]
JSON = {"content-type": "application/json"}


def post(s, path, body, timeout=120, **headers):
    return httpx2.post(s.url + path, content=json.dumps(body), headers={**JSON, **headers}, timeout=timeout)


def port(s) -> int:
    return int(s.url.rsplit(":", 1)[1])


def events(resp):
    """A stream's `data:` payloads, as they arrive."""
    for line in resp.iter_lines():
        if line.startswith("data: "):
            yield line[len("data: ") :]


class Observer(threading.Thread):
    """A streaming chat that records when each event arrives."""

    def __init__(self, s, max_tokens=1500):
        super().__init__(daemon=True)
        self.s, self.max_tokens, self.times, self.started = s, max_tokens, [], threading.Event()

    def run(self):
        body = {"model": "tiny", "messages": HI, "max_tokens": self.max_tokens, "stream": True}
        body.update(temperature=0, ignore_eos=True)
        with httpx2.stream("POST", self.s.url + CH, json=body, timeout=300) as resp:
            for _ in events(resp):
                self.times.append(time.monotonic())
                self.started.set()


# ---- 1. heavy work off the event loop, bounded by caps ------------------------------------------------
@pytest.fixture
def serve_process(tiny_chat_checkpoint, tmp_path):
    """`qwen2 serve` in its own process (so this test's clients do not share its GIL), with `flags`."""
    import os
    import subprocess
    import sys
    from pathlib import Path
    from types import SimpleNamespace

    procs = []

    def start(*flags):
        src = str(Path(__file__).resolve().parents[1] / "src")
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([src, os.environ.get("PYTHONPATH", "")]))
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            free = sock.getsockname()[1]
        cmd = [sys.executable, "-m", "qwen2.cli", "serve", "--model", str(tiny_chat_checkpoint)]
        log = tmp_path / "serve.log"
        proc = subprocess.Popen(
            [*cmd, "--served-model-name", "tiny", "--port", str(free), *flags],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=log.open("w"),
        )
        procs.append(proc)
        url = f"http://127.0.0.1:{free}"
        for _ in range(600):  # bounded wait for the model to load
            try:
                if httpx2.get(url + "/health", timeout=1).status_code == 200:
                    return SimpleNamespace(url=url, log=log)
            except httpx2.HTTPError:
                assert proc.poll() is None, log.read_text()
                time.sleep(0.2)
        raise AssertionError("qwen2 serve did not start")

    yield start
    for proc in procs:
        proc.terminate()
        proc.wait(timeout=30)


def test_heavy_requests_stall_neither_streams_nor_health(serve_process):
    """While a multi-MB prompt is tokenised, 2,000 long messages are rendered, and echo + logprobs=20 with
    n=16 is scored and serialised, a stream keeps getting tokens and /health answers in < 100 ms (p95).
    (100,000 messages are refused by max_messages before validation, which would hold the GIL for seconds.)"""
    s = serve_process("--max-body-bytes", str(16 << 20), "--max-prompt-bytes", str(8 << 20))
    obs = Observer(s)
    obs.start()
    assert obs.started.wait(60)
    heavy = [
        (CO, {"model": "tiny", "prompt": "lorem ipsum dolor " * 200_000, "max_tokens": 1}),  # 3.6 MB
        (CH, {"model": "tiny", "messages": [{"role": "user", "content": "hi " * 300}] * 2000}),
        (CO, {"model": "tiny", "prompt": [7] * 120, "n": 16, "echo": True, "logprobs": 20, "max_tokens": 1}),
    ]
    heavy = [(path, json.dumps(body).encode()) for path, body in heavy]  # the client's work, done first
    statuses = []

    def send(path, raw):
        statuses.append(httpx2.post(s.url + path, content=raw, headers=JSON, timeout=120).status_code)

    senders = [threading.Thread(target=send, args=h, daemon=True) for h in heavy]
    begin = time.monotonic()
    for t in senders:
        t.start()
    latencies = []
    with httpx2.Client(timeout=30) as c:
        while any(t.is_alive() for t in senders):
            t0 = time.monotonic()
            assert c.get(s.url + "/health").status_code == 200
            latencies.append(time.monotonic() - t0)
            time.sleep(0.05)
    end = time.monotonic()
    for t in senders:
        t.join()
    assert sorted(statuses) == [200, 400, 400], statuses  # over the context / a cap: 400s
    assert end - begin > 1.0, "the heavy requests were not heavy: the test would prove nothing"
    assert len(latencies) >= 10
    # p95 < 100 ms; the worst sample is allowed 300 ms: on a shared 2-core machine the OS alone can
    # deschedule the server for that long (before the fix: 5-8 s).
    lat = sorted(latencies)
    p95 = lat[int(0.95 * (len(lat) - 1))]
    assert p95 < 0.1 and lat[-1] < 0.3, f"/health p95 {p95 * 1000:.0f} ms, max {lat[-1] * 1000:.0f} ms"
    during = [t for t in obs.times if begin <= t <= end]
    gaps = [b - a for a, b in zip([begin, *during], [*during, end])]
    # The observer shares engine steps with the echo request, whose prompt scoring (engine.py, per
    # position) makes a step slow: that bounds its gaps, not the event loop.
    assert during and max(gaps) < 3.0, f"the observer stream stalled for {max(gaps):.1f} s"


@pytest.mark.parametrize(
    "path,body,cap",
    [
        (CO, {"prompt": ["x"] * 401}, "max_choices"),
        (CO, {"prompt": ["x"] * 101, "n": 4}, "max_choices"),
        (CO, {"prompt": "x" * 3000}, "max_prompt_bytes"),
        (CO, {"prompt": [[5] * 100] * 30}, "max_prompt_tokens"),
        (CH, {"messages": HI * 11}, "max_messages"),
        (CH, {"messages": [{"role": "user", "content": "y" * 3000}]}, "max_prompt_bytes"),
        (
            CO,
            {"prompt": [5] * 50, "echo": True, "logprobs": 20, "n": 16, "max_tokens": 1},
            "max_logprob_entries",
        ),
        (
            CH,
            {"messages": HI, "logprobs": True, "top_logprobs": 20, "max_tokens": 100},
            "max_logprob_entries",
        ),
    ],
)
def test_each_cap_is_a_400_naming_it(start_server, path, body, cap):
    s = start_server(
        max_messages=10,
        max_prompt_bytes=2000,
        max_prompt_tokens=2000,
        max_logprob_entries=1000,
        max_pending=4,
    )
    r = post(s, path, {"model": "tiny", **body})
    assert r.status_code == 400, r.text  # never 503: retrying cannot help
    err = r.json()["error"]
    assert err["code"] == cap and "--" + cap.replace("_", "-") in err["message"]
    assert not s.engine.seqs  # refused before any work reached the engine


# ---- 2. fairness -----------------------------------------------------------------------------------
def test_a_request_with_many_choices_does_not_starve_the_others(start_server):
    """Two sequence slots; a request with 12 prompts arrives first. A one-prompt request arriving after
    it gets the next free slot (round robin), not the 13th."""
    s = start_server(engine_kwargs={"max_num_seqs": 2}, max_pending=2)
    finished = []  # times each of the big request's choices finished

    def big():
        body = {"model": "tiny", "prompt": [[5, 6]] * 12, "max_tokens": 24, "temperature": 0, "stream": True}
        with httpx2.stream("POST", s.url + CO, json=dict(body, ignore_eos=True), timeout=300) as resp:
            for e in events(resp):
                if e != "[DONE]" and json.loads(e)["choices"][0]["finish_reason"]:
                    finished.append(time.monotonic())

    t = threading.Thread(target=big, daemon=True)
    t.start()
    deadline = time.monotonic() + 60
    while not s.engine.seqs and time.monotonic() < deadline:
        time.sleep(0.01)
    r = post(
        s, CO, {"model": "tiny", "prompt": [9], "max_tokens": 2, "temperature": 0}
    )  # over max_pending's 2?
    done = time.monotonic()
    t.join(300)
    assert r.status_code == 200, r.text  # max_pending counts requests, not the big one's 12 choices
    assert len(finished) == 12
    before = sum(f < done for f in finished)
    assert before <= 4, f"{before} of the big request's 12 choices finished before the small request"


# ---- 3. engine faults ---------------------------------------------------------------------------------
def fail_once(monkeypatch, engine, after_steps=0, error=RuntimeError("injected fault")):
    """Make the engine's step raise once, after `after_steps` more good steps."""
    real, calls = engine.step, {"n": 0, "failed": False}

    def step():
        calls["n"] += 1
        if calls["n"] > after_steps and not calls["failed"]:
            calls["failed"] = True
            raise error
        return real()

    monkeypatch.setattr(engine, "step", step)
    return calls


def test_a_failing_step_ends_the_stream_with_an_error_event_and_the_server_recovers(
    start_server, monkeypatch, caplog
):
    s = start_server()
    body = {"model": "tiny", "messages": HI, "max_tokens": 500, "temperature": 0, "stream": True}
    caplog.set_level(logging.INFO, logger="qwen2.serve")
    with httpx2.stream("POST", s.url + CH, json=dict(body, ignore_eos=True), timeout=120) as resp:
        got = events(resp)
        for _ in range(3):
            next(got)
        calls = fail_once(monkeypatch, s.engine)
        rest = list(got)
    assert calls["failed"]
    assert rest[-1] == "[DONE]"
    err = json.loads(rest[-2])["error"]
    assert err["type"] == "server_error" and "injected fault" in err["message"], err
    lines = [r for r in caplog.records if "engine step failed" in r.getMessage()]
    assert len(lines) == 1 and lines[0].exc_info is None  # one line, no traceback
    assert all(r.exc_info is None for r in caplog.records if r.levelno >= logging.INFO)
    assert not s.engine.seqs and s.engine.blocks.num_free == s.engine.blocks.num_blocks
    health = httpx2.get(s.url + "/health", timeout=30)
    assert health.status_code == 200, health.text  # it is healthy: one failed step, then nothing
    ok = openai.OpenAI(base_url=s.url + "/v1", api_key="x", max_retries=0, _strict_response_validation=True)
    r = ok.chat.completions.create(model="tiny", messages=HI, max_tokens=3, temperature=0)
    assert r.usage.completion_tokens >= 1
    assert httpx2.get(s.url + "/health", timeout=30).status_code == 200


def test_a_failing_step_fails_only_the_requests_in_it(start_server, monkeypatch):
    """One sequence slot: request A runs, B waits; the step fails: A gets a 500 naming the fault, B (not
    in the step) is served."""
    s = start_server(engine_kwargs={"max_num_seqs": 1})
    results = {}

    def send(name, max_tokens):
        body = {"model": "tiny", "prompt": [5, 6], "max_tokens": max_tokens, "temperature": 0}
        results[name] = post(s, CO, dict(body, ignore_eos=True))

    a = threading.Thread(target=send, args=("a", 400), daemon=True)
    a.start()
    deadline = time.monotonic() + 60
    while not s.engine.seqs and time.monotonic() < deadline:
        time.sleep(0.01)
    b = threading.Thread(target=send, args=("b", 4), daemon=True)
    b.start()
    while s.app.state.server.engine.pending() < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    fail_once(monkeypatch, s.engine)
    a.join(120)
    b.join(120)
    assert results["a"].status_code == 500 and "injected fault" in results["a"].json()["error"]["message"]
    assert results["b"].status_code == 200, results["b"].text
    assert results["b"].json()["usage"]["completion_tokens"] == 4


def test_a_step_output_error_is_that_requests_error(start_server, monkeypatch):
    """StepOutput.error (the engine's per-request failure, e.g. non-finite logits) becomes that request's
    500 (not streamed) or error event (streamed), and the request beside it goes on."""
    s = start_server()
    engine, real = s.engine, s.engine.step
    poisoned = set()

    def step():  # the engine's contract: a failed request is dropped and reported with error=...
        outs = real()
        for i, o in enumerate(outs):
            seq = engine.seqs.get(o.request_id)
            if seq is not None and seq.prompt[:2] == [13, 13]:
                engine.abort(o.request_id)
                poisoned.add(o.request_id)
                outs[i] = StepOutput(
                    o.request_id, [], finished=True, finish_reason="error", error="non-finite logits"
                )
        return outs

    monkeypatch.setattr(engine, "step", step)
    r = post(s, CO, {"model": "tiny", "prompt": [13, 13, 5], "max_tokens": 3})
    assert r.status_code == 500 and "non-finite logits" in r.json()["error"]["message"], r.text
    body = {"model": "tiny", "prompt": [[13, 13, 5], [5, 6]], "max_tokens": 3, "stream": True}
    with httpx2.stream("POST", s.url + CO, json=body, timeout=60) as resp:
        got = list(events(resp))
    assert got[-1] == "[DONE]" and "non-finite logits" in json.loads(got[-2])["error"]["message"]
    assert post(s, CO, {"model": "tiny", "prompt": [5, 6], "max_tokens": 3}).status_code == 200
    assert httpx2.get(s.url + "/health").status_code == 200


# ---- 4. read deadlines ---------------------------------------------------------------------------------
def own_server(s, **limits):
    """A server run as `qwen2 serve` runs it (deadlines.uvicorn_config) over s's model: (port, server,
    thread)."""
    import uvicorn

    app = create_app(Engine(s.model), s.tokenizer, model_name="tiny", **limits)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(
        uvicorn_config(app, host="127.0.0.1", port=0, limits=app.state.server.limits, log_level="warning")
    )
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    assert server.started
    return sock.getsockname()[1], server, thread


def closed_within(sock, seconds) -> tuple[bool, bytes]:
    """(whether the server closed the socket within `seconds`, what it sent before)."""
    sock.settimeout(0.2)
    got, end = b"", time.monotonic() + seconds
    while time.monotonic() < end:
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            continue
        except ConnectionResetError:
            return True, got
        if not chunk:
            return True, got
        got += chunk
    return False, got


HEAD = "POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"


def test_a_half_sent_body_is_answered_408_and_closed_after_the_deadline(start_server, caplog):
    s = start_server(body_timeout=0.5)
    caplog.set_level(logging.INFO, logger="qwen2.serve")
    with socket.create_connection(("127.0.0.1", port(s))) as sock:
        sock.sendall((HEAD + "Content-Length: 100\r\n\r\n").encode() + b'{"model": "tiny"')
        t0 = time.monotonic()
        closed, got = closed_within(sock, 10)
        took = time.monotonic() - t0
    assert closed and 0.4 < took < 3, took
    assert got.startswith(b"HTTP/1.1 408") and b"request_timeout" in got, got[:300]
    assert sum("request body not complete" in r.getMessage() for r in caplog.records) == 1


def test_a_client_that_hangs_up_mid_body_is_one_log_line(start_server, caplog):
    s = start_server()
    caplog.set_level(logging.INFO)
    with socket.create_connection(("127.0.0.1", port(s))) as sock:
        sock.sendall((HEAD + "Content-Length: 100\r\n\r\n").encode() + b'{"model": "tiny"')
        time.sleep(0.3)
    deadline = time.monotonic() + 10
    while (
        not any("hung up mid-body" in r.getMessage() for r in caplog.records) and time.monotonic() < deadline
    ):
        time.sleep(0.05)
    assert sum("hung up mid-body" in r.getMessage() for r in caplog.records) == 1
    assert all(r.exc_info is None for r in caplog.records)  # no traceback anywhere
    assert httpx2.get(s.url + "/health").status_code == 200


def test_slow_headers_are_closed_after_the_header_deadline(start_server):
    s = start_server()
    p, server, thread = own_server(s, header_timeout=0.5)
    try:
        with socket.create_connection(("127.0.0.1", p)) as sock:
            t0, closed = time.monotonic(), False
            for byte in HEAD.encode():  # slowloris: a byte every 0.1 s, headers never complete
                try:
                    sock.sendall(bytes([byte]))
                except (BrokenPipeError, ConnectionResetError):
                    closed = True
                    break
                if time.monotonic() - t0 > 5:
                    break
                time.sleep(0.1)
                sock.settimeout(0.001)
                try:
                    if sock.recv(1) == b"":
                        closed = True
                        break
                except (TimeoutError, BlockingIOError):
                    pass
                except ConnectionResetError:
                    closed = True
                    break
            took = time.monotonic() - t0
        assert closed and took < 2.0, took
        # A well-behaved client on the same server is unaffected.
        r = httpx2.post(
            f"http://127.0.0.1:{p}{CO}", json={"model": "tiny", "prompt": [5], "max_tokens": 1}, timeout=60
        )
        assert r.status_code == 200
    finally:
        server.should_exit = True
        thread.join(30)


def test_a_stuck_client_does_not_keep_shutdown_from_finishing(start_server):
    s = start_server()
    p, server, thread = own_server(s, body_timeout=300, shutdown_timeout=1)
    with socket.create_connection(("127.0.0.1", p)) as sock:
        sock.sendall((HEAD + "Content-Length: 100\r\n\r\n").encode() + b'{"model"')
        time.sleep(0.3)
        t0 = time.monotonic()
        server.should_exit = True  # what SIGTERM does
        thread.join(15)
        assert not thread.is_alive() and time.monotonic() - t0 < 6


# ---- 5. security defaults ------------------------------------------------------------------------------
def test_cross_site_requests_are_refused_without_an_api_key(start_server):
    s = start_server()
    body = {"model": "tiny", "prompt": [5], "max_tokens": 1}
    simple = httpx2.post(s.url + CO, content=json.dumps(body), headers={"content-type": "text/plain"})
    assert simple.status_code == 415 and simple.json()["error"]["code"] == "unsupported_media_type"
    form = httpx2.post(s.url + CO, data={"model": "tiny"})
    assert form.status_code == 415
    evil = post(s, CO, body, origin="http://evil.example")
    assert evil.status_code == 403 and evil.json()["error"]["code"] == "origin_not_allowed"
    assert post(s, CO, body, origin="null").status_code == 403
    rebound = post(s, CO, body, host="evil.example")  # DNS rebinding: a name that resolves to us
    assert rebound.status_code == 403 and rebound.json()["error"]["code"] == "host_not_allowed"
    assert httpx2.get(s.url + "/v1/models", headers={"host": "evil.example"}).status_code == 403
    # The chat page (same origin), localhost and plain clients are served.
    assert post(s, CO, body, origin=s.url).status_code == 200
    assert post(s, CO, body, origin="http://localhost:3000", host=f"localhost:{port(s)}").status_code == 200
    assert post(s, CO, body, **{"content-type": "application/json; charset=utf-8"}).status_code == 200
    assert post(s, CO, body).status_code == 200


def test_with_an_api_key_the_key_decides_in_constant_time(start_server, monkeypatch):
    import qwen2.serve.guard as guard

    s = start_server(api_key="sekret")
    compared = []
    real = guard.hmac.compare_digest
    monkeypatch.setattr(guard.hmac, "compare_digest", lambda a, b: compared.append(1) or real(a, b))
    body = {"model": "tiny", "prompt": [5], "max_tokens": 1}
    assert (
        post(s, CO, body, origin="http://elsewhere.example", authorization="Bearer sekret").status_code == 200
    )
    assert post(s, CO, body, authorization="Bearer sekreT").status_code == 401
    assert compared


def test_the_api_key_comes_from_a_file_or_the_environment(tmp_path, monkeypatch):
    monkeypatch.delenv(ENV_KEY, raising=False)
    assert resolve_api_key() is None
    monkeypatch.setenv(ENV_KEY, "from-env")
    assert resolve_api_key() == "from-env"
    f = tmp_path / "key"
    f.write_text("from-file\n")
    assert resolve_api_key(api_key_file=str(f)) == "from-file"
    assert resolve_api_key("flag", str(f)) == "flag"
    f.write_text("")
    with pytest.raises(ValueError, match="empty"):
        resolve_api_key(api_key_file=str(f))
    with pytest.raises(ValueError, match="nope"):
        resolve_api_key(api_key_file=str(tmp_path / "nope"))


# ---- 6. the engine thread's torch threads ------------------------------------------------------------
def test_the_engine_thread_uses_the_process_thread_count(start_server, monkeypatch):
    import torch

    s = start_server()
    seen, real = [], s.engine.step
    monkeypatch.setattr(s.engine, "step", lambda: seen.append(torch.get_num_threads()) or real())
    assert post(s, CO, {"model": "tiny", "prompt": [5], "max_tokens": 2}).status_code == 200
    assert seen and set(seen) == {torch.get_num_threads()}
