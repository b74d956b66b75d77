"""Training a Qwen2-style tokenizer: the files load in load_tokenizer and transformers with the same ids,
round-trip text, split digits one by one, and put the control tokens right after the regular vocabulary."""

import glob
import random
import sysconfig
import unicodedata

import pytest
from hypothesis import given, settings

from hf_reference import hf_tokenizer
from qwen2.cli import main
from qwen2.tokenizer.bpe import load_tokenizer
from qwen2.tokenizer.chat import QWEN2_CHAT_TEMPLATE, render_chat
from qwen2.tokenizer.save import derive_merges
from qwen2.tokenizer.train import train_tokenizer
from texts import TEXT

VOCAB = 1200


def _corpus_files():
    files = sorted(glob.glob(sysconfig.get_paths()["stdlib"] + "/*.py"))
    return random.Random(0).sample(files, 40)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    corpus = tmp_path_factory.mktemp("corpus")
    for k, f in enumerate(_corpus_files()[:30]):
        (corpus / f"{k}.py").write_text(open(f, encoding="utf-8").read(), encoding="utf-8")
    (corpus / "sub").mkdir()
    (corpus / "sub" / "zh.txt").write_text("你好，世界。今天天气很好。1234567890 " * 200, encoding="utf-8")
    (corpus / "sub" / "blob.bin").write_bytes(bytes(range(256)) * 10)  # not UTF-8: skipped
    out = tmp_path_factory.mktemp("tok")
    tok = train_tokenizer([corpus], VOCAB, out, progress=False)
    return out, tok


def test_written_files_and_control_tokens(trained):
    out, tok = trained
    assert {p.name for p in out.iterdir()} == {
        "tokenizer.json",
        "vocab.json",
        "merges.txt",
        "tokenizer_config.json",
        "qwen.tiktoken",
    }
    assert len(tok) == VOCAB and tok.n_regular == VOCAB - 3
    assert (tok.endoftext_id, tok.im_start_id, tok.im_end_id) == (VOCAB - 3, VOCAB - 2, VOCAB - 1)
    assert tok.chat_template == QWEN2_CHAT_TEMPLATE
    # Qwen2's pre-tokenizer: numbers split digit by digit, so no token holds two digits.
    assert not any(sum(c.isdigit() for c in tok.decode([i])) > 1 for i in range(tok.n_regular))
    assert tok.encode("2024") == [tok.token_id(c.encode()) for c in "2024"]


def test_loads_in_transformers_with_same_ids(trained):
    out, tok = trained
    hf = hf_tokenizer(out)
    assert len(hf) == len(tok)
    held_out = [open(f, encoding="utf-8").read() for f in _corpus_files()[30:]]
    for text in [*held_out, "你好 <|im_end|> e\u0301 👩\u200d💻 3.14159\r\n\tdone"]:
        assert tok.encode(text) == hf.encode(text, add_special_tokens=False, split_special_tokens=True)
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    assert hf.apply_chat_template(messages, tokenize=False) == render_chat(tok, messages)


@settings(max_examples=60, deadline=None)
@given(TEXT)
def test_trained_round_trip_and_parity(trained, text):
    out, tok = trained
    assert tok.decode(tok.encode(text)) == unicodedata.normalize("NFC", text)
    assert tok.encode(text) == hf_tokenizer(out).encode(text, add_special_tokens=False)


def test_vocab_and_merges_files_agree(trained, tmp_path):
    out, tok = trained
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        (tmp_path / name).write_bytes((out / name).read_bytes())
    other = load_tokenizer(tmp_path)
    text = open(_corpus_files()[-1], encoding="utf-8").read()
    assert other.encode(text) == tok.encode(text) and other.control_tokens == tok.control_tokens


def test_derive_merges_drops_unbuildable_tokens():
    ranks = {bytes([b]): b for b in range(256)}
    ranks |= {b"ab": 256, b"bc": 257, b"abc": 258, b"xyz": 259}  # "xyz" has no two-part lower-rank build
    kept, merges = derive_merges(ranks)
    assert b"xyz" not in kept and merges == [(b"a", b"b"), (b"b", b"c"), (b"ab", b"c")]


def test_cli(tmp_path, capsys):
    src = tmp_path / "in.txt"
    src.write_text(open(_corpus_files()[0], encoding="utf-8").read())
    train = lambda src, size, out: main(
        [
            "tokenizer",
            "train",
            "--input",
            str(src),  # noqa: E731
            "--vocab-size",
            str(size),
            "--out",
            str(tmp_path / out),
        ]
    )
    assert train(src, 400, "t") == 0
    assert len(load_tokenizer(tmp_path / "t")) <= 400
    assert train(src, 100, "u") == 2
    assert "vocab-size" in capsys.readouterr().err
    assert train(tmp_path / "missing", 400, "v") == 2
