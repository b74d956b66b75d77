"""One choice of a request as it streams out of the engine: detokenization, stop strings, logprobs.

Stop strings: text that could still grow into a stop string is held back from the stream, so a client
never sees part of a stop string; once one appears, the text is cut before it, the request is aborted
(its cache freed) and finish_reason is "stop". A stop *token* (<|im_end|>, <|endoftext|>) is counted
in usage but never shown as text.
"""

from __future__ import annotations

import codecs
from dataclasses import dataclass, field

from qwen2.engine.engine import StepOutput, TokenLogprob


def token_bytes(tokenizer, token_id: int) -> bytes:
    """A token's bytes; ids past the tokenizer (padded embedding rows) decode to nothing."""
    try:
        return tokenizer.decode_bytes([token_id])
    except ValueError:
        return b""


def token_str(tokenizer, token_id: int) -> str:
    return token_bytes(tokenizer, token_id).decode("utf-8", errors="replace")


class TextStream:
    """Incremental UTF-8 decode of generated tokens with stop-string detection and hold-back."""

    def __init__(self, tokenizer, stops: list[str]):
        self.tokenizer, self.stops = tokenizer, stops
        self.hold = max((len(s) for s in stops), default=1) - 1
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.text, self.sent, self.stopped = "", 0, False

    def feed(self, token_id: int | None, final: bool = False) -> None:
        if self.stopped:
            return
        start = max(0, len(self.text) - self.hold)
        if token_id is not None:
            self.text += self._utf8.decode(token_bytes(self.tokenizer, token_id))
        if final:
            self.text += self._utf8.decode(b"", final=True)
        cut = min((i for i in (self.text.find(s, start) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.text, self.stopped = self.text[:cut], True

    def delta(self, final: bool) -> str:
        """Text not yet sent that can no longer turn into a stop string."""
        upto = len(self.text) if (final or self.stopped) else max(self.sent, len(self.text) - self.hold)
        out, self.sent = self.text[self.sent : upto], upto
        return out


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
            self.stream.feed(shown, final=out.finished)
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

    content = [dict(entry(lp.token_id, lp.logprob), top_logprobs=[entry(t, v) for t, v in lp.top[:k]]) for lp in lps]
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
