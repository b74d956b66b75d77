"""Writing a checkpoint's tokenizer files: `save_tokenizer(tokenizer, DIR)` writes tokenizer.json,
vocab.json + merges.txt, tokenizer_config.json (with the chat template) and qwen.tiktoken, which
transformers' AutoTokenizer and `load_tokenizer` both read with identical ids.

The Hugging Face files store BPE as merges; we run rank-based BPE (tiktoken). `derive_merges` replays BPE
on each token's bytes with the lower ranks to find the merge that builds it; for Qwen2's 151,643 ranks
that takes ~10 s, so vocabularies of 32K tokens or more keep their merges in ~/.cache/qwen2/merges.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from pathlib import Path

from tqdm import tqdm

from qwen2.files import atomic_write_text
from qwen2.tokenizer.bpe import Tokenizer, bytes_to_unicode, ranks_from_vocab


# ---- saving -------------------------------------------------------------------------------------
def _replay(token: bytes, lower: dict[bytes, int]) -> list[bytes]:
    """Rank-based BPE (tiktoken's rule: merge the adjacent pair whose concatenation ranks lowest) on
    `token`'s bytes, using only the tokens in `lower`."""
    parts = [token[i : i + 1] for i in range(len(token))]
    rank_of = lower.get
    while len(parts) > 1:
        best, at = None, 0
        for i in range(len(parts) - 1):
            rank = rank_of(parts[i] + parts[i + 1])
            if rank is not None and (best is None or rank < best):
                best, at = rank, i
        if best is None:
            break
        parts[at : at + 2] = [parts[at] + parts[at + 1]]
    return parts


def derive_merges(
    ranks: dict[bytes, int], progress: bool = False
) -> tuple[dict[bytes, int], list[tuple[bytes, bytes]]]:
    """Ranks -> (ranks renumbered 0..n-1, one merge per multi-byte token in rank order), dropping tokens
    that rank-based BPE cannot build from two lower-ranked tokens (a trainer can make such tokens)."""
    kept: dict[bytes, int] = {}
    merges = []
    for token in tqdm(sorted(ranks, key=ranks.get), desc="merges", disable=not progress):
        if len(token) > 1:
            parts = _replay(token, kept)
            if len(parts) != 2:
                continue
            merges.append((parts[0], parts[1]))
        kept[token] = len(kept)
    return kept, merges


_CACHE_MIN_TOKENS = 32768  # smaller vocabularies derive their merges in about a second: not cached


def _merges_cache(key: str) -> Path:
    # Deriving Qwen2's merges costs ~8-13 s; they depend only on the ranks, so they are kept per ranks file.
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return root / "qwen2" / "merges" / f"{key}.txt"


def _merges(
    ranks: dict[bytes, int], vocab: dict[str, int], text: dict[bytes, str], key: str, name: str
) -> list[str]:
    """merges.txt's lines for `ranks`: from the cache when it holds a consistent file for `key` (the
    sha256 of the qwen.tiktoken text), else derived, checked and cached (best effort)."""
    cache = _merges_cache(key) if len(ranks) >= _CACHE_MIN_TOKENS else None
    if cache is not None and cache.is_file():
        try:
            lines = cache.read_text(encoding="utf-8").splitlines()
            ranks_from_vocab(vocab, lines, str(cache))  # the cheap consistency check load_tokenizer makes
            return lines
        except (OSError, ValueError):
            pass  # unreadable or damaged: derive again and rewrite it
    renumbered, merges = derive_merges(ranks)
    if renumbered != ranks:
        lost = sorted(set(ranks) - set(renumbered), key=ranks.get)
        where = f"token {lost[0]!r} (rank {ranks[lost[0]]})" if lost else "ranks that are not 0..n-1"
        raise ValueError(
            f"tokenizer {name}: {where} cannot be written as vocab.json + merges.txt: pair-based BPE "
            "(transformers) would give other ids than rank-based BPE; ranks must be 0..n-1 and every "
            "multi-byte token buildable from two lower-ranked tokens (derive_merges keeps those that are)"
        )
    lines = [f"{text[a]} {text[b]}" for a, b in merges]
    if cache is None:
        return lines
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(cache, "".join(f"{m}\n" for m in lines))
    except OSError:
        pass  # a read-only home only costs the next save the derivation
    return lines


def _tokenizer_json(vocab: dict[str, int], merges: list[str], tokenizer: Tokenizer) -> dict:
    """tokenizer.json as the `tokenizers` library writes Qwen2's: NFC, the split regex (isolated), then
    ByteLevel without its own regex; a plain BPE model; the control tokens as special added tokens."""
    flags = {"single_word": False, "lstrip": False, "rstrip": False, "normalized": False, "special": True}
    control = sorted(tokenizer.control_tokens.items(), key=lambda kv: kv[1])
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [{"id": i, "content": t, **flags} for t, i in control],
        "normalizer": {"type": "NFC"},
        "pre_tokenizer": {
            "type": "Sequence",
            "pretokenizers": [
                {
                    "type": "Split",
                    "pattern": {"Regex": tokenizer.pattern},
                    "behavior": "Isolated",
                    "invert": False,
                },
                {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False},
            ],
        },
        "post_processor": {
            "type": "ByteLevel",
            "add_prefix_space": True,
            "trim_offsets": False,
            "use_regex": True,
        },
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": "",
            "end_of_word_suffix": "",
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": False,
            "vocab": vocab,
            "merges": [m.split(" ") for m in merges],  # byte-level tokens hold no space
        },
    }


def _tokenizer_config(tokenizer: Tokenizer, model_max_length: int) -> dict:
    """tokenizer_config.json in Qwen2-Instruct's shape: this tokenizer's control tokens, eos/pad, template."""
    flags = {"lstrip": False, "normalized": False, "rstrip": False, "single_word": False, "special": True}
    control = sorted(tokenizer.control_tokens.items(), key=lambda kv: kv[1])
    config = {
        "add_prefix_space": False,
        "added_tokens_decoder": {str(i): {"content": t, **flags} for t, i in control},
        "additional_special_tokens": [t for t, _ in control if t != tokenizer.pad_token],
        "bos_token": None,
        "chat_template": tokenizer.chat_template,
        "clean_up_tokenization_spaces": False,
        "eos_token": tokenizer.eos_token,
        "errors": "replace",
        "model_max_length": model_max_length,
        "pad_token": tokenizer.pad_token,
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }
    if tokenizer.chat_template is None:
        del config["chat_template"]
    return config


def save_tokenizer(tokenizer: Tokenizer, path: str | os.PathLike, model_max_length: int = 32768) -> Path:
    """Write `tokenizer` into the folder `path` as a checkpoint's tokenizer files: tokenizer.json,
    vocab.json + merges.txt, tokenizer_config.json and qwen.tiktoken, each to a temporary name and then
    renamed. transformers' AutoTokenizer and load_tokenizer read the folder with this tokenizer's ids."""
    ranks = tokenizer.ranks()
    by_rank = sorted(ranks, key=ranks.get)
    tiktoken_text = "".join(f"{base64.b64encode(b).decode()} {ranks[b]}\n" for b in by_rank)
    u = bytes_to_unicode()
    text = {b: "".join(u[x] for x in b) for b in ranks}  # token bytes -> GPT-2 byte-level string
    vocab = {text[b]: ranks[b] for b in by_rank}
    key = hashlib.sha256(tiktoken_text.encode()).hexdigest()
    merges = _merges(ranks, vocab, text, key, tokenizer.name)

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    atomic_write_text(
        path / "tokenizer.json",
        json.dumps(_tokenizer_json(vocab, merges, tokenizer), indent=2, ensure_ascii=False),
    )
    atomic_write_text(path / "vocab.json", json.dumps(vocab, ensure_ascii=False))
    atomic_write_text(path / "merges.txt", "#version: 0.2\n" + "".join(f"{m}\n" for m in merges))
    atomic_write_text(path / "qwen.tiktoken", tiktoken_text)
    config = _tokenizer_config(tokenizer, model_max_length)
    atomic_write_text(path / "tokenizer_config.json", json.dumps(config, ensure_ascii=False, indent=2) + "\n")
    # A chat_template.jinja left in the folder would override the config's template for both readers.
    if (path / "chat_template.jinja").is_file():
        if tokenizer.chat_template is None:
            (path / "chat_template.jinja").unlink()
        else:
            atomic_write_text(path / "chat_template.jinja", tokenizer.chat_template)
    return path
