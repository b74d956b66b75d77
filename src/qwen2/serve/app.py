"""The OpenAI-compatible HTTP API over one Engine (FastAPI): the routes, and `serve`, what `qwen2 serve` runs.

Endpoints: GET /health, GET /v1/models, GET /v1/models/{id}, POST /v1/chat/completions,
POST /v1/completions, and the chat page at GET /. Request bodies are read by hand (Server.body: size
limit, strict JSON) and validated with protocol.py's models, so every bad request gets a 4xx in
OpenAI's error body; a client that goes away has its requests aborted and their cache freed.

Hardening (issue 18): heavy work off the event loop under per-request caps (server.py, limits.py),
fair admission and engine faults contained to their requests (engine_thread.py), read deadlines
(deadlines.py), and the site guard without an API key (guard.py).

This module is the top of qwen2.serve: it imports the Server (server.py) and the endpoints, and nothing
in the package imports it but __init__. `serve` lives here, not beside Server, because it calls
create_app, which builds a Server: in server.py that would be an import circle.
"""

from __future__ import annotations

import contextlib
import html
import logging
import os

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from qwen2.checkpoint import load_model
from qwen2.engine.engine import Engine
from qwen2.extras import require
from qwen2.serve.chat_completions import chat_completions
from qwen2.serve.completions import completions
from qwen2.serve.deadlines import BodyDeadline, uvicorn_config
from qwen2.serve.guard import resolve_api_key
from qwen2.serve.limits import Limits
from qwen2.serve.page import PAGE
from qwen2.serve.protocol import APIError
from qwen2.serve.server import Server
from qwen2.tokenizer.bpe import load_tokenizer

log = logging.getLogger("qwen2.serve")


def create_app(
    engine, tokenizer, *, model_name: str = "qwen2", api_key: str | None = None, **limits
) -> FastAPI:
    """The FastAPI app; `limits`: limits.Limits' fields, tool_format, allowed_hosts (see Server)."""
    srv = Server(engine, tokenizer, model_name=model_name, api_key=api_key, **limits)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        srv.close()

    app = FastAPI(title="qwen2", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.server = srv

    @app.exception_handler(APIError)
    async def _api_error(request, e: APIError):
        # 408: the body never arrived, so the connection cannot carry another request.
        headers = {"connection": "close"} if e.status == 408 else None
        return JSONResponse(e.body(), status_code=e.status, headers=headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, e):
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
        return JSONResponse(
            APIError(e.status_code, str(e.detail), code=code).body(), status_code=e.status_code
        )

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request, e):
        return JSONResponse(APIError(400, str(e)[:500]).body(), status_code=400)

    @app.exception_handler(Exception)
    async def _bug(request, e):  # not bad input: a bug; still in OpenAI's shape, logged in one line
        log.error("%s %s failed: %s: %s", request.method, request.url.path, type(e).__name__, e)
        error = APIError(500, f"internal error: {type(e).__name__}", type="server_error")
        return JSONResponse(error.body(), status_code=500)

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return PAGE.replace("__MODEL__", html.escape(srv.model_name))

    @app.get("/health")
    async def health():
        eng = srv.engine
        if not eng.alive():
            raise APIError(503, "the engine thread has stopped", type="server_error", code="engine_down")
        if not eng.healthy():
            raise APIError(
                503,
                f"the engine's last {eng.failed_steps} steps failed: {eng.last_error}",
                type="server_error",
                code="engine_failing",
            )
        return {"status": "ok", "pending": eng.pending(), "last_error": eng.last_error}

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
        return await chat_completions(srv, await srv.body(request), request)

    @app.post("/v1/completions")
    async def complete(request: Request):
        return await completions(srv, await srv.body(request), request)

    app.add_middleware(BodyDeadline, timeout=srv.limits.body_timeout)
    return app


def serve(
    model_dir: str,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    served_model_name: str | None = None,
    api_key: str | None = None,
    api_key_file: str | None = None,
    allowed_hosts: tuple[str, ...] = (),
    dtype: str | None = None,
    dual_chunk_attention: bool = False,
    check_finite: bool = False,
    limits: dict | None = None,
    **engine_kwargs,
) -> None:
    """`qwen2 serve`: load the checkpoint and its tokenizer, and serve until interrupted. The API key:
    `api_key`, else `api_key_file`'s first line, else $QWEN2_API_KEY (guard.py); `limits`: limits.Limits'
    fields."""
    # Here, not at the top: an optional dependency that create_app (tests, embedders) does not need.
    uvicorn = require("uvicorn", "serve", "serving over HTTP")
    api_key = resolve_api_key(api_key, api_key_file)
    Limits(**(limits or {}))  # a bad flag fails in one line now, not after the model has loaded
    model = load_model(
        model_dir,
        dtype=getattr(torch, dtype) if dtype else None,
        dual_chunk_attention=dual_chunk_attention,
        check_finite=check_finite,
    ).eval()
    tokenizer = load_tokenizer(model_dir)
    tokenizer.check_vocab(model.config.vocab_size)
    name = served_model_name or os.path.basename(os.path.normpath(model_dir))
    bound = () if _is_any(host) else (host,)
    app = create_app(
        Engine(model, **engine_kwargs),
        tokenizer,
        model_name=name,
        api_key=api_key,
        allowed_hosts=(*allowed_hosts, *bound),
        **(limits or {}),
    )
    uvicorn.Server(uvicorn_config(app, host=host, port=port, limits=app.state.server.limits)).run()


def _is_any(host: str) -> bool:
    return host in ("", "0.0.0.0", "::")
