"""Training a Qwen2-style tokenizer: the files load in load_tokenizer and transformers with the same ids,
round-trip text, split digits one by one, and put the control tokens right after the regular vocabulary."""

import glob
import random
import sysconfig
import unicodedata

import pytest
from hypothesis import given, settings
from test_tokenizer import TEXT, _load_hf

from qwen2.tokenizer.chat import QWEN2_CHAT_TEMPLATE, render_chat
from qwen2.cli import main
from qwen2.tokenizer.bpe import _read_tiktoken, bytes_to_unicode, load_tokenizer
from qwen2.tokenizer.train import derive_merges, train_tokenizer

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
    assert {p.name for p in out.iterdir()} == {"tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json"}
    assert len(tok) == VOCAB and tok.n_regular == VOCAB - 3
    assert (tok.endoftext_id, tok.im_start_id, tok.im_end_id) == (VOCAB - 3, VOCAB - 2, VOCAB - 1)
    assert tok.chat_template == QWEN2_CHAT_TEMPLATE
    # Qwen2's pre-tokenizer: numbers split digit by digit, so no token holds two digits.
    assert not any(sum(c.isdigit() for c in tok.decode([i])) > 1 for i in range(tok.n_regular))
    assert tok.encode("2024") == [tok.token_id(c.encode()) for c in "2024"]


def test_loads_in_transformers_with_same_ids(trained):
    out, tok = trained
    hf = _load_hf(out)
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
    assert tok.encode(text) == _load_hf(out).encode(text, add_special_tokens=False)


def test_vocab_and_merges_files_agree(trained, tmp_path):
    out, tok = trained
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        (tmp_path / name).write_bytes((out / name).read_bytes())
    other = load_tokenizer(tmp_path)
    text = open(_corpus_files()[-1], encoding="utf-8").read()
    assert other.encode(text) == tok.encode(text) and other.control_tokens == tok.control_tokens


def test_derive_merges_reproduces_qwen_files(tokenizer_dir):
    # Qwen's merges.txt is derived from qwen.tiktoken by replaying BPE with lower ranks; so is ours.
    ranks = _read_tiktoken(tokenizer_dir / "qwen.tiktoken")
    kept, merges = derive_merges(ranks)
    assert kept == ranks
    u = bytes_to_unicode()
    text = lambda b: "".join(u[x] for x in b)  # noqa: E731
    lines = (tokenizer_dir / "merges.txt").read_text(encoding="utf-8").splitlines()[1:]
    assert lines == [f"{text(a)} {text(b)}" for a, b in merges]


def test_derive_merges_drops_unbuildable_tokens():
    ranks = {bytes([b]): b for b in range(256)}
    ranks |= {b"ab": 256, b"bc": 257, b"abc": 258, b"xyz": 259}  # "xyz" has no two-part lower-rank build
    kept, merges = derive_merges(ranks)
    assert b"xyz" not in kept and merges == [(b"a", b"b"), (b"b", b"c"), (b"ab", b"c")]


def test_cli(tmp_path, capsys):
    src = tmp_path / "in.txt"
    src.write_text(open(_corpus_files()[0], encoding="utf-8").read())
    assert main(["tokenizer", "train", "--input", str(src), "--vocab-size", "400", "--out", str(tmp_path / "t")]) == 0
    assert len(load_tokenizer(tmp_path / "t")) <= 400
    assert main(["tokenizer", "train", "--input", str(src), "--vocab-size", "100", "--out", str(tmp_path / "u")]) == 2
    assert "vocab-size" in capsys.readouterr().err
    assert main(["tokenizer", "train", "--input", str(tmp_path / "missing"), "--vocab-size", "400", "--out", str(tmp_path / "v")]) == 2
