"""What one request may ask of the server, checked before the work it bounds starts.

Each cap is a `qwen2 serve` flag, and breaking one is a 400 naming the cap and its flag (never a 503: a
request over a cap can never succeed, so "retry later" would be a lie). The caps bound the per-request
work that runs before the engine sees the request or after it finishes (JSON parsing, validation, chat
rendering, tokenising, logprob building, serialisation), which runs on a worker thread (Server.offload),
never on the event loop, so one heavy request cannot stall the others' streams or /health.

Response size: a reply's text is bounded by choices x max_tokens; what multiplies it beyond that are
log-probabilities, so the response-size cap counts logprob entries: each scored token is one entry plus
one per top alternative.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from qwen2.serve.protocol import APIError


@dataclass(frozen=True)
class Limits:
    max_body_bytes: int = 4 << 20  # request body (413 beyond it, before it is read)
    max_pending: int = 256  # HTTP requests held at once, queued or generating (503 beyond: retry later)
    max_choices: int = 400  # prompts x n in one request
    max_messages: int = 2048  # chat messages in one request
    max_prompt_bytes: int = 2 << 20  # UTF-8 bytes of text to tokenise in one request (prompts, messages)
    max_prompt_tokens: int = 1 << 18  # prompt tokens in one request, all prompts together
    max_logprob_entries: int = 1 << 20  # response size: choices x scored tokens x (1 + top logprobs)
    header_timeout: float = 10.0  # seconds from connect (or the last response) to a request's full headers
    body_timeout: float = 30.0  # seconds from the headers to the whole body
    shutdown_timeout: float = 10.0  # seconds SIGTERM waits for requests in flight before cancelling them

    def __post_init__(self):
        for f in fields(self):
            if not getattr(self, f.name) > 0:
                raise ValueError(f"{f.name} (--{f.name.replace('_', '-')}) must be > 0")

    @classmethod
    def names(cls) -> set[str]:
        return {f.name for f in fields(cls)}

    def check(self, name: str, value: int, what: str, *, param: str | None = None) -> None:
        """400 when `value` (what it counts, for the message) is over the cap `name`."""
        cap = getattr(self, name)
        if value > cap:
            raise APIError(
                400,
                f"{what} is {value}; this server allows at most {cap} "
                f"(--{name.replace('_', '-')}): split the request or raise the limit",
                param=param,
                code=name,
            )


def text_bytes(texts) -> int:
    """UTF-8 size of some strings (ASCII ones without encoding them)."""
    total = 0
    for t in texts:
        total += len(t.encode("utf-8")) if not t.isascii() else len(t)
    return total
