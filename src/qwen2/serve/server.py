"""What every endpoint shares: the `Server` object (authentication, the body limit, request checks,
the engine thread, usage counts). The routes (app.py) build one per app and hand it to the endpoint
functions (chat_completions.py, completions.py), which import this module and never the routes.

Usage counts are exact: prompt_tokens counts each prompt once (however large `n`), completion_tokens
every token the engine generated for every choice, stop tokens included.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

from fastapi import Request

from qwen2.sampling import SamplingParams, check_prompt
from qwen2.serve.choices import Choice
from qwen2.serve.engine_thread import AsyncEngine, Overloaded
from qwen2.serve.protocol import APIError, parse_json


class Server:
    """What the routes share: tokenizer, engine thread, names and limits."""

    def __init__(
        self,
        engine,
        tokenizer,
        *,
        model_name: str,
        api_key: str | None = None,
        max_body_bytes: int = 4 << 20,
        max_pending: int = 256,
        tool_format: str = "hermes",
    ):
        self.tokenizer, self.model_name, self.api_key = tokenizer, model_name, api_key
        self.max_body_bytes, self.tool_format = max_body_bytes, tool_format
        self.engine = AsyncEngine(engine, max_pending=max_pending)
        # What bounds prompt + output (as Engine.check_request): max_model_len, or a smaller KV cache.
        self.max_model_len = min(engine.max_model_len, engine.capacity)
        by_len = engine.max_model_len <= engine.capacity
        self.limit = "this server's context (--max-model-len)" if by_len else "this server's KV cache"
        self.vocab = min(len(tokenizer), engine.config.vocab_size)
        self.stop_ids = frozenset(i for i in (tokenizer.endoftext_id, tokenizer.im_end_id) if i is not None)
        self.created = int(time.time())

    # ---- request plumbing ------------------------------------------------------------------------
    def auth(self, request: Request) -> None:
        if self.api_key is not None and request.headers.get("authorization", "") != f"Bearer {self.api_key}":
            raise APIError(
                401,
                "invalid or missing API key (send 'Authorization: Bearer <key>')",
                type="authentication_error",
                code="invalid_api_key",
            )

    async def body(self, request: Request) -> dict:
        self.auth(request)
        too_large = APIError(413, f"request body over {self.max_body_bytes} bytes", code="request_too_large")
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
            raise too_large
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > self.max_body_bytes:
                raise too_large
            chunks.append(chunk)
        return parse_json(b"".join(chunks))

    def check_model(self, name: str) -> None:
        if name != self.model_name:
            raise APIError(
                404,
                f"the model {name!r} does not exist; this server serves {self.model_name!r}",
                param="model",
                code="model_not_found",
            )

    def check_prompt(self, ids: list[int], asked: int | None, *, param: str, budget: str) -> int:
        """How many tokens to generate for prompt `ids`: `asked`, or all the room left when None.
        sampling.check_prompt (the one prompt check) decides; its ValueError becomes a 400 with the
        same message, `param` naming the field to fix: the prompt's (`param`: "prompt", "prompt.1",
        "messages") when the ids are bad or fill the context alone, else `budget` ("max_tokens")."""
        try:  # context len + 1: the ids alone (empty, outside the vocabulary), whatever their length
            check_prompt(ids, context=len(ids) + 1, vocab_size=self.vocab)
        except ValueError as e:
            raise APIError(400, str(e), param=param, code="invalid_value") from None
        try:
            check_prompt(
                ids, context=self.max_model_len, vocab_size=self.vocab, max_new_tokens=asked, limit=self.limit
            )
        except ValueError as e:
            field = param if asked is None else budget
            raise APIError(400, str(e), param=field, code="context_length_exceeded") from None
        return self.max_model_len - len(ids) if asked is None else asked

    def start(self, choices: list[Choice], queue: asyncio.Queue, req, max_tokens: int, **kw) -> None:
        """Submit each choice to the engine; choice i samples with seed + i (OpenAI's seed is per request)."""
        try:
            for c in choices:
                params = SamplingParams(
                    temperature=req.temperature,
                    top_p=req.top_p,
                    max_new_tokens=max_tokens,
                    presence_penalty=req.presence_penalty,
                    frequency_penalty=req.frequency_penalty,
                    seed=None if req.seed is None else req.seed + c.index,
                    stop_token_ids=[] if req.ignore_eos else sorted(c.stop_token_ids),
                )
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

    async def run(
        self, choices: list[Choice], queue: asyncio.Queue, request: Request | None
    ) -> AsyncIterator[Choice]:
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
                    raise APIError(
                        500, "the engine failed on this request", type="server_error", code="engine_error"
                    )
                c.consume(out)
                if c.done and not out.finished:  # a stop string ended it before the engine did
                    self.engine.abort(c.request_id)
                yield c
        finally:
            self.abort(choices)

    def usage(self, prompts: list[list[int]], choices: list[Choice]) -> dict:
        p, c = sum(len(x) for x in prompts), sum(len(ch.tokens) for ch in choices)
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}
