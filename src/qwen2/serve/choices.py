"""One choice of a request as it streams out of the engine: detokenization, stop strings, logprobs.

Text goes through qwen2.tokenizer.stream.TextStream (the one streaming decoder generation shares):
text that could still grow into a stop string is held back, so a client never sees part of a stop
string; once one appears, the text is cut before it, the request is aborted (its cache freed) and
finish_reason is "stop". A stop *token* (<|im_end|>, <|endoftext|>) is counted in usage but never
shown as text, nor is a token past the tokenizer (a padded embedding row).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from qwen2.engine.engine import StepOutput, TokenLogprob
from qwen2.tokenizer.stream import TextStream


def token_bytes(tokenizer, token_id: int) -> bytes:
    """A token's bytes; ids past the tokenizer (padded embedding rows) decode to nothing."""
    try:
        return tokenizer.decode_bytes([token_id])
    except ValueError:
        return b""


def token_str(tokenizer, token_id: int) -> str:
    return token_bytes(tokenizer, token_id).decode("utf-8", errors="replace")


@dataclass
class Choice:
    """State of one choice: which engine request feeds it and what it has produced."""

    index: int
    prompt: list[int]
    stream: TextStream
    stop_token_ids: frozenset[int]
    request_id: str = ""
    tokens: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def consume(self, out: StepOutput) -> None:
        """Take one engine output; on a stop string, finish with "stop" (the caller aborts the request)."""
        if out.prompt_logprobs is not None:
            self.prompt_logprobs = out.prompt_logprobs
        for i, t in enumerate(out.token_ids):
            self.tokens.append(t)
            if out.logprobs:
                self.logprobs.append(out.logprobs[i])
            shown = None if (t in self.stop_token_ids and out.finish_reason == "stop") else t
            try:
                self.stream.feed(shown, final=out.finished)
            except ValueError:  # an id past the tokenizer (a padded embedding row): no text
                self.stream.feed(None, final=out.finished)
            if self.stream.stopped:
                self.finish_reason = "stop"
                return
        if out.finished:
            if not out.token_ids:
                self.stream.feed(None, final=True)
            self.finish_reason = "length" if out.finish_reason == "length" else "stop"


# ---- logprobs in OpenAI's two shapes --------------------------------------------------------------
def _top_with_sampled(lp: TokenLogprob) -> list[tuple[int, float]]:
    top = list(lp.top)
    if lp.top and all(t != lp.token_id for t, _ in top):
        top.append((lp.token_id, lp.logprob))
    return top


def chat_logprobs(tokenizer, lps: list[TokenLogprob], k: int) -> dict:
    """{"content": [{token, logprob, bytes, top_logprobs: [...k]}], "refusal": None}."""

    def entry(t: int, v: float) -> dict:
        b = token_bytes(tokenizer, t)
        return {"token": b.decode("utf-8", errors="replace"), "logprob": v, "bytes": list(b)}

    content = [
        dict(entry(lp.token_id, lp.logprob), top_logprobs=[entry(t, v) for t, v in lp.top[:k]]) for lp in lps
    ]
    return {"content": content, "refusal": None}


def completion_logprobs(tokenizer, entries: list[TokenLogprob | None], text_start: int = 0) -> dict:
    """{"tokens", "token_logprobs", "top_logprobs", "text_offset"}; a None entry (the first echoed prompt
    token, which nothing predicts) has logprob None and top_logprobs None."""
    tokens, token_lps, tops, offsets = [], [], [], []
    pos = text_start
    for e in entries:
        s = token_str(tokenizer, e.token_id) if not isinstance(e, int) else token_str(tokenizer, e)
        tokens.append(s)
        offsets.append(pos)
        pos += len(s)
        if isinstance(e, int):
            token_lps.append(None)
            tops.append(None)
        else:
            token_lps.append(e.logprob)
            tops.append({token_str(tokenizer, t): v for t, v in _top_with_sampled(e)})
    return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets}
