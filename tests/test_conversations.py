"""Conversation data (TRL's conversational formats): masks from encode_chat, the preference forms, packing
rows, and one-line errors naming the file and line."""

import json

import pytest
import torch

from qwen2.data.conversations import (
    IGNORE_INDEX,
    DataError,
    encode_completion,
    load_preferences,
    load_prompts,
    load_sft,
    pack,
    pad,
    preference,
)
from qwen2.tokenizer.chat import encode_chat

CONV = [
    {"role": "user", "content": "What is 2+3?"},
    {"role": "assistant", "content": "5"},
    {"role": "user", "content": "And 4+4?"},
    {"role": "assistant", "content": "8"},
]
TOOL_CONV = [
    {"role": "user", "content": "Weather in Paris?"},
    {
        "role": "assistant",
        "content": "",
        "tool_calls": [{"type": "function", "function": {"name": "weather", "arguments": {"city": "Paris"}}}],
    },
    {"role": "tool", "content": "sunny"},
    {"role": "assistant", "content": "It is sunny."},
]
CITY = {"type": "object", "properties": {"city": {"type": "string"}}}
TOOLS = [
    {
        "type": "function",
        "function": {"name": "weather", "description": "Weather of a city", "parameters": CITY},
    }
]


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def trained_text(tok, ex):
    return tok.decode([t for t in ex["labels"] if t != IGNORE_INDEX])


def test_sft_labels_are_every_assistant_turn_and_its_im_end(tok, tmp_path):
    (ex,) = load_sft(write_jsonl(tmp_path / "sft.jsonl", [{"messages": CONV}]), tok)
    ids, mask = encode_chat(tok, CONV)
    assert ex["input_ids"] == ids[:-1] and len(ex["labels"]) == len(ex["input_ids"])
    assert ex["labels"] == [t if k else IGNORE_INDEX for t, k in zip(ids[1:], mask[1:], strict=True)]
    assert trained_text(tok, ex) == "5<|im_end|>8<|im_end|>"


def test_sft_tool_calls_are_trained(tok, tmp_path):
    (ex,) = load_sft(write_jsonl(tmp_path / "t.jsonl", [{"messages": TOOL_CONV}]), tok, tools=TOOLS)
    text = trained_text(tok, ex)
    assert "<tool_call>" in text and "Paris" in text and text.endswith("It is sunny.<|im_end|>")
    assert "sunny\n" not in text.split("It is")[0]  # the tool's result is context, not trained


def test_preference_forms_explicit_and_implicit_agree(tok, tmp_path):
    prompt = CONV[:3]
    chosen, rejected = [{"role": "assistant", "content": "8"}], [{"role": "assistant", "content": "9"}]
    explicit = {"prompt": prompt, "chosen": chosen, "rejected": rejected}
    implicit = {"chosen": prompt + chosen, "rejected": prompt + rejected}
    assert preference(implicit, "x") == (prompt, chosen, rejected)
    path = write_jsonl(tmp_path / "pref.jsonl", [explicit, implicit])
    (c1, r1), (c2, r2) = load_preferences(path, tok)
    assert (c1, r1) == (c2, r2)
    # only the completion is trained: the prompt's own assistant turn ("5") is history
    assert trained_text(tok, c1) == "8<|im_end|>" and trained_text(tok, r1) == "9<|im_end|>"
    assert c1 == encode_completion(tok, prompt, chosen)


def test_prompts_and_parquet(tok, tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    write_jsonl(tmp_path / "p.jsonl", [{"prompt": CONV[:1]}, {"prompt": CONV[:3]}])
    assert load_prompts(tmp_path / "p.jsonl") == [CONV[:1], CONV[:3]]
    pq.write_table(pa.Table.from_pylist([{"messages": CONV}]), tmp_path / "sft.parquet")
    jsonl = write_jsonl(tmp_path / "s.jsonl", [{"messages": CONV}])
    assert load_sft(tmp_path / "sft.parquet", tok) == load_sft(jsonl, tok)


@pytest.mark.parametrize(
    "line,match",
    [
        ("{not json", "not valid JSON"),
        ('{"messages": "hi"}', "field 'messages' must be a non-empty list"),
        ('{"messages": [{"role": "robot", "content": "x"}]}', r"messages\[0\] must be a message with role"),
        ('{"messages": [{"role": "user", "content": "x"}]}', "no assistant turn"),
    ],
)
def test_bad_records_name_file_and_line(tok, tmp_path, line, match):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"messages": CONV}) + "\n\n" + line + "\n")
    with pytest.raises(DataError, match=match) as e:
        load_sft(path, tok)
    assert str(e.value).startswith(f"{path}:3: ") and "\n" not in str(e.value)


def test_bad_preference_records(tok, tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"chosen": CONV[3:], "rejected": CONV[1:2]}])
    with pytest.raises(DataError, match=r"p.jsonl:1: no 'prompt'"):
        load_preferences(path, tok)


def test_pack_rows_restart_positions_and_keep_each_example():
    examples = [
        {"input_ids": list(range(1, n + 1)), "labels": [IGNORE_INDEX] + list(range(2, n + 1))}
        for n in (5, 7, 3, 10)
    ]
    rows = pack(examples, seq_len=12, pad_id=0)
    ids, labels, pos = rows["input_ids"], rows["labels"], rows["position_ids"]
    assert ids.shape == (3, 12)
    assert pos[0].tolist() == [0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 5, 6]
    assert pos[1].tolist()[:3] == [0, 1, 2] and pos[1, 3] == 0  # short example, then the padding tail
    assert (labels[1, 3:] == IGNORE_INDEX).all() and (ids[1, 3:] == 0).all()
    # every example comes back unchanged, in order
    starts = [(r, s) for r in range(3) for s in range(12) if pos[r, s] == 0 and ids[r, s] != 0]
    got = [ids[r, s : s + len(e["input_ids"])].tolist() for (r, s), e in zip(starts, examples, strict=True)]
    assert got == [e["input_ids"] for e in examples]
    padded = pad(examples, pad_id=0)
    assert padded["input_ids"].shape == (4, 10)
    assert torch.equal(padded["labels"][2, 3:], torch.full((7,), IGNORE_INDEX))
