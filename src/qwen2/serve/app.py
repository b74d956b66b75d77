"""The OpenAI-compatible HTTP API over one Engine (FastAPI): the routes, and `serve`, what `qwen2 serve` runs.

Endpoints: GET /health, GET /v1/models, GET /v1/models/{id}, POST /v1/chat/completions,
POST /v1/completions, and the chat page at GET /. Request bodies are read by hand (Server.body: size
limit, strict JSON) and validated with protocol.py's models, so every bad request gets a 4xx in
OpenAI's error body; a client that goes away has its requests aborted and their cache freed.

This module is the top of qwen2.serve: it imports the Server (server.py) and the endpoints, and nothing
in the package imports it but __init__. `serve` lives here, not beside Server, because it calls
create_app, which builds a Server: in server.py that would be an import circle.
"""

from __future__ import annotations

import contextlib
import html
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
from qwen2.serve.page import PAGE
from qwen2.serve.protocol import APIError, ChatRequest, CompletionRequest, validate
from qwen2.serve.server import Server
from qwen2.tokenizer.bpe import load_tokenizer


def create_app(
    engine, tokenizer, *, model_name: str = "qwen2", api_key: str | None = None, **limits
) -> FastAPI:
    """The FastAPI app; `limits`: max_body_bytes, max_pending, tool_format (see Server)."""
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
        return JSONResponse(
            APIError(e.status_code, str(e.detail), code=code).body(), status_code=e.status_code
        )

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request, e):
        return JSONResponse(APIError(400, str(e)[:500]).body(), status_code=400)

    @app.exception_handler(Exception)
    async def _bug(request, e):  # not bad input: a bug; still in OpenAI's shape
        error = APIError(500, f"internal error: {type(e).__name__}", type="server_error")
        return JSONResponse(error.body(), status_code=500)

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


def serve(
    model_dir: str,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    served_model_name: str | None = None,
    api_key: str | None = None,
    dtype: str | None = None,
    dual_chunk_attention: bool = False,
    **engine_kwargs,
) -> None:
    """`qwen2 serve`: load the checkpoint and its tokenizer, and serve until interrupted."""
    # Here, not at the top: an optional dependency that create_app (tests, embedders) does not need.
    uvicorn = require("uvicorn", "serve", "serving over HTTP")
    model = load_model(
        model_dir, dtype=getattr(torch, dtype) if dtype else None, dual_chunk_attention=dual_chunk_attention
    ).eval()
    tokenizer = load_tokenizer(model_dir)
    tokenizer.check_vocab(model.config.vocab_size)
    name = served_model_name or os.path.basename(os.path.normpath(model_dir))
    app = create_app(Engine(model, **engine_kwargs), tokenizer, model_name=name, api_key=api_key)
    uvicorn.run(app, host=host, port=port, log_level="info")
