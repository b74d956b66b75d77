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
from qwen2.serve.protocol import DONE, APIError, CompletionRequest, new_id, sse, streaming
from qwen2.serve.server import Server
from qwen2.tokenizer.stream import TextStream


def prompt_ids(srv: Server, prompt) -> list[list[int]]:
    """The four prompt shapes -> one list of ids per prompt (Server.check_prompt checks them)."""
    if isinstance(prompt, str):
        prompts = [srv.tokenizer.encode(prompt)]
    elif prompt and isinstance(prompt[0], str):
        prompts = [srv.tokenizer.encode(p) for p in prompt]
    elif prompt and isinstance(prompt[0], list):
        prompts = [list(p) for p in prompt]
    else:
        prompts = [list(prompt)]
    if not prompts:
        raise APIError(400, "prompt: give at least one prompt", param="prompt", code="invalid_value")
    return prompts


async def completions(srv: Server, req: CompletionRequest, request: Request):
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
    choices = [
        Choice(i * req.n + j, p, TextStream(srv.tokenizer, stops), srv.stop_ids)
        for i, p in enumerate(prompts)
        for j in range(req.n)
    ]
    queue: asyncio.Queue = asyncio.Queue()
    srv.start(
        choices,
        queue,
        req,
        max_tokens,
        logprobs=req.logprobs,
        prompt_logprobs=req.logprobs if echo_lp else None,
    )
    rid, created = new_id("cmpl"), int(time.time())
    echoed = {c.index: srv.tokenizer.decode(c.prompt) if req.echo else "" for c in choices}  # ids checked

    def logprobs(c: Choice, start: int, end: int, text_start: int, with_prompt: bool):
        if req.logprobs is None:
            return None
        entries = ([c.prompt[0], *(c.prompt_logprobs or [])] if with_prompt else []) + c.logprobs[start:end]
        return completion_logprobs(srv.tokenizer, entries, text_start)

    if not req.stream:
        async for _ in srv.run(choices, queue, request):
            pass
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
            lp = logprobs(c, sent_lp[c.index], len(c.logprobs), offset[c.index], with_prompt and echo_lp)
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
                yield sse(out)
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

    return streaming(events())
