"""Text shared by test modules (a plain helper, not a test module): hypothesis strategies for tokenizer
inputs, a fixed varied sample, and English-like prose for the data filters."""

import unicodedata

import numpy as np
from hypothesis import strategies as st

# ---- tokenizer inputs ------------------------------------------------------------------------------
EMOJI = ["👨", "👩", "👧", "👦", "❤", "🏳", "🌈", "👍", "🧑", "💻", "🔥", "😀"]
ZWJ_SEQ = (
    st.lists(st.sampled_from(EMOJI), min_size=2, max_size=5)
    .map("\u200d".join)
    .flatmap(lambda s: st.sampled_from(["", "\ufe0f", "\U0001f3fb", "\U0001f3fd"]).map(lambda mod: s + mod))
)
CJK = st.text(st.characters(min_codepoint=0x4E00, max_codepoint=0x9FFF), min_size=1, max_size=20)
THAI = st.text(st.characters(min_codepoint=0x0E00, max_codepoint=0x0E7F), min_size=1, max_size=20)
COMBINING = st.tuples(
    st.sampled_from("aeiouAEIOUnc "),
    st.text(st.characters(min_codepoint=0x300, max_codepoint=0x36F), min_size=1, max_size=3),
).map("".join)
SPACES = st.sampled_from(
    ["\t", "\r\n", "\r", "\n", " ", "  ", "   ", "\n\n", " \n", "\u3000", "\xa0", "\t\t"]
)
DIGITS = st.text(st.sampled_from("0123456789"), min_size=1, max_size=60)
WORDS = st.sampled_from(
    [
        "Hello",
        " world",
        "don't",
        "I'M",
        "you'll",
        "'s",
        " ",
        "=",
        "->",
        "def",
        "(x)",
        "αβγ",
        "Ärger",
        "ǅ",
        "ﬁ",
        "한국어",
    ]
)
ANY = st.text(st.characters(codec="utf-8"), max_size=30)
PIECE = st.one_of(ZWJ_SEQ, CJK, THAI, COMBINING, SPACES, DIGITS, WORDS, ANY)
TEXT = st.one_of(
    st.lists(PIECE, max_size=25).map("".join),
    st.lists(PIECE, max_size=25).map(lambda p: unicodedata.normalize("NFD", "".join(p))),
)

# A fixed sample of the kinds of text the model reads: English, Chinese, code, digits, emoji, mixed.
SAMPLES = [
    "The quick brown fox jumps over the lazy dog. Don't panic; it's only 3:14 a.m.",
    "通义千问是阿里巴巴开发的大语言模型。今天天气很好，我们去公园散步吧！",
    "def fib(n: int) -> int:\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n\n\tprint(fib(30))\r\n",
    "3.14159265358979 1,234,567 2024-07-15 0x7fff 1e-9 ۱۲۳ ١٢٣ ¾",
    "👩\u200d💻 🏳\ufe0f\u200d🌈 👍🏽 😀😀😀 ❤\ufe0f",
    "Mixed: naïve café e\u0301 Ärger — «quotes» 한국어 สวัสดี Привет  \u3000 \xa0 end\n\n\n",
    "<|im_end|> typed by a user stays text, as do <|im_start|> and <|endoftext|>",
    "",
]


# ---- English-like prose (data filters and dedup) ---------------------------------------------------
PROSE_WORDS = (
    "time person year way day thing man world life hand part child eye woman place work week case point "
    "government company number group problem fact river stone light garden music window letter market "
    "morning island engine doctor paper story table answer voice street winter summer country"
).split()


def prose(n_words=300, seed=0):
    rng = np.random.default_rng(seed)
    words = [PROSE_WORDS[i] for i in rng.integers(0, len(PROSE_WORDS), n_words)]
    return " ".join(w + ("." if k % 12 == 11 else "") for k, w in enumerate(words))


def change_words(text, n, seed=0):
    words = text.split()
    rng = np.random.default_rng(seed)
    for i in rng.choice(len(words), n, replace=False):
        words[i] = "zebra" + str(i)
    return " ".join(words)
