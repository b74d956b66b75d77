"""POST /v1/chat/completions: messages rendered by qwen2.tokenizer.chat (ChatML; control tokens typed in a
message stay text), tools in the checkpoint's format (qwen2.tokenizer.tools: hermes by default),
replies parsed back into OpenAI `tool_calls`, streaming with `stream_options.include_usage`.

Streaming with tools: text before a `<tool_call>` block streams as content; from the block on, the text
is held until the reply ends, then parsed and sent as one `tool_calls` delta (finish_reason
"tool_calls"), or as content if it does not parse.
"""

from __future__ import annotations

import asyncio
import time

from fastapi import Request

from qwen2.serve.choices import Choice, chat_logprobs
from qwen2.serve.limits import text_bytes
from qwen2.serve.protocol import DONE, APIError, ChatRequest, new_id, parse_json, sse, streaming, validate
from qwen2.serve.server import Server
from qwen2.tokenizer.chat import encode_chat
from qwen2.tokenizer.stream import TextStream
from qwen2.tokenizer.tools import ToolCallParseError, parse_tool_calls

CALL_OPEN = "<tool_call>"


def chat_prompt(srv: Server, req: ChatRequest) -> tuple[list[int], bool]:
    """(prompt ids, tools on) for a request; bad messages or tools -> 400 naming the field."""
    messages = []
    for m in req.messages:
        msg = {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
        if m.tool_calls:
            msg["tool_calls"] = [
                {
                    "id": c.id,
                    "type": "function",
                    "function": {"name": c.function.name, "arguments": c.function.arguments},
                }
                for c in m.tool_calls
            ]
        messages.append(msg)
    tools = None
    if req.tools and req.tool_choice != "none":
        tools = [t.model_dump(exclude_none=True) for t in req.tools]
    try:
        ids, _ = encode_chat(
            srv.tokenizer, messages, add_generation_prompt=True, tools=tools, tool_format=srv.tool_format
        )
    except (ValueError, TypeError) as e:
        raise APIError(400, f"messages: {e}", param="messages", code="invalid_value") from None
    return ids, tools is not None


def split_tool_calls(srv: Server, text: str) -> tuple[str | None, list[dict]]:
    """Generated text -> (content, OpenAI tool_calls); text that does not parse stays content."""
    try:
        content, calls = parse_tool_calls(text, srv.tool_format)
    except ToolCallParseError:
        return text, []
    return (content or None), [dict(c.to_dict(), id=new_id("call")) for c in calls]


def prepare(srv: Server, raw: bytes):
    """Body bytes -> (request, prompt, tools on, max_tokens, k, choices, engine items): everything before
    the engine, on a worker thread, each step bounded by a cap (limits.py) before it runs."""
    body = parse_json(raw)
    messages = body.get("messages")
    if isinstance(messages, list):  # before validating 100,000 of them
        srv.limits.check("max_messages", len(messages), "the number of messages", param="messages")
    req = validate(ChatRequest, body)
    srv.check_model(req.model)
    stops = req.stops()
    if req.top_logprobs is not None and not req.logprobs:
        raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs", code="invalid_value")
    srv.limits.check("max_choices", req.n, "n", param="n")
    size = text_bytes(m.text() for m in req.messages)
    srv.limits.check("max_prompt_bytes", size, "the messages' text in bytes", param="messages")
    prompt, tools_on = chat_prompt(srv, req)
    srv.limits.check(
        "max_prompt_tokens", len(prompt), "the rendered conversation in tokens", param="messages"
    )
    asked, param = (
        (req.max_completion_tokens, "max_completion_tokens")
        if req.max_completion_tokens
        else (req.max_tokens, "max_tokens")
    )
    max_tokens = srv.check_prompt(prompt, asked, param="messages", budget=param)
    k = (req.top_logprobs or 0) if req.logprobs else None
    if k is not None:
        entries = req.n * max_tokens * (1 + k)
        srv.limits.check("max_logprob_entries", entries, "n x max_tokens x (1 + top_logprobs)", param=param)
    choices = [Choice(i, prompt, TextStream(srv.tokenizer, stops), srv.stop_ids) for i in range(req.n)]
    items = srv.items(choices, req, max_tokens, logprobs=k)
    return req, prompt, tools_on, max_tokens, k, choices, items


async def chat_completions(srv: Server, raw: bytes, request: Request):
    req, prompt, tools_on, max_tokens, k, choices, items = await srv.offload(prepare, srv, raw)
    queue: asyncio.Queue = asyncio.Queue()
    srv.start(choices, items, queue)
    rid, created = new_id("chatcmpl"), int(time.time())
    head = {"id": rid, "created": created, "model": srv.model_name, "system_fingerprint": None}

    def finish(c: Choice) -> tuple[str | None, list[dict], str]:
        content, calls = split_tool_calls(srv, c.stream.text) if tools_on else (c.stream.text, [])
        return content, calls, ("tool_calls" if calls else c.finish_reason)

    def reply() -> dict:
        body = []
        for c in choices:
            content, calls, reason = finish(c)
            msg = {"role": "assistant", "content": content, "refusal": None}
            if calls:
                msg["tool_calls"] = calls
            body.append(
                {
                    "index": c.index,
                    "message": msg,
                    "finish_reason": reason,
                    "logprobs": chat_logprobs(srv.tokenizer, c.logprobs, k) if k is not None else None,
                }
            )
        return dict(head, object="chat.completion", choices=body, usage=srv.usage([prompt], choices))

    if not req.stream:
        async for _ in srv.run(choices, queue, request):
            pass
        return await srv.offload(lambda: srv.json(reply()))

    include_usage = bool(req.stream_options and req.stream_options.include_usage)

    def chunk(index: int, delta: dict, finish_reason=None, logprobs=None) -> str:
        out = dict(
            head,
            object="chat.completion.chunk",
            choices=[{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}],
        )
        if include_usage:
            out["usage"] = None
        return sse(out)

    async def events():
        sent = {c.index: 0 for c in choices}  # characters of c.stream.text (released, final text) sent
        sent_lp = {c.index: 0 for c in choices}
        for c in choices:
            yield chunk(c.index, {"role": "assistant", "content": ""})
        async for c in srv.run(choices, queue, None):
            text = c.stream.text
            upto = len(text)
            if tools_on:  # hold everything from a (possibly partial) <tool_call> on
                at = text.find(CALL_OPEN)
                if at < 0 and not c.done:
                    at = next(
                        (
                            i
                            for i in range(max(0, len(text) - len(CALL_OPEN) + 1), len(text))
                            if CALL_OPEN.startswith(text[i:])
                        ),
                        -1,
                    )
                if at >= 0:
                    upto = min(upto, max(at, sent[c.index]))
            lp = None
            if k is not None and len(c.logprobs) > sent_lp[c.index]:
                lp = chat_logprobs(srv.tokenizer, c.logprobs[sent_lp[c.index] :], k)
                sent_lp[c.index] = len(c.logprobs)
            delta = text[sent[c.index] : upto]
            sent[c.index] = upto
            if delta or lp:
                yield chunk(c.index, {"content": delta}, logprobs=lp)
            if c.done:
                content, calls, reason = finish(c)
                if calls:
                    deltas = [dict(call, index=j) for j, call in enumerate(calls)]
                    yield chunk(c.index, {"tool_calls": deltas})
                elif sent[c.index] < len(text):
                    yield chunk(c.index, {"content": text[sent[c.index] :]})
                yield chunk(c.index, {}, finish_reason=reason)
        if include_usage:
            usage = srv.usage([prompt], choices)
            yield sse(dict(head, object="chat.completion.chunk", choices=[], usage=usage))
        yield DONE

    return streaming(srv.stream(events()))
