"""A scripted OpenAI-compatible server for the synthesis tests: GET /v1/models and POST /v1/completions,
with replies chosen by the test (`reply(prompt, body) -> list of n texts`) and faults injected by
`fault(prompt, attempt) -> None | 429 | 500 | "timeout"`. Every request is recorded."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Scripted:
    def __init__(self, reply, fault=None, delay=0.0):
        self.reply, self.fault, self.delay = reply, fault, delay
        self.requests: list[str] = []  # prompts, in arrival order
        self.lock = threading.Lock()
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _send(self, code, obj):
                data = json.dumps(obj).encode()
                try:
                    self.send_response(code)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (a timeout)

            def do_GET(self):
                if self.path.rstrip("/") == "/v1/models":
                    self._send(200, {"object": "list", "data": [{"id": "scripted", "object": "model"}]})
                else:
                    self._send(404, {"error": "not found"})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                prompt = body["prompt"]
                with owner.lock:
                    attempt = sum(p == prompt for p in owner.requests)
                    owner.requests.append(prompt)
                fault = owner.fault(prompt, attempt) if owner.fault else None
                if fault == "timeout":
                    time.sleep(2.0)
                    return self._send(200, {"choices": []})
                if fault:
                    return self._send(fault, {"error": {"message": "scripted fault"}})
                time.sleep(owner.delay)
                try:
                    texts = owner.reply(prompt, body)
                    assert len(texts) == body.get("n", 1)
                except Exception as e:  # a test's script failed: 400, which the client does not retry
                    return self._send(400, {"error": {"message": f"script: {e!r}"}})
                self._send(
                    200,
                    {
                        "object": "text_completion",
                        "model": "scripted",
                        "choices": [
                            {"index": i, "text": t, "finish_reason": "stop"} for i, t in enumerate(texts)
                        ],
                    },
                )

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()

    def count(self, needle: str) -> int:
        with self.lock:
            return sum(needle in p for p in self.requests)
