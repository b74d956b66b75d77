"""Reading corpora: folders of text files, JSONL, parquet -> a stream of documents.

Pre-training data for the paper (SPEC.md section 3.2; paper section 3.1) is web text, code, books and
more, filtered and deduplicated before tokenization. This module only reads: one `Doc` per text file,
per JSONL line, or per parquet row, in a deterministic order (sorted paths), so a rerun reads the same
stream. A `Source` names a set of paths with a mixture weight and a `kind` that says how files become
documents:

    "auto"        by extension: .jsonl / .jsonl.gz -> one doc per line (`text_field`), .parquet -> one doc
                  per row (needs pyarrow), anything else -> the whole file is one doc
    "docstrings"  .py files -> the module's, classes' and functions' docstrings as one English document
    "package"     long documents: the files of one directory concatenated (each under a `# file:` line),
                  cut at `max_chars`; the long-context stage's data (paper: documents up to 32K tokens)

The speedrun's default corpus is the Python standard library of the running interpreter
(`default_corpus_files()`): its .py sources (docstrings included) and its .txt files; CPython ships no
.rst documentation with an install.
"""

from __future__ import annotations

import ast
import gzip
import io
import json
import os
import sysconfig
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from qwen2.extras import require

TEXT_EXTENSIONS = (".txt", ".md", ".rst", ".py")
DATA_EXTENSIONS = (".jsonl", ".jsonl.gz", ".parquet")
_SKIP_DIRS = {"__pycache__", "site-packages", "dist-packages", ".git", ".hg", ".svn", "node_modules"}


@dataclass
class Doc:
    """One document: its text and where it came from (`path` or `path:line` / `path#row`)."""

    text: str
    origin: str = ""


@dataclass
class Source:
    """Named paths (files or folders) with a mixture weight; see the module docstring for `kind`."""

    name: str
    paths: Sequence[str | os.PathLike] | str | os.PathLike
    weight: float = 1.0
    kind: str = "auto"  # "auto" | "docstrings" | "package"
    text_field: str = "text"
    extensions: Sequence[str] = TEXT_EXTENSIONS + DATA_EXTENSIONS
    max_chars: int = 400_000  # "package" only: a longer group is cut into several documents
    skipped: list[str] = field(
        default_factory=list, repr=False
    )  # files that are not UTF-8 text, filled by reading

    def __post_init__(self):
        if isinstance(self.paths, (str, os.PathLike)):
            self.paths = [self.paths]
        self.paths = [Path(p) for p in self.paths]
        if self.kind not in ("auto", "docstrings", "package"):
            raise ValueError(
                f"Source {self.name!r}: kind must be 'auto', 'docstrings' or 'package', not {self.kind!r}"
            )
        if not (self.weight >= 0):
            raise ValueError(f"Source {self.name!r}: weight must be >= 0, not {self.weight!r}")

    def files(self) -> list[Path]:
        """Every file this source reads, in a deterministic order."""
        return list_files(self.paths, self.extensions)

    def docs(self, files: Sequence[Path] | None = None) -> Iterator[Doc]:
        """Read the documents, file by file (`files`: this source's, listed already). Files that are not
        UTF-8 are skipped and listed in `skipped`."""
        self.skipped = []
        files = self.files() if files is None else files
        if self.kind == "package":
            yield from package_documents(files, self.max_chars, self.skipped)
            return
        for path in files:
            if self.kind == "docstrings":
                text = _read_text(path, self.skipped)
                text = python_docstrings(text) if text is not None and path.suffix == ".py" else text
                if text:
                    yield Doc(text, str(path))
            else:
                yield from read_file(path, self.text_field, self.skipped)


def as_sources(sources) -> list[Source]:
    """Normalise what `prepare_corpus` accepts: a Source, a path, a list of paths (one source named
    "default"), a list of Sources, or a dict {name: paths | Source}."""
    if isinstance(sources, Source):
        return [sources]
    if isinstance(sources, (str, os.PathLike)):
        return [Source("default", [sources])]
    if isinstance(sources, dict):
        out = [s if isinstance(s, Source) else Source(name, s) for name, s in sources.items()]
    else:
        sources = list(sources)
        if sources and all(isinstance(s, Source) for s in sources):
            out = sources
        elif any(isinstance(s, Source) for s in sources):
            raise ValueError("sources: mix of Source objects and paths; wrap the paths in a Source")
        else:
            out = [Source("default", sources)]
    names = [s.name for s in out]
    if len(set(names)) != len(names):
        raise ValueError(f"sources: names must be unique, got {names}")
    for n in names:
        if not n or "/" in n or n.startswith("."):
            raise ValueError(f"sources: {n!r} is not a usable source name (it names a folder of shards)")
    return out


def list_files(
    paths: Iterable[str | os.PathLike], extensions: Sequence[str] = TEXT_EXTENSIONS + DATA_EXTENSIONS
) -> list[Path]:
    """Files named directly, plus files under folders whose name ends with one of `extensions`
    (hidden entries, __pycache__ and site-packages skipped), sorted within each folder."""
    out: list[Path] = []
    for p in paths:
        p = Path(p)
        if p.is_file():
            out.append(p)
        elif p.is_dir():
            found = []
            for root, dirs, names in os.walk(p):
                dirs[:] = [d for d in dirs if d not in _SKIP_DIRS and not d.startswith(".")]
                found += [
                    Path(root, n) for n in names if not n.startswith(".") and n.endswith(tuple(extensions))
                ]
            out += sorted(found)
        else:
            raise FileNotFoundError(f"{p}: no such file or folder (a corpus source path)")
    return out


def read_file(path: Path, text_field: str = "text", skipped: list[str] | None = None) -> Iterator[Doc]:
    """The documents of one file, chosen by its extension (see the module docstring)."""
    name = path.name
    if name.endswith((".jsonl", ".jsonl.gz")):
        yield from read_jsonl(path, text_field)
    elif name.endswith(".parquet"):
        yield from read_parquet(path, text_field)
    else:
        text = _read_text(path, skipped)
        if text:
            yield Doc(text, str(path))


def read_jsonl(path: Path, text_field: str = "text") -> Iterator[Doc]:
    """One doc per non-blank line; each line a JSON object with a string field `text_field`."""
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(
                    f"{path}:{i}: not a JSON object ({e.msg}); JSONL wants one object per line"
                ) from None
            text = row.get(text_field) if isinstance(row, dict) else None
            if not isinstance(text, str):
                raise ValueError(f"{path}:{i}: no string field {text_field!r} (set Source(text_field=...))")
            if text:
                yield Doc(text, f"{path}:{i}")


def read_parquet(path: Path, text_field: str = "text", batch_rows: int = 4096) -> Iterator[Doc]:
    """One doc per row of column `text_field`, read in record batches (needs pyarrow)."""
    pq = require("pyarrow.parquet", "data", f"{path}: reading parquet")  # the data extra; JSONL needs nothing
    f = pq.ParquetFile(path)
    if text_field not in f.schema_arrow.names:
        raise ValueError(
            f"{path}: no column {text_field!r}; columns are {f.schema_arrow.names} "
            "(set Source(text_field=...))"
        )
    row = 0
    for batch in f.iter_batches(batch_size=batch_rows, columns=[text_field]):
        for text in batch.column(0).to_pylist():
            if isinstance(text, str) and text:
                yield Doc(text, f"{path}#{row}")
            row += 1


def _read_text(path: Path, skipped: list[str] | None = None) -> str | None:
    """A file's text, or None (noted in `skipped`) where it is not UTF-8: test data in other encodings."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        if skipped is not None:
            skipped.append(str(path))
        return None


def python_docstrings(source: str) -> str:
    """The docstrings of a Python module (module, then classes and functions in source order), joined by
    blank lines; "" when the file does not parse or has none. English prose for the corpus."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return ""
    parts = []
    for node in _docstring_nodes(tree):
        doc = ast.get_docstring(node, clean=True)
        if doc:
            parts.append(doc)
    return "\n\n".join(parts)


def _docstring_nodes(tree: ast.Module):
    # Depth-first in source order (ast.walk is breadth-first, which would scatter a class's methods).
    yield tree
    stack = list(reversed(tree.body))
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            yield node
            stack.extend(reversed(node.body))


def package_documents(
    files: Sequence[Path], max_chars: int = 400_000, skipped: list[str] | None = None
) -> Iterator[Doc]:
    """Long documents: the files of each directory concatenated in name order, each preceded by a
    `# file: NAME` line, cut into pieces of at most about `max_chars` (at file boundaries; a single longer
    file is its own piece). A package's modules read together make documents far longer than one file."""
    groups: dict[Path, list[Path]] = {}
    for f in files:
        groups.setdefault(f.parent, []).append(f)
    for folder, members in groups.items():
        buf = io.StringIO()
        first = None
        for f in sorted(members):
            text = _read_text(f, skipped)
            if not text:
                continue
            piece = f"# file: {f.name}\n{text}\n\n"
            if buf.tell() and buf.tell() + len(piece) > max_chars:
                yield Doc(buf.getvalue(), f"{folder}/{first}..")
                buf = io.StringIO()
                first = None
            first = first or f.name
            buf.write(piece)
        if buf.tell():
            yield Doc(buf.getvalue(), f"{folder}/{first}..")


def stdlib_dir() -> Path:
    """The running interpreter's standard library folder."""
    return Path(sysconfig.get_paths()["stdlib"])


def default_corpus_files(
    include_tests: bool = True, extensions: Sequence[str] = (".py", ".txt")
) -> list[Path]:
    """The speedrun's default corpus: every .py and .txt file of the Python standard library on this
    machine (no site-packages). `include_tests=False` leaves out test folders (test/, tests/,
    idle_test/), about half of the bytes."""
    root = stdlib_dir()
    if not root.is_dir():
        raise FileNotFoundError(
            f"{root}: the Python standard library folder is missing; pass a corpus folder instead"
        )
    files = list_files([root], extensions)
    if not include_tests:
        tests = {"test", "tests", "idle_test"}
        files = [f for f in files if not tests.intersection(f.relative_to(root).parts[:-1])]
    return files


def default_source(include_tests: bool = True) -> Source:
    """The speedrun's corpus as one Source: the standard library's .py and .txt files."""
    return Source("stdlib", default_corpus_files(include_tests))


def long_source(include_tests: bool = True, max_chars: int = 400_000) -> Source:
    """Long documents for the long-context stage: the standard library's modules concatenated folder by
    folder (kind "package"); prepare it beside the default corpus and mix the two."""
    return Source(
        "stdlib-long",
        default_corpus_files(include_tests, extensions=(".py",)),
        kind="package",
        max_chars=max_chars,
    )
