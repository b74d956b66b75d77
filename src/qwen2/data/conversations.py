"""Conversation data for post-training (paper section 4.1-4.3; SPEC 7): SFT, preference and prompt sets.

TRL's conversational formats, one record a line of JSONL (or a row of parquet):
    SFT          {"messages": [{"role": ..., "content": ...}, ...]}
    preference   {"prompt": [...], "chosen": [...], "rejected": [...]}, or the implicit-prompt form
                 {"chosen": [...], "rejected": [...]}: full conversations whose shared prefix is the prompt
    prompts      {"prompt": [...]} (online DPO samples the replies)
Ids and loss masks come from tokenizer.chat.encode_chat: the mask covers every assistant turn and its
<|im_end|> (tool calls included), and a preference completion covers the chosen / rejected turns only.

Examples are shifted once, per conversation, into aligned pairs (input_ids[i], labels[i] = the next id
or IGNORE_INDEX), so packing never makes one conversation's last token predict the next one's first.
`pack` puts several conversations in one row with positions restarting at 0 for each; the losses
(train.posttrain_losses.DocumentMask) turn the restarts into a block-causal mask, so packed rows give the
same loss as the conversations one by one. `pad` right-pads instead.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import torch

from qwen2.tokenizer.bpe import Tokenizer
from qwen2.tokenizer.chat import encode_chat

IGNORE_INDEX = -100  # = qwen2.train.losses.IGNORE_INDEX (data may not import train)
ROLES = ("system", "user", "assistant", "tool")


class DataError(ValueError):
    """A bad record: the message names the file, the line and the fix."""


def read_records(path: str | os.PathLike) -> Iterator[tuple[str, dict]]:
    """(where, record) for each record of a .jsonl / .parquet file; where = "file:line" (1-based)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file (expected a .jsonl or .parquet conversation file)")
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        for i, rec in enumerate(pq.read_table(path).to_pylist(), 1):
            yield f"{path}:row {i}", rec
        return
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                msg = f"{path}:{i}: not valid JSON ({e.msg}); write one JSON object per line"
                raise DataError(msg) from None
            if not isinstance(rec, dict):
                raise DataError(f"{path}:{i}: a record must be a JSON object, got {type(rec).__name__}")
            yield f"{path}:{i}", rec


def _messages(rec: dict, key: str, where: str) -> list[dict]:
    msgs = rec.get(key)
    if not isinstance(msgs, list) or not msgs:
        raise DataError(
            f"{where}: field {key!r} must be a non-empty list of messages "
            f'[{{"role": ..., "content": ...}}], got {type(msgs).__name__}'
        )
    for j, m in enumerate(msgs):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise DataError(f"{where}: {key}[{j}] must be a message with role one of {ROLES}")
        if not isinstance(m.get("content", ""), (str, type(None))):
            raise DataError(f"{where}: {key}[{j}].content must be a string")
    return msgs


def sft_messages(rec: dict, where: str) -> list[dict]:
    msgs = _messages(rec, "messages", where)
    if not any(m["role"] == "assistant" for m in msgs):
        raise DataError(
            f"{where}: 'messages' has no assistant turn, so nothing to train on; add one or drop the record"
        )
    return msgs


def preference(rec: dict, where: str) -> tuple[list[dict], list[dict], list[dict]]:
    """(prompt, chosen, rejected) message lists; the implicit-prompt form is split at the shared prefix."""
    chosen, rejected = _messages(rec, "chosen", where), _messages(rec, "rejected", where)
    if "prompt" in rec:
        return _messages(rec, "prompt", where), chosen, rejected
    n = 0
    while n < min(len(chosen), len(rejected)) - 1 and chosen[n] == rejected[n]:
        n += 1
    if n == 0:
        raise DataError(
            f"{where}: no 'prompt' and 'chosen' / 'rejected' share no first message; "
            "add a 'prompt' field or start both with the same prompt turns"
        )
    return chosen[:n], chosen[n:], rejected[n:]


def prompt_messages(rec: dict, where: str) -> list[dict]:
    return _messages(rec, "prompt", where)


def _example(ids: list[int], mask: list[int], max_len: int | None) -> dict:
    """Aligned pair: input_ids = ids[:-1], labels[i] = ids[i+1] where mask[i+1] else IGNORE_INDEX."""
    if max_len is not None:
        ids, mask = ids[: max_len + 1], mask[: max_len + 1]
    labels = [t if k else IGNORE_INDEX for t, k in zip(ids[1:], mask[1:], strict=True)]
    return {"input_ids": ids[:-1], "labels": labels}


def encode_sft(tok: Tokenizer, messages: list[dict], max_len: int | None = None, **chat) -> dict:
    """One SFT example: loss on every assistant turn and its <|im_end|>. `chat`: encode_chat's options."""
    ids, mask = encode_chat(tok, messages, **chat)
    return _example(ids, mask, max_len)


def encode_completion(
    tok: Tokenizer, prompt: list[dict], completion: list[dict], max_len: int | None = None, **chat
) -> dict:
    """prompt + completion with the loss on the completion's assistant turns only (DPO, reward data)."""
    ids, mask = encode_chat(tok, prompt + completion, **chat)
    n = len(encode_chat(tok, prompt, add_generation_prompt=True, **chat)[0])
    mask = [0] * n + mask[n:]  # the prompt's own assistant turns (history) carry no loss
    return _example(ids, mask, max_len)


def _at(where: str, encode, *args, **kw):
    """Run an encoder, naming the record when encode_chat rejects a message."""
    try:
        return encode(*args, **kw)
    except (ValueError, TypeError, KeyError) as e:
        raise DataError(f"{where}: {e}") from None


def load_sft(path, tok: Tokenizer, max_len: int | None = None, **chat) -> list[dict]:
    return [
        _at(where, encode_sft, tok, sft_messages(rec, where), max_len, **chat)
        for where, rec in read_records(path)
    ]


def load_preferences(path, tok: Tokenizer, max_len: int | None = None, **chat) -> list[tuple[dict, dict]]:
    """[(chosen example, rejected example)] for DPO and reward-model training."""
    out = []
    for where, rec in read_records(path):
        prompt, chosen, rejected = preference(rec, where)
        out.append(
            (
                _at(where, encode_completion, tok, prompt, chosen, max_len, **chat),
                _at(where, encode_completion, tok, prompt, rejected, max_len, **chat),
            )
        )
    return out


def load_prompts(path) -> list[list[dict]]:
    return [prompt_messages(rec, where) for where, rec in read_records(path)]


def pad(examples: list[dict], pad_id: int, length: int | None = None) -> dict:
    """Right-pad examples into {"input_ids", "labels"} [B, T] (T = the longest, or `length`)."""
    t = length or max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), t), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), t), IGNORE_INDEX, dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e["input_ids"])
        ids[i, :n] = torch.tensor(e["input_ids"])
        labels[i, :n] = torch.tensor(e["labels"])
    return {"input_ids": ids, "labels": labels}


def pack(examples: list[dict], seq_len: int, pad_id: int) -> dict:
    """Greedy packing in order into rows of `seq_len`: {"input_ids", "labels", "position_ids"} [R, seq_len].

    Positions restart at 0 at each conversation (and for the padding tail, which carries no loss).
    Examples longer than seq_len are truncated to it.
    """
    rows: list[list[dict]] = [[]]
    used = 0
    for e in examples:
        n = min(len(e["input_ids"]), seq_len)
        if used + n > seq_len:
            rows.append([])
            used = 0
        rows[-1].append({"input_ids": e["input_ids"][:n], "labels": e["labels"][:n]})
        used += n
    ids = torch.full((len(rows), seq_len), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), seq_len), IGNORE_INDEX, dtype=torch.long)
    pos = torch.zeros((len(rows), seq_len), dtype=torch.long)
    for r, row in enumerate(rows):
        s = 0
        for e in row:
            n = len(e["input_ids"])
            ids[r, s : s + n], labels[r, s : s + n] = torch.tensor(e["input_ids"]), torch.tensor(e["labels"])
            pos[r, s : s + n] = torch.arange(n)
            s += n
        pos[r, s:] = torch.arange(seq_len - s)
    return {"input_ids": ids, "labels": labels, "position_ids": pos}


def preference_batch(pairs: list[tuple[dict, dict]], pad_id: int) -> dict:
    """TRL's concatenated layout: input_ids / labels [2B, T], the B chosen rows first, right-padded."""
    return pad([c for c, _ in pairs] + [r for _, r in pairs], pad_id)
