"""TextStream: released text equals the one-shot decode cut at the first stop string, for every split."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qwen2.tokenizer.bpe import load_tokenizer
from qwen2.tokenizer.stream import TextStream


class PieceTokenizer:
    """A token is any byte string: ids are handed out as pieces are seen, so one byte string can be
    cut into tokens anywhere (inside UTF-8 characters and stop strings included)."""

    def __init__(self):
        self.pieces: list[bytes] = []

    def ids(self, pieces: list[bytes]) -> list[int]:
        out = []
        for p in pieces:
            self.pieces.append(p)
            out.append(len(self.pieces) - 1)
        return out

    def decode_bytes(self, ids) -> bytes:
        return b"".join(self.pieces[i] for i in ids)


def reference(text: str, stops: list[str]) -> tuple[str, bool]:
    """Brute force: the first prefix of the text that ends with a stop string (longest on a tie)."""
    stops = [s for s in stops if s]
    for end in range(len(text) + 1):
        hits = [s for s in stops if text[:end].endswith(s)]
        if hits:
            return text[: end - len(max(hits, key=len))], True
    return text, False


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    cuts = sorted({c for c in cuts if 0 < c < len(data)})
    return [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)])]


ALPHABET = "ab\n世界é"  # short stop strings over few characters match often; multi-byte characters split
DATA = st.one_of(
    st.text(ALPHABET, max_size=24).map(str.encode),
    st.binary(max_size=24),  # invalid UTF-8 too: replacement characters as decode() puts them
    st.lists(st.sampled_from([b"a", b"\xe4", b"\xb8", b"\x96", "世".encode(), b"\n"]), max_size=16).map(
        b"".join
    ),
)
STOPS = st.lists(st.text(ALPHABET + "\ufffd", min_size=0, max_size=4), max_size=3)


def run(
    tok: PieceTokenizer, ids: list[int], stops: list[str]
) -> tuple[TextStream, list[tuple[list[int], str]]]:
    s, out = TextStream(tok, stops), []
    for i in ids:
        out.append(s.push(i))
        assert not any(x in s.text for x in stops if x)  # nothing released ever contains a stop string
    out.append(s.close())
    return s, out


@settings(max_examples=400, deadline=None)
@given(DATA, STOPS, st.lists(st.integers(0, 24), max_size=10), st.lists(st.integers(0, 24), max_size=10))
def test_released_text_is_the_decode_cut_at_the_first_stop_for_every_split(data, stops, cuts_a, cuts_b):
    tok = PieceTokenizer()
    want, stopped = reference(data.decode("utf-8", errors="replace"), stops)
    results = []
    for cuts in (cuts_a, cuts_b):
        ids = tok.ids(split(data, cuts))
        s, out = run(tok, ids, stops)
        assert s.text == "".join(t for _, t in out) == want
        assert s.stopped == stopped and s.finished
        assert s.ids == [i for r, _ in out for i in r] == ids[: len(s.ids)]
        if stopped:
            # The released ids are exactly those whose text lies wholly before the stop string.
            reach = [
                len(tok.decode_bytes(ids[:k]).decode("utf-8", errors="replace")) for k in range(len(ids) + 1)
            ]
            assert len(s.ids) == max(k for k in range(len(ids) + 1) if reach[k] <= len(want))
        else:
            assert s.ids == ids
        results.append(s.text)
    assert results[0] == results[1]  # splitting never changes the result


@settings(max_examples=200, deadline=None)
@given(st.text(ALPHABET, max_size=24).map(str.encode), STOPS, st.lists(st.integers(0, 24), max_size=10))
def test_text_that_cannot_begin_a_stop_is_released_at_once(data, stops, cuts):
    # After each push, what is held back is exactly an unfinished character and the longest tail that
    # could still grow into a stop string: nothing more.
    tok = PieceTokenizer()
    ids = tok.ids(split(data, cuts))
    s = TextStream(tok, stops)
    for k, i in enumerate(ids):
        s.push(i)
        if s.stopped:
            break
        complete = tok.decode_bytes(ids[: k + 1]).decode("utf-8", errors="ignore")  # valid text: whole chars
        held = max([n for x in stops if x for n in range(1, len(x)) if complete.endswith(x[:n])], default=0)
        assert s.text == complete[: len(complete) - held]


def test_holds_back_split_utf8_and_stop_prefixes():
    tok = PieceTokenizer()
    ids = tok.ids([bytes([b]) for b in "你好世界!".encode()])
    s = TextStream(tok, ["世界"])
    texts = [s.push(i)[1] for i in ids]
    assert (
        texts == ["", "", "你", "", "", "好"] + [""] * 7
    )  # 世 could begin 世界: held; "!" comes after the stop
    assert s.stopped and s.text == "你好" and tok.decode_bytes(s.ids) == "你好".encode()


def test_close_releases_what_was_held():
    tok = PieceTokenizer()
    s = TextStream(tok, ["abc"])
    assert [s.push(i)[1] for i in tok.ids([b"x", b"a", b"b"])] == ["x", "", ""]
    ids, text = s.close()
    assert text == "ab" and tok.decode_bytes(ids) == b"ab" and not s.stopped
    assert s.push(tok.ids([b"c"])[0]) == ([], "")  # closed: nothing more


def test_the_stop_that_ends_first_wins():
    tok = PieceTokenizer()
    s = TextStream(tok, ["abcd", "c"])  # "c" is complete before "abcd" could be
    s.push(tok.ids([b"xabcd"])[0])
    assert s.text == "xab" and s.ids == [] and s.stopped  # the token reaches past the stop: not released


def test_feed_and_delta_poll_the_stream():
    tok = PieceTokenizer()
    s = TextStream(tok, ["\n\n"])
    pieces = []
    for p in (b"Hi", b" there\n", b"\nmore"):
        s.feed(tok.ids([p])[0])
        pieces.append(s.delta())
    assert pieces == ["Hi", " there", ""] and s.stopped and s.text == "Hi there"
    s2 = TextStream(tok, [])
    s2.feed(tok.ids([b"\xe4\xb8"])[0])
    assert s2.delta() == ""
    s2.feed(None, final=True)  # a stop token: its text is not shown, the broken tail is flushed
    assert s2.delta() == "\ufffd" and s2.finished


def test_bad_id_raises_and_changes_nothing(tokenizer_dir):
    tok = load_tokenizer(tokenizer_dir)
    s = TextStream(tok, ["<|im_end|>"])
    assert s.push(tok.encode("Hi")[0]) == ([tok.encode("Hi")[0]], "Hi")
    with pytest.raises(ValueError, match="151700"):
        s.push(151700)
    for i in tok.encode(" there"):
        s.push(i)
    assert s.close()[1] == "" and s.text == "Hi there"
