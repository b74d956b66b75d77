"""OpenAI-compatible serving over one continuous-batching Engine: `create_app(engine, tokenizer)` and
`serve(model_dir)` (what `qwen2 serve` runs). Modules, bottom to top: protocol (schema, strict JSON,
errors, SSE), limits (per-request caps), guard (API key, cross-site defence), deadlines (read
deadlines), engine_thread (the engine on its own thread: fair admission, faults), choices (one
choice's text, stop strings, logprobs), server (the Server every endpoint shares), chat_completions /
completions (the endpoints), page (the chat page at /), app (routes, serve). Nothing here imports app
but this file."""

import importlib

from qwen2.extras import require

# Every module here imports fastapi (or pydantic, which it brings); checked once, first, so a missing
# extra is one line naming the fix instead of a traceback from whichever module came first.
require("fastapi", "serve", "qwen2.serve (the OpenAI-compatible server)")

__all__ = ["create_app", "serve"]


def __getattr__(name: str):
    # Lazy (PEP 562), like qwen2/__init__.py: importing one module of the package (qwen2.serve.protocol,
    # say) runs this file first, and must not load the routes and every endpoint with it.
    if name in __all__:
        return getattr(importlib.import_module("qwen2.serve.app"), name)
    raise AttributeError(f"module 'qwen2.serve' has no attribute {name!r}")
