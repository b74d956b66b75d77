"""TextStream: incremental UTF-8 decoding of a token stream, with stop strings held back.

The one implementation of streaming detokenization (DESIGN.md principle 12) that generation,
the CLI and the server share. Byte-level BPE (SPEC.md 2.1) splits characters across tokens, and a
stop string (OpenAI's `stop`) may span several tokens, so text is released only once it is final:

- an incomplete UTF-8 character is held back (Python's incremental decoder; replacement characters
  appear exactly where the one-shot `tokenizer.decode` puts them);
- the longest suffix of the text that is a proper prefix of some stop string is held back, so a stop
  string split across tokens is never emitted, and text that cannot begin one is released at once;
- at a stop, the text before it and the ids wholly before it are final; the rest is dropped.
  When several stop strings occur, the one that ends first wins (ties: the longer one), which is the
  first one a reader of the text sees complete, whatever way the text is split into tokens.

So for every id stream and every split of it: the released text is `tokenizer.decode(ids)` cut at the
first stop string, and no released text contains a stop string.

API
    s = TextStream(tokenizer, stop=["\\n\\n"])  # tokenizer: anything with decode_bytes(list[int]) -> bytes
    ids, text = s.push(token_id)   # the ids and text released by this token (maybe [], "")
    ids, text = s.close()          # end of stream: release what is held (a broken tail as U+FFFD)
    s.text, s.ids                  # everything released so far (all of it final)
    s.stopped                      # a stop string appeared; push() then releases nothing
    s.finished                     # stopped or closed

    For a stream consumer that polls (the server):
    s.feed(token_id_or_None, final=False)   # push the id unless None; final=True closes the stream
    s.delta(final=False) -> str             # released text not returned by delta before (final: close)

Released text may run ahead of released ids inside one token (a token whose text begins with a
released character and ends with a held one is released with its last character). An id the
tokenizer cannot decode raises its ValueError and changes nothing. Empty stop strings are ignored.
"""

from __future__ import annotations

import codecs
from collections.abc import Sequence

__all__ = ["TextStream"]


class TextStream:
    """One token stream's released text and ids; see the module docstring for the rule and the API."""

    def __init__(self, tokenizer, stop: Sequence[str] = ()):
        self.tokenizer = tokenizer
        self.stop = [s for s in ([stop] if isinstance(stop, str) else stop) if s]
        self.text = ""  # released text
        self.ids: list[int] = []  # released ids
        self.stopped = False
        self.finished = False
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._tail = ""  # decoded, not yet released
        # Unreleased ids with their reach: characters of _tail up to and including the id's last byte
        # (an id that ends inside an unfinished character reaches that character).
        self._held: list[tuple[int, int]] = []
        self._sent = 0  # characters of `text` returned by delta()

    def push(self, token_id: int) -> tuple[list[int], str]:
        """Add one id; return the ids and text it releases."""
        if self.finished:
            return [], ""
        data = self.tokenizer.decode_bytes([token_id])  # raises before anything changes
        before = len(self._tail)
        self._tail += self._utf8.decode(data)
        pending = 1 if self._utf8.getstate()[0] else 0
        self._held.append((token_id, len(self._tail) + pending))
        return self._release(before, final=False)

    def close(self) -> tuple[list[int], str]:
        """End of stream: release everything held (a stop string completed by the flush still cuts)."""
        if self.finished:
            return [], ""
        before = len(self._tail)
        self._tail += self._utf8.decode(b"", final=True)
        return self._release(before, final=True)

    def feed(self, token_id: int | None, final: bool = False) -> None:
        """Poll-style input: push `token_id` unless None (a token whose text is not shown); final closes."""
        if token_id is not None:
            self.push(token_id)
        if final:
            self.close()

    def delta(self, final: bool = False) -> str:
        """Released text not returned by an earlier delta(); final=True closes the stream first."""
        if final:
            self.close()
        out, self._sent = self.text[self._sent :], len(self.text)
        return out

    # ---- the rule ------------------------------------------------------------------------------
    def _release(self, before: int, final: bool) -> tuple[list[int], str]:
        cut = self._first_stop(before)
        if cut is not None:
            limit, self.stopped = cut, True
        elif final:
            limit = len(self._tail)
        else:
            limit = len(self._tail) - self._held_suffix()
        n = 0
        if final and cut is None:
            n = len(self._held)
        else:
            while n < len(self._held) and self._held[n][1] <= limit:
                n += 1
        ids, text = [t for t, _ in self._held[:n]], self._tail[:limit]
        self.ids += ids
        self.text += text
        self._tail, self._held = self._tail[limit:], [(t, r - limit) for t, r in self._held[n:]]
        if final or self.stopped:
            self.finished = True
            self._tail, self._held = "", []
        return ids, text

    def _first_stop(self, before: int) -> int | None:
        """Start of the stop string that ends first among those ending after `before` (ties: longest)."""
        best = None  # (end, -length, start)
        for s in self.stop:
            i = self._tail.find(s, max(0, before - len(s) + 1))
            if i >= 0:
                key = (i + len(s), -len(s), i)
                best = key if best is None or key < best else best
        return None if best is None else best[2]

    def _held_suffix(self) -> int:
        """Length of the longest suffix of the unreleased text that is a proper prefix of a stop string.
        (Released text never needs to be held again: a suffix reaching into it would have been held.)"""
        best = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(self._tail)), best, -1):
                if self._tail.endswith(s[:n]):
                    best = n
                    break
        return best
