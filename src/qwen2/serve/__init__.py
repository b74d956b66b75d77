"""OpenAI-compatible serving over one continuous-batching Engine: `create_app(engine, tokenizer)` and
`serve(model_dir)` (what `qwen2 serve` runs). Modules: protocol (schema, strict JSON, errors), runtime
(the engine thread), choices (detokenize, stop strings, logprobs), chat / completions (the endpoints),
app (routes, auth, limits), page (the chat page at /)."""

from qwen2.serve.app import create_app, serve

__all__ = ["create_app", "serve"]
