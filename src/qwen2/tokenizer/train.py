"""Train a Qwen2-style tokenizer: byte-level BPE with Qwen2's pre-tokenizer (SPEC.md section 6).

Recipe: NFC, Qwen2's split regex (digits one by one), GPT-2's byte-level alphabet (all 256 bytes are
tokens), BPE merges learnt by the `tokenizers` library's trainer (Rust, multi-threaded: ~13 s for an
8k vocabulary on 20 MB of Python source on 2 cores), then the control tokens <|endoftext|>,
<|im_start|>, <|im_end|> right after the regular vocabulary. Written by `save_tokenizer` (save.py) as a
checkpoint's tokenizer files: tokenizer.json, vocab.json + merges.txt, tokenizer_config.json (Qwen2's
ChatML template; eos <|endoftext|>, as a base model's) and qwen.tiktoken, which both
`qwen2.load_tokenizer` and transformers' AutoTokenizer read.

Departure: the trainer's ids (merge order) become BPE ranks, and the merges we write are re-derived
from those ranks by replaying BPE on each token's bytes with the lower ranks (`derive_merges`), the way
Qwen's own vocab.json/merges.txt derive from qwen.tiktoken. That keeps rank-based BPE (tiktoken, what
we run) and pair-based BPE (transformers) giving the same ids even where the trainer made one token by
two different merges; a token that rank-based BPE could never produce is dropped (rare; reported).
`vocab_size` counts every id, the 3 control tokens included, so it can equal the model's vocab_size.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from pathlib import Path

from tqdm import tqdm

from qwen2.tokenizer.bpe import (
    CONTROL_TOKENS,
    ENDOFTEXT,
    QWEN2_CHAT_TEMPLATE,
    QWEN2_PATTERN,
    Tokenizer,
    bytes_to_unicode,
    load_tokenizer,
)
from qwen2.tokenizer.save import derive_merges, save_tokenizer


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
    bar = tqdm(
        total=sum(f.stat().st_size for f in files),
        unit="B",
        unit_scale=True,
        desc="reading",
        disable=not progress,
    )
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

    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )


def train_tokenizer(
    files: Iterable[str | os.PathLike], vocab_size: int, out_dir: str | os.PathLike, progress: bool = True
) -> Tokenizer:
    """Train on `files` (files, or directories read recursively; non-UTF-8 files are skipped) and write a
    checkpoint's tokenizer files to `out_dir`. `vocab_size` = regular tokens + 3 control tokens.
    Returns the written tokenizer, as `load_tokenizer(out_dir)` reads it."""
    if vocab_size < 256 + len(CONTROL_TOKENS) + 1:
        raise ValueError(
            f"--vocab-size {vocab_size}: must be at least {256 + len(CONTROL_TOKENS) + 1} "
            "(256 bytes + 3 control tokens + 1)"
        )
    out_dir = Path(out_dir)
    learnt = _learn_ranks(_input_files(files), vocab_size - len(CONTROL_TOKENS), progress)
    ranks, _ = derive_merges(learnt, progress)  # renumbered without the tokens rank-based BPE cannot build
    control = {t: len(ranks) + k for k, t in enumerate(CONTROL_TOKENS)}
    # A base (pre-training) tokenizer, like Qwen2 base: eos <|endoftext|>; chat stops at <|im_end|>.
    trained = Tokenizer(
        ranks,
        control,
        QWEN2_PATTERN,
        eos_token=ENDOFTEXT,
        pad_token=ENDOFTEXT,
        chat_template=QWEN2_CHAT_TEMPLATE,
        name=out_dir.name,
    )
    save_tokenizer(trained, out_dir)
    tokenizer = load_tokenizer(out_dir)
    if progress:
        short = vocab_size - len(tokenizer)
        note = (
            (
                f" ({short} fewer than asked: the text has no more pairs to merge, or unbuildable tokens "
                "were dropped)"
            )
            if short
            else ""
        )
        print(
            f"wrote {out_dir}: {len(tokenizer)} ids = {tokenizer.n_regular} regular + "
            f"{len(CONTROL_TOKENS)} control{note}"
        )
    return tokenizer
