"""Train a Qwen2-style tokenizer: byte-level BPE with Qwen2's pre-tokenizer (SPEC.md section 6).

Recipe: NFC, Qwen2's split regex (digits one by one), GPT-2's byte-level alphabet (all 256 bytes are
tokens), BPE merges learnt by the `tokenizers` library's trainer (Rust, multi-threaded: ~13 s for an
8k vocabulary on 20 MB of Python source on 2 cores), then the control tokens <|endoftext|>,
<|im_start|>, <|im_end|> right after the regular vocabulary. Written as a checkpoint's tokenizer files:
tokenizer.json, vocab.json, merges.txt and tokenizer_config.json (Qwen2's ChatML template) that both
`qwen2.load_tokenizer` and transformers' AutoTokenizer read.

Departure: the trainer's ids (merge order) become BPE ranks, and the merges we write are re-derived
from those ranks by replaying BPE on each token's bytes with the lower ranks, the way Qwen's own
vocab.json/merges.txt derive from qwen.tiktoken. That keeps rank-based BPE (tiktoken, what we run) and
pair-based BPE (transformers) giving the same ids even where the trainer made one token by two
different merges; a token that rank-based BPE could never produce is dropped (rare; reported).
`vocab_size` counts every id, the 3 control tokens included, so it can equal the model's vocab_size.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable, Iterator

from tqdm import tqdm

from qwen2.tokenizer.chat import QWEN2_CHAT_TEMPLATE
from qwen2.files import atomic_write_text
from qwen2.tokenizer.bpe import CONTROL_TOKENS, ENDOFTEXT, QWEN2_PATTERN, Tokenizer, bytes_to_unicode, load_tokenizer


def _input_files(inputs: Iterable[str | os.PathLike]) -> list[Path]:
    files = []
    for item in map(Path, inputs):
        if item.is_dir():
            files += sorted(p for p in item.rglob("*") if p.is_file())
        elif item.is_file():
            files.append(item)
        else:
            raise FileNotFoundError(f"--input {item}: no such file or directory")
    if not files:
        raise ValueError("--input: no files to train on")
    return files


def _texts(files: list[Path], progress: bool, skipped: list[Path]) -> Iterator[str]:
    bar = tqdm(total=sum(f.stat().st_size for f in files), unit="B", unit_scale=True, desc="reading", disable=not progress)
    for f in files:
        data = f.read_bytes()
        bar.update(len(data))
        try:
            yield data.decode("utf-8")
        except UnicodeDecodeError:
            skipped.append(f)  # binary files in a source tree (.pyc, images): not text
    bar.close()


def _learn_ranks(files: list[Path], n_regular: int, progress: bool) -> dict[bytes, int]:
    """BPE with the `tokenizers` trainer; returns token bytes -> rank (the trainer's id, merge order)."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models, normalizers, pre_tokenizers, trainers

    hf = HFTokenizer(models.BPE())
    hf.normalizer = normalizers.NFC()
    hf.pre_tokenizer = _pre_tokenizer()
    trainer = trainers.BpeTrainer(
        vocab_size=n_regular, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=progress
    )
    skipped: list[Path] = []
    hf.train_from_iterator(_texts(files, progress, skipped), trainer)
    if skipped and progress:
        print(f"skipped {len(skipped)} files that are not UTF-8 text (e.g. {skipped[0]})")
    decode = {c: b for b, c in bytes_to_unicode().items()}
    vocab = hf.get_vocab()
    return {bytes(decode[c] for c in token): i for token, i in vocab.items()}


def _pre_tokenizer():
    from tokenizers import Regex, pre_tokenizers

    return pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])


def _replay(token: bytes, lower: dict[bytes, int]) -> list[bytes]:
    """Rank-based BPE (tiktoken's rule: merge the adjacent pair whose concatenation ranks lowest) on
    `token`'s bytes, using only the tokens in `lower`."""
    parts = [bytes([b]) for b in token]
    while len(parts) > 1:
        ranked = [(lower.get(parts[i] + parts[i + 1]), i) for i in range(len(parts) - 1)]
        ranked = [(r, i) for r, i in ranked if r is not None]
        if not ranked:
            break
        _, i = min(ranked)
        parts[i : i + 2] = [parts[i] + parts[i + 1]]
    return parts


def derive_merges(ranks: dict[bytes, int], progress: bool = False) -> tuple[dict[bytes, int], list[tuple[bytes, bytes]]]:
    """Ranks -> (ranks renumbered 0..n-1, one merge per multi-byte token in rank order), dropping tokens
    that rank-based BPE cannot build from two lower-ranked tokens."""
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


def save_tokenizer_files(ranks: dict[bytes, int], merges: list[tuple[bytes, bytes]], out_dir: Path, model_max_length: int = 32768) -> None:
    """Write tokenizer.json, vocab.json, merges.txt, tokenizer_config.json (each to a temporary name, then renamed)."""
    from tokenizers import AddedToken, decoders, models, normalizers, processors
    from tokenizers import Tokenizer as HFTokenizer

    u = bytes_to_unicode()
    as_text = lambda b: "".join(u[x] for x in b)  # noqa: E731
    vocab = {as_text(t): r for t, r in ranks.items()}
    merge_pairs = [(as_text(a), as_text(b)) for a, b in merges]
    hf = HFTokenizer(models.BPE(vocab=vocab, merges=merge_pairs))
    hf.normalizer = normalizers.NFC()
    hf.pre_tokenizer = _pre_tokenizer()
    hf.decoder = decoders.ByteLevel()
    hf.post_processor = processors.ByteLevel(trim_offsets=False)
    hf.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in CONTROL_TOKENS])
    control = {t: len(ranks) + k for k, t in enumerate(CONTROL_TOKENS)}
    assert all(hf.token_to_id(t) == i for t, i in control.items()), "control tokens must follow the regular vocabulary"

    config = {
        "add_prefix_space": False,
        "added_tokens_decoder": {
            str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False, "special": True}
            for t, i in control.items()
        },
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
        "bos_token": None,
        "chat_template": QWEN2_CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": ENDOFTEXT,  # a base (pre-training) tokenizer, like Qwen2 base; chat stops at <|im_end|>
        "errors": "replace",
        "model_max_length": model_max_length,
        "pad_token": ENDOFTEXT,
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / "tokenizer.json", hf.to_str(pretty=False))
    atomic_write_text(out_dir / "vocab.json", json.dumps(vocab, ensure_ascii=False))
    atomic_write_text(out_dir / "merges.txt", "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merge_pairs))
    atomic_write_text(out_dir / "tokenizer_config.json", json.dumps(config, ensure_ascii=False, indent=2))


def train_tokenizer(
    files: Iterable[str | os.PathLike], vocab_size: int, out_dir: str | os.PathLike, progress: bool = True
) -> Tokenizer:
    """Train on `files` (files, or directories read recursively; non-UTF-8 files are skipped) and write a
    checkpoint's tokenizer files to `out_dir`. `vocab_size` = regular tokens + 3 control tokens.
    Returns the written tokenizer, as `load_tokenizer(out_dir)` reads it."""
    if vocab_size < 256 + len(CONTROL_TOKENS) + 1:
        raise ValueError(f"--vocab-size {vocab_size}: must be at least {256 + len(CONTROL_TOKENS) + 1} (256 bytes + 3 control tokens + 1)")
    out_dir = Path(out_dir)
    ranks, merges = derive_merges(_learn_ranks(_input_files(files), vocab_size - len(CONTROL_TOKENS), progress), progress)
    save_tokenizer_files(ranks, merges, out_dir)
    tokenizer = load_tokenizer(out_dir)
    if progress:
        short = vocab_size - len(tokenizer)
        note = f" ({short} fewer than asked: the text has no more pairs to merge, or unbuildable tokens were dropped)" if short else ""
        print(f"wrote {out_dir}: {len(tokenizer)} ids = {tokenizer.n_regular} regular + {len(CONTROL_TOKENS)} control{note}")
    return tokenizer
