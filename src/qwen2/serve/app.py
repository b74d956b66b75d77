"""The OpenAI-compatible HTTP API over one Engine (FastAPI).

Endpoints: GET /health, GET /v1/models, GET /v1/models/{id}, POST /v1/chat/completions,
POST /v1/completions, and the chat page at GET /. Request bodies are read by hand (size limit, strict
JSON) and validated with protocol.py's models, so every bad request gets a 4xx in OpenAI's error body;
a client that goes away has its requests aborted and their cache freed.

Usage counts are exact: prompt_tokens counts each prompt once (however large `n`), completion_tokens
every token the engine generated for every choice, stop tokens included.
"""

from __future__ import annotations

import asyncio
import contextlib
import html
import json
import os
import time
import uuid
from typing import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from qwen2.serve.choices import Choice, TextStream, chat_logprobs, completion_logprobs
from qwen2.serve.protocol import APIError, ChatRequest, CompletionRequest, parse_json, validate
from qwen2.serve.engine_thread import AsyncEngine, Overloaded


class Server:
    """What the routes share: tokenizer, engine thread, names and limits."""

    def __init__(self, engine, tokenizer, *, model_name: str, api_key: str | None = None,
                 max_body_bytes: int = 4 << 20, max_pending: int = 256, tool_format: str = "hermes"):
        self.tokenizer, self.model_name, self.api_key = tokenizer, model_name, api_key
        self.max_body_bytes, self.tool_format = max_body_bytes, tool_format
        self.engine = AsyncEngine(engine, max_pending=max_pending)
        self.max_model_len = min(engine.max_model_len, engine.capacity)
        self.vocab = min(len(tokenizer), engine.config.vocab_size)
        self.stop_ids = frozenset(i for i in (tokenizer.endoftext_id, tokenizer.im_end_id) if i is not None)
        self.created = int(time.time())

    # ---- request plumbing ------------------------------------------------------------------------
    def auth(self, request: Request) -> None:
        if self.api_key is not None and request.headers.get("authorization", "") != f"Bearer {self.api_key}":
            raise APIError(401, "invalid or missing API key (send 'Authorization: Bearer <key>')",
                           type="authentication_error", code="invalid_api_key")

    async def body(self, request: Request) -> dict:
        self.auth(request)
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
            raise APIError(413, f"request body over {self.max_body_bytes} bytes", code="request_too_large")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > self.max_body_bytes:
                raise APIError(413, f"request body over {self.max_body_bytes} bytes", code="request_too_large")
            chunks.append(chunk)
        return parse_json(b"".join(chunks))

    def check_model(self, name: str) -> None:
        if name != self.model_name:
            raise APIError(404, f"the model {name!r} does not exist; this server serves {self.model_name!r}",
                           param="model", code="model_not_found")

    def check_ids(self, ids: list[int], param: str) -> None:
        if not ids:
            raise APIError(400, f"{param}: the prompt is empty", param=param, code="invalid_value")
        bad = next((t for t in ids if not 0 <= t < self.vocab), None)
        if bad is not None:
            raise APIError(400, f"{param}: token id {bad} is outside the vocabulary [0, {self.vocab})",
                           param=param, code="invalid_token_id")

    def max_tokens(self, prompt_len: int, asked: int | None, param: str) -> int:
        room = self.max_model_len - prompt_len
        if asked is None:
            if room < 1:
                raise APIError(400, f"the prompt has {prompt_len} tokens; this model's context is {self.max_model_len}",
                               param="messages" if param != "max_tokens" else "prompt", code="context_length_exceeded")
            return room
        if asked > room:
            raise APIError(400, f"prompt ({prompt_len} tokens) + {param} ({asked}) exceeds the context of "
                           f"{self.max_model_len} tokens", param=param, code="context_length_exceeded")
        return asked

    def start(self, choices: list[Choice], queue: asyncio.Queue, req, max_tokens: int, **kw) -> None:
        """Submit each choice to the engine; choice i samples with seed + i (OpenAI's seed is per request)."""
        from qwen2.sampling import SamplingParams

        try:
            for c in choices:
                params = SamplingParams(temperature=req.temperature, top_p=req.top_p, max_new_tokens=max_tokens,
                                        presence_penalty=req.presence_penalty, frequency_penalty=req.frequency_penalty,
                                        seed=None if req.seed is None else req.seed + c.index,
                                        stop_token_ids=[] if req.ignore_eos else sorted(c.stop_token_ids))
                c.request_id, _ = self.engine.submit(c.prompt, queue=queue, params=params, **kw)
        except Overloaded as e:
            self.abort(choices)
            raise APIError(503, str(e), type="server_overloaded", code="overloaded") from None
        except ValueError as e:
            self.abort(choices)
            raise APIError(400, str(e), code="invalid_value") from None

    def abort(self, choices: list[Choice]) -> None:
        for c in choices:
            if c.request_id and not c.done:
                self.engine.abort(c.request_id)

    async def run(self, choices: list[Choice], queue: asyncio.Queue, request: Request | None) -> AsyncIterator[Choice]:
        """Feed engine outputs to their choices; yield each choice that advanced. Aborts what is left
        when the consumer stops early (a disconnect cancels it) or when `request` disconnects."""
        by_id = {c.request_id: c for c in choices}
        checked = time.monotonic()
        try:
            while any(not c.done for c in choices):
                try:
                    out = await asyncio.wait_for(queue.get(), timeout=0.5)
                except asyncio.TimeoutError:
                    out = None
                if request is not None and time.monotonic() - checked >= 0.5:  # also while outputs flow
                    checked = time.monotonic()
                    if await request.is_disconnected():
                        return
                if out is None:
                    continue
                c = by_id.get(out.request_id)
                if c is None or c.done:
                    continue
                if out.finish_reason == "error":
                    raise APIError(500, "the engine failed on this request", type="server_error", code="engine_error")
                c.consume(out)
                if c.done and not out.finished:  # a stop string ended it before the engine did
                    self.engine.abort(c.request_id)
                yield c
        finally:
            self.abort(choices)

    def usage(self, prompts: list[list[int]], choices: list[Choice]) -> dict:
        p, c = sum(len(x) for x in prompts), sum(len(ch.tokens) for ch in choices)
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


def sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def create_app(engine, tokenizer, *, model_name: str = "qwen2", api_key: str | None = None, **limits) -> FastAPI:
    """The FastAPI app; `limits`: max_body_bytes, max_pending, tool_format (see Server)."""
    from qwen2.serve.chat_completions import chat_completions
    from qwen2.serve.completions import completions
    from qwen2.serve.page import PAGE

    srv = Server(engine, tokenizer, model_name=model_name, api_key=api_key, **limits)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        srv.engine.close()

    app = FastAPI(title="qwen2", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.server = srv

    @app.exception_handler(APIError)
    async def _api_error(request, e: APIError):
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, e):
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
        return JSONResponse(APIError(e.status_code, str(e.detail), code=code).body(), status_code=e.status_code)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request, e):
        return JSONResponse(APIError(400, str(e)[:500]).body(), status_code=400)

    @app.exception_handler(Exception)
    async def _bug(request, e):  # not bad input: a bug; still in OpenAI's shape
        return JSONResponse(APIError(500, f"internal error: {type(e).__name__}", type="server_error").body(), status_code=500)

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return PAGE.replace("__MODEL__", html.escape(srv.model_name))

    @app.get("/health")
    async def health():
        if srv.engine.error is not None or not srv.engine.alive():
            raise APIError(503, "the engine thread has stopped", type="server_error", code="engine_down")
        return {"status": "ok", "pending": srv.engine.pending()}

    def card() -> dict:
        return {"id": srv.model_name, "object": "model", "created": srv.created, "owned_by": "qwen2"}

    @app.get("/v1/models")
    async def models(request: Request):
        srv.auth(request)
        return {"object": "list", "data": [card()]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str, request: Request):
        srv.auth(request)
        srv.check_model(model_id)
        return card()

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        req = validate(ChatRequest, await srv.body(request))
        return await chat_completions(srv, req, request)

    @app.post("/v1/completions")
    async def complete(request: Request):
        req = validate(CompletionRequest, await srv.body(request))
        return await completions(srv, req, request)

    return app


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def streaming(gen) -> StreamingResponse:
    return StreamingResponse(gen, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


def serve(model_dir: str, *, host: str = "127.0.0.1", port: int = 8000, served_model_name: str | None = None,
          api_key: str | None = None, dtype: str | None = None, **engine_kwargs) -> None:
    """`qwen2 serve`: load the checkpoint and its tokenizer, and serve until interrupted."""
    import torch
    import uvicorn

    from qwen2.checkpoint import load_model
    from qwen2.engine.engine import Engine
    from qwen2.tokenizer.bpe import load_tokenizer

    model = load_model(model_dir, dtype=getattr(torch, dtype) if dtype else None).eval()
    tokenizer = load_tokenizer(model_dir)
    tokenizer.check_vocab(model.config.vocab_size)
    name = served_model_name or os.path.basename(os.path.normpath(model_dir))
    app = create_app(Engine(model, **engine_kwargs), tokenizer, model_name=name, api_key=api_key)
    uvicorn.run(app, host=host, port=port, log_level="info")
