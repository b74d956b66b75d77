"""Reading corpora and prepare_corpus end to end: read -> filter -> dedup -> tokenize -> shards + report."""

import inspect
import json
import json.encoder
import sys
import sysconfig

import numpy as np
import pytest
import torch

from qwen2.data import (
    Mixture,
    PackedLoader,
    ShardSet,
    Source,
    default_corpus_files,
    long_source,
    open_corpus,
    package_documents,
    prepare_corpus,
    python_docstrings,
)
from texts import change_words, prose

CODE = inspect.getsource(json.encoder)


class ByteTokenizer:
    """Stand-in used only while qwen2.tokenizer.bpe is absent: UTF-8 bytes, EOT 256."""

    name, endoftext_id = "bytes", 256

    def encode(self, text):
        return list(text.encode("utf-8"))

    def encode_batch(self, texts):
        return [self.encode(t) for t in texts]

    def decode(self, ids):
        return bytes(ids).decode("utf-8")


@pytest.fixture(scope="module")
def tok(tokenizer_dir):
    try:
        from qwen2.tokenizer.bpe import load_tokenizer
    except ImportError:
        return ByteTokenizer()
    return load_tokenizer(tokenizer_dir)


@pytest.fixture
def corpus(tmp_path):
    root = tmp_path / "corpus"
    (root / "sub").mkdir(parents=True)
    base = prose(300, seed=0)
    (root / "a.txt").write_text(base)
    (root / "b.txt").write_text("  " + base.upper().replace(" ", "\n"))  # exact duplicate of a
    (root / "c.md").write_text(change_words(base, 3, seed=1))  # near duplicate of a
    (root / "d.py").write_text(CODE)
    (root / "data.jsonl").write_text(
        "\n".join(
            json.dumps({"text": t, "id": i})
            for i, t in enumerate([prose(200, seed=1), "", prose(200, seed=2), base])
        )
        + "\n\n"
    )
    (root / "e.txt").write_text(
        "\n".join(" ".join(str(10**6 + 37 * i + j) for j in range(10)) for i in range(50))
    )
    (root / "f.txt").write_text("tiny")
    (root / "g.txt").write_bytes("caf\xe9 ".encode("latin-1") * 100)  # not UTF-8: skipped
    (root / "sub" / "h.txt").write_text(prose(250, seed=3))
    (root / ".hidden").mkdir()
    (root / ".hidden" / "x.txt").write_text(prose(300, seed=4))
    (root / "__pycache__").mkdir()
    (root / "__pycache__" / "y.py").write_text(prose(300, seed=5))
    (root / "k.bin").write_bytes(b"\0" * 500)
    return root


EXPECTED_KEPT = ["a.txt", "d.py", "data.jsonl:1", "data.jsonl:3", "h.txt"]


def test_prepare_corpus_report_and_shards(corpus, tmp_path, tok):
    out = tmp_path / "out"
    report = prepare_corpus(corpus, tok, out, progress=False)
    src = report["sources"]["default"]
    assert src["read"]["files"] == 9 and src["read"]["skipped_files"] == 1
    assert src["read"]["docs"] == 10  # 7 files + 3 non-empty JSONL lines (g.txt skipped)
    dropped = {r["step"]: r["docs_dropped"] for r in src["steps"]}
    assert dropped == {
        "length": 1,
        "digit_ratio": 1,
        "symbol_ratio": 0,
        "line_repetition": 0,
        "ngram_repetition": 0,
        "exact_dedup": 2,
        "minhash_dedup": 1,
    }
    assert src["steps"][-1]["docs_kept"] == src["kept"]["docs"] == len(EXPECTED_KEPT)
    assert src["steps"][0]["bytes_dropped"] == 4
    assert json.loads((out / "report.json").read_text()) == report
    assert report["total"]["kept"] == src["kept"]

    shards = open_corpus(out)
    assert isinstance(shards, ShardSet) and len(shards) == 5
    assert shards.n_tokens == src["kept"]["tokens"]
    assert shards.meta["endoftext_id"] == tok.endoftext_id
    texts = [tok.decode(d.tolist()) for d in shards]
    assert texts[0] == prose(300, seed=0) and texts[1] == CODE and texts[4] == prose(250, seed=3)

    # The loader packs them with <|endoftext|> between documents.
    batch = next(PackedLoader(shards, seq_len=64, batch_size=2, shuffle=False))["input_ids"]
    assert batch.shape == (2, 65) and batch.dtype == torch.long


def test_prepare_is_cached_until_an_input_changes(corpus, tmp_path, tok):
    out = tmp_path / "out"
    first = prepare_corpus(corpus, tok, out, progress=False)
    manifest = out / "default" / "manifest.json"
    mtime = manifest.stat().st_mtime_ns
    assert prepare_corpus(corpus, tok, out, progress=False) == first
    assert manifest.stat().st_mtime_ns == mtime
    (corpus / "sub" / "h.txt").write_text(prose(260, seed=7))
    again = prepare_corpus(corpus, tok, out, progress=False)
    assert again["fingerprint"] != first["fingerprint"]
    assert (
        prepare_corpus(corpus, tok, out, filters=None, progress=False)["sources"]["default"]["kept"]["docs"]
        == 7
    )


def test_prepare_without_filters_or_dedup_keeps_every_document(corpus, tmp_path, tok):
    report = prepare_corpus(corpus, tok, tmp_path / "out", filters=None, dedup=None, progress=True)
    assert report["sources"]["default"]["steps"] == []
    assert report["sources"]["default"]["kept"]["docs"] == 10


def test_sources_are_deduplicated_across_and_mixed(corpus, tmp_path, tok):
    sources = [
        Source("text", [corpus / "a.txt", corpus / "sub"], weight=3),
        Source("more", [corpus / "data.jsonl", corpus / "d.py"], weight=1),
    ]
    report = prepare_corpus(sources, tok, tmp_path / "out", progress=False)
    assert report["sources"]["text"]["kept"]["docs"] == 2
    more = report["sources"]["more"]
    assert {r["step"]: r["docs_dropped"] for r in more["steps"]}[
        "exact_dedup"
    ] == 1  # a.txt's copy in the JSONL
    mix = open_corpus(tmp_path / "out")
    assert isinstance(mix, Mixture) and mix.names == ["text", "more"] and mix.weights.tolist() == [0.75, 0.25]
    assert open_corpus(tmp_path / "out", weights={"text": 1}).names == ["text"]
    loader = PackedLoader(tmp_path / "out", seq_len=32, batch_size=2)
    assert next(loader)["input_ids"].shape == (2, 33)


def test_source_names_must_be_folder_names(tmp_path, tok):
    with pytest.raises(ValueError, match="unique"):
        prepare_corpus([Source("x", tmp_path), Source("x", tmp_path)], tok, tmp_path / "o")
    with pytest.raises(ValueError, match="usable"):
        prepare_corpus({"a/b": tmp_path}, tok, tmp_path / "o")
    with pytest.raises(FileNotFoundError, match="no such file"):
        prepare_corpus(tmp_path / "missing", tok, tmp_path / "o")


def test_jsonl_field_errors_name_the_line(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text('{"text": "ok"}\n{"body": "no text"}\n')
    with pytest.raises(ValueError, match=r"d.jsonl:2: no string field 'text'"):
        list(Source("s", f).docs())
    with pytest.raises(ValueError, match=r"d.jsonl:1: no string field 'body'"):
        list(Source("s", f, text_field="body").docs())
    f.write_text('{"text": "ok"}\nnot json\n')
    with pytest.raises(ValueError, match=r"d.jsonl:2: not a JSON object"):
        list(Source("s", f).docs())


def test_parquet(tmp_path, monkeypatch):
    f = tmp_path / "d.parquet"
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["first doc", None, "second doc"], "n": [1, 2, 3]}), f)
    assert [d.text for d in Source("s", f).docs()] == ["first doc", "second doc"]
    with pytest.raises(ValueError, match="no column 'body'"):
        list(Source("s", f, text_field="body").docs())
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)  # as if pyarrow were not installed
    with pytest.raises(ImportError, match="pip install 'qwen2\\[data\\]'"):
        list(Source("s", f).docs())


def test_default_corpus_is_the_stdlib():
    files = default_corpus_files()
    stdlib = sysconfig.get_paths()["stdlib"]
    names = {str(f.relative_to(stdlib)) for f in files}
    assert "os.py" in names and "json/encoder.py" in names and any(n.endswith(".txt") for n in names)
    assert all(f.suffix in (".py", ".txt") for f in files)
    assert not any("site-packages" in f.parts or "__pycache__" in f.parts for f in files)
    no_tests = default_corpus_files(include_tests=False)
    assert 0 < len(no_tests) < len(files) and not any("test" in f.parts for f in no_tests)


def test_docstrings_and_package_documents(tmp_path):
    src = (
        '"""Module doc."""\nclass A:\n    """Class doc."""\n    def f(self):\n        """Method doc."""\n'
        'def g():\n    """Function doc."""\n'
    )
    assert python_docstrings(src) == "Module doc.\n\nClass doc.\n\nMethod doc.\n\nFunction doc."
    assert python_docstrings("def (:") == ""
    (tmp_path / "pkg").mkdir()
    for name in ("a.py", "b.py", "c.py"):
        (tmp_path / "pkg" / name).write_text(f"x = '{name}'\n" * 20)
    (tmp_path / "other.py").write_text("y = 1\n")
    docs = list(package_documents(sorted(tmp_path.rglob("*.py"))))
    assert len(docs) == 2
    pkg = next(d.text for d in docs if "a.py" in d.text)
    assert pkg.index("# file: a.py") < pkg.index("# file: b.py") < pkg.index("# file: c.py")
    assert len(list(package_documents(sorted((tmp_path / "pkg").glob("*.py")), max_chars=300))) == 3
    assert [d.text for d in Source("d", tmp_path / "pkg", kind="docstrings").docs()] == []


def test_long_source_makes_long_documents(tmp_path):
    src = long_source()
    docs = list(src.docs())
    lengths = np.array([len(d.text) for d in docs])
    assert np.median(lengths) > 20_000
    # Pieces stop at max_chars, unless one file alone is longer.
    assert all(len(d.text) <= src.max_chars or d.text.count("# file: ") == 1 for d in docs)
    assert sum(lengths) > 0.9 * sum(f.stat().st_size for f in src.files())
