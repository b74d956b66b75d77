"""POST /v1/completions: prompts as text, texts, token ids or lists of ids; echo; logprobs; streaming.

With `echo` and `logprobs`, the prompt's own tokens come back with their log-probabilities (the first
one has none: nothing predicts it), which is how lm-evaluation-harness's `local-completions` scores
log-likelihoods (it sends max_tokens=1 and drops the last entry). Prompt text is encoded with control
tokens as text; send token ids to pass control tokens.
"""

from __future__ import annotations

import asyncio
import time

from fastapi import Request

from qwen2.serve.choices import Choice, completion_logprobs
from qwen2.serve.limits import text_bytes
from qwen2.serve.protocol import (
    DONE,
    APIError,
    CompletionRequest,
    new_id,
    parse_json,
    sse,
    streaming,
    validate,
)
from qwen2.serve.server import Server
from qwen2.tokenizer.stream import TextStream


def count_prompts(prompt) -> int:
    """How many prompts a `prompt` field holds (any JSON value: counted before validation)."""
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        return len(prompt)
    return 1


def prompt_ids(srv: Server, prompt) -> list[list[int]]:
    """The four prompt shapes -> one list of ids per prompt (Server.check_prompt checks them); text is
    bounded by max_prompt_bytes before it is tokenised, ids by max_prompt_tokens."""
    texts = [prompt] if isinstance(prompt, str) else prompt if prompt and isinstance(prompt[0], str) else None
    if texts is not None:
        size = text_bytes(texts)
        srv.limits.check("max_prompt_bytes", size, "the prompt text in bytes", param="prompt")
        prompts = [srv.tokenizer.encode(p) for p in texts]
    elif prompt and isinstance(prompt[0], list):
        prompts = [list(p) for p in prompt]
    else:
        prompts = [list(prompt)]
    if not prompts:
        raise APIError(400, "prompt: give at least one prompt", param="prompt", code="invalid_value")
    total = sum(map(len, prompts))
    srv.limits.check("max_prompt_tokens", total, "the prompts' tokens, all together", param="prompt")
    return prompts


def prepare(srv: Server, raw: bytes):
    """Body bytes -> (request, prompts, choices, engine items, echoed texts): everything before the
    engine, on a worker thread, each step bounded by a cap (limits.py) before it runs."""
    body = parse_json(raw)
    n = body.get("n", 1)
    n = n if isinstance(n, int) and not isinstance(n, bool) and n > 0 else 1  # validate() judges it
    total = count_prompts(body.get("prompt")) * n
    srv.limits.check("max_choices", total, "prompts x n", param="prompt")  # before validating 500,000
    req = validate(CompletionRequest, body)
    srv.check_model(req.model)
    if req.suffix:
        raise APIError(400, "suffix is not supported", param="suffix", code="unsupported")
    stops = req.stops()
    prompts = prompt_ids(srv, req.prompt)
    max_tokens = 16 if req.max_tokens is None else req.max_tokens
    for i, p in enumerate(prompts):
        name = "prompt" if len(prompts) == 1 else f"prompt.{i}"
        srv.check_prompt(p, max_tokens, param=name, budget="max_tokens")
    echo_lp = req.echo and req.logprobs is not None
    if req.logprobs is not None:
        scored = sum(len(p) if echo_lp else 0 for p in prompts) * req.n + len(prompts) * req.n * max_tokens
        what = "choices x (echoed prompt + max_tokens) x (1 + logprobs)"
        srv.limits.check("max_logprob_entries", scored * (1 + req.logprobs), what, param="logprobs")
    choices = [
        Choice(i * req.n + j, p, TextStream(srv.tokenizer, stops), srv.stop_ids)
        for i, p in enumerate(prompts)
        for j in range(req.n)
    ]
    items = srv.items(
        choices, req, max_tokens, logprobs=req.logprobs, prompt_logprobs=req.logprobs if echo_lp else None
    )
    echoed = {c.index: srv.tokenizer.decode(c.prompt) if req.echo else "" for c in choices}  # ids checked
    return req, prompts, choices, items, echoed


async def completions(srv: Server, raw: bytes, request: Request):
    req, prompts, choices, items, echoed = await srv.offload(prepare, srv, raw)
    echo_lp = req.echo and req.logprobs is not None
    queue: asyncio.Queue = asyncio.Queue()
    srv.start(choices, items, queue)
    rid, created = new_id("cmpl"), int(time.time())

    def logprobs(c: Choice, start: int, end: int, text_start: int, with_prompt: bool):
        if req.logprobs is None:
            return None
        entries = ([c.prompt[0], *(c.prompt_logprobs or [])] if with_prompt else []) + c.logprobs[start:end]
        return completion_logprobs(srv.tokenizer, entries, text_start)

    def reply() -> dict:
        body = [
            {
                "index": c.index,
                "text": echoed[c.index] + c.stream.text,
                "finish_reason": c.finish_reason,
                "logprobs": logprobs(c, 0, len(c.logprobs), 0, echo_lp),
            }
            for c in choices
        ]
        return {
            "id": rid,
            "object": "text_completion",
            "created": created,
            "model": srv.model_name,
            "choices": body,
            "usage": srv.usage(prompts, choices),
        }

    if not req.stream:
        async for _ in srv.run(choices, queue, request):
            pass
        return await srv.offload(lambda: srv.json(reply()))

    include_usage = bool(req.stream_options and req.stream_options.include_usage)

    async def events():
        echo_due = {c.index for c in choices} if req.echo else set()  # sent with the first output
        sent_lp = {c.index: 0 for c in choices}
        offset = {c.index: 0 for c in choices}
        async for c in srv.run(choices, queue, None):
            text, with_prompt = c.stream.delta(c.done), c.index in echo_due
            if with_prompt:
                echo_due.discard(c.index)
                text = echoed[c.index] + text
            args = (c, sent_lp[c.index], len(c.logprobs), offset[c.index], with_prompt and echo_lp)
            # The echoed prompt's logprobs come in one event: built off the loop, like a whole reply.
            lp = await srv.offload(logprobs, *args) if with_prompt and echo_lp else logprobs(*args)
            sent_lp[c.index] = len(c.logprobs)
            offset[c.index] += len(text)
            if text or c.done or (lp and lp["tokens"]):
                out = {
                    "id": rid,
                    "object": "text_completion",
                    "created": created,
                    "model": srv.model_name,
                    "choices": [
                        {"index": c.index, "text": text, "logprobs": lp, "finish_reason": c.finish_reason}
                    ],
                }
                if include_usage:
                    out["usage"] = None
                yield await srv.offload(sse, out) if with_prompt and echo_lp else sse(out)
        if include_usage:
            yield sse(
                {
                    "id": rid,
                    "object": "text_completion",
                    "created": created,
                    "model": srv.model_name,
                    "choices": [],
                    "usage": srv.usage(prompts, choices),
                }
            )
        yield DONE

    return streaming(srv.stream(events()))
