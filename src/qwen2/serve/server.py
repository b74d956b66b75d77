"""What every endpoint shares: the `Server` object (authentication and the site guard, the body limit
and read deadline, request caps, the worker pool, the engine thread, usage counts, error rendering).
The routes (app.py) build one per app and hand it to the endpoint functions (chat_completions.py,
completions.py), which import this module and never the routes.

The event loop only moves bytes: parsing, validation, chat rendering, tokenising, the prompt checks,
logprob building and JSON serialisation of a reply run on a small worker pool (`offload`), bounded
first by limits.py's caps, so /health and every stream keep flowing while a heavy request is prepared.

Usage counts are exact: prompt_tokens counts each prompt once (however large `n`), completion_tokens
every token the engine generated for every choice, stop tokens included.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor

from fastapi import Request
from fastapi.responses import Response
from starlette.requests import ClientDisconnect

from qwen2.grammar import GrammarCompiler
from qwen2.sampling import check_prompt
from qwen2.serve.choices import Choice
from qwen2.serve.deadlines import TIMED_OUT
from qwen2.serve.engine_thread import AsyncEngine, Overloaded
from qwen2.serve.guard import check_json_content_type, check_site, key_matches
from qwen2.serve.limits import Limits
from qwen2.serve.protocol import DONE, APIError, sse

log = logging.getLogger("qwen2.serve")
WORKERS = 2  # threads preparing requests and replies; more would only contend for the GIL


class Server:
    """What the routes share: tokenizer, engine thread, worker pool, names and limits (limits.Limits'
    fields as keywords)."""

    def __init__(
        self,
        engine,
        tokenizer,
        *,
        model_name: str,
        api_key: str | None = None,
        tool_format: str = "hermes",
        allowed_hosts: tuple[str, ...] = (),
        **limits,
    ):
        self.tokenizer, self.model_name, self.api_key = tokenizer, model_name, api_key
        self.tool_format = tool_format
        unknown = set(limits) - Limits.names()
        if unknown:
            raise TypeError(f"unknown server limits: {sorted(unknown)}; known: {sorted(Limits.names())}")
        self.limits = Limits(**limits)
        self.allowed_hosts = frozenset(h.lower() for h in allowed_hosts)
        self.pool = ThreadPoolExecutor(max_workers=WORKERS, thread_name_prefix="qwen2-prep")
        self.engine = AsyncEngine(engine, max_pending=self.limits.max_pending)
        # What bounds prompt + output (as Engine.check_request): max_model_len, or a smaller KV cache.
        self.max_model_len = min(engine.max_model_len, engine.capacity)
        by_len = engine.max_model_len <= engine.capacity
        self.limit = "this server's context (--max-model-len)" if by_len else "this server's KV cache"
        self.vocab = min(len(tokenizer), engine.config.vocab_size)
        self.stop_ids = frozenset(i for i in (tokenizer.endoftext_id, tokenizer.im_end_id) if i is not None)
        # response_format grammars end at the stop tokens; the library's vocabulary is built on first use.
        self.grammars = GrammarCompiler(tokenizer, engine.config.vocab_size, self.stop_ids)
        self.created = int(time.time())

    async def offload(self, fn, *args, **kwargs):
        """fn(*args, **kwargs) on the worker pool: heavy per-request work never runs on the event loop."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.pool, functools.partial(fn, *args, **kwargs))

    def close(self) -> None:
        self.engine.close()
        self.pool.shutdown(wait=False, cancel_futures=True)

    # ---- request plumbing ------------------------------------------------------------------------
    def auth(self, request: Request) -> None:
        """The API key when there is one; without one, the site guard (guard.py)."""
        if self.api_key is None:
            check_site(request.headers.get("host"), request.headers.get("origin"), self.allowed_hosts)
        elif not key_matches(self.api_key, request.headers.get("authorization", "")):
            raise APIError(
                401,
                "invalid or missing API key (send 'Authorization: Bearer <key>')",
                type="authentication_error",
                code="invalid_api_key",
            )

    async def body(self, request: Request) -> bytes:
        """The raw body of a POST (parsed later, off the loop): auth, JSON content type, size limit, and
        the read deadline (deadlines.BodyDeadline)."""
        self.auth(request)
        check_json_content_type(request.headers.get("content-type"))
        limit = self.limits.max_body_bytes
        too_large = APIError(
            413, f"request body over {limit} bytes (--max-body-bytes)", code="request_too_large"
        )
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise too_large
        chunks, size = [], 0
        try:
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise too_large
                chunks.append(chunk)
        except ClientDisconnect:
            if request.scope.get(TIMED_OUT):
                raise APIError(
                    408,
                    f"the request body did not arrive within {self.limits.body_timeout:g}s (--body-timeout)",
                    code="request_timeout",
                ) from None
            client = request.client or ("?", 0)
            log.info("%s:%s: client hung up mid-body (%d of %s bytes)", *client, size, declared or "?")
            raise APIError(
                400, "the client hung up before sending the whole body", code="disconnected"
            ) from None
        return b"".join(chunks)

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

    def items(self, choices: list[Choice], req, max_tokens: int, **kw) -> list[tuple[list[int], dict]]:
        """Each choice as a checked (prompt, Engine.add_request kwargs), off the loop; `kw`: logprobs,
        prompt_logprobs."""
        out = []
        grammar = req.grammar(self.grammars)  # response_format, compiled once for all the choices
        try:
            for c in choices:
                params = req.sampling_params(
                    max_new_tokens=max_tokens,
                    index=c.index,
                    stop_token_ids=c.stop_token_ids,
                    vocab_size=self.vocab,
                    grammar=grammar,
                )
                prompt, params = self.engine.check(c.prompt, params)
                out.append((prompt, dict(kw, params=params)))
        except ValueError as e:
            raise APIError(400, str(e), code="invalid_value") from None
        return out

    def start(self, choices: list[Choice], items: list[tuple[list[int], dict]], queue: asyncio.Queue) -> None:
        """Submit the choices (items: from `items`) as one request to the engine thread; 503 when full."""
        try:
            rids = self.engine.submit(items, queue, asyncio.get_running_loop())
        except Overloaded as e:
            raise APIError(503, str(e), type="server_overloaded", code="overloaded") from None
        for c, rid in zip(choices, rids):
            c.request_id = rid

    def abort(self, choices: list[Choice]) -> None:
        self.engine.abort([c.request_id for c in choices if c.request_id and not c.done])

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
                    c.finish_reason = "error"
                    raise APIError(
                        500,
                        f"the engine failed on this request: {out.error or 'unknown error'}",
                        type="server_error",
                        code="engine_error",
                    )
                c.consume(out)
                if c.done and not out.finished:  # a stop string ended it before the engine did
                    await self.engine.abort([c.request_id])  # answer with its cache already free
                yield c
        finally:
            self.abort(choices)

    @staticmethod
    def json(body: dict) -> Response:
        """A reply serialised (call it through `offload`: a reply with logprobs can be megabytes)."""
        return Response(json.dumps(body, ensure_ascii=False).encode(), media_type="application/json")

    @staticmethod
    async def stream(events: AsyncIterator[str]) -> AsyncIterator[str]:
        """A stream's events; an error after the response has started ends it with OpenAI's error event
        (`data: {"error": {...}}`) and `data: [DONE]` (an exception there would cut the connection)."""
        try:
            async for e in events:
                yield e
        except APIError as e:
            yield sse(e.body())
            yield DONE
        except Exception as e:  # a bug: one log line, and the client still gets a well-formed end
            log.error("stream failed: %s: %s", type(e).__name__, e)
            yield sse(APIError(500, f"internal error: {type(e).__name__}", type="server_error").body())
            yield DONE

    def usage(self, prompts: list[list[int]], choices: list[Choice]) -> dict:
        p, c = sum(len(x) for x in prompts), sum(len(ch.tokens) for ch in choices)
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}
