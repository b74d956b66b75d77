"""Decontamination (paper section 4.1 / 5: training items that overlap the evaluation sets are
removed; the 13-gram rule of GPT-3 and Qwen2). An item is dropped when it shares a word 13-gram
(lowercased \\w+ tokens) with any evaluation document, or, with min_chars > 0, a common substring of
`min_chars` characters (whitespace collapsed, lowercased). The evaluation documents are every string
field of every row of the task files under --eval-data (the same files `qwen2 eval --data` reads:
.jsonl / .json / .parquet / .csv, read by eval.harness.read_rows), or of the files given.

No model. Outputs OUT/clean.jsonl (the kept records, unchanged), OUT/dropped.jsonl and
OUT/report.json (per dropped item: its id, the evaluation file and the matching n-gram)."""

from __future__ import annotations

import json
import re
from pathlib import Path

from tqdm import tqdm

from qwen2.eval.harness import read_rows
from qwen2.files import atomic_write_text
from qwen2.synth.runner import write_jsonl

DATA_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")


def strings(obj) -> list[str]:
    """Every string inside a record (message contents, answers, choices)."""
    if isinstance(obj, str):
        return [obj]
    if isinstance(obj, dict):
        return [s for v in obj.values() for s in strings(v)]
    if isinstance(obj, (list, tuple)):
        return [s for v in obj for s in strings(v)]
    return []


def ngrams(text: str, n: int) -> set[tuple[str, ...]]:
    words = re.findall(r"\w+", text.lower())
    return {tuple(words[i : i + n]) for i in range(len(words) - n + 1)}


def _flat(text: str) -> str:
    return " ".join(text.lower().split())


def eval_files(paths) -> list[Path]:
    files = []
    for p in map(Path, paths):
        if p.is_dir():
            files += sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in DATA_SUFFIXES)
        elif p.is_file():
            files.append(p)
        else:
            raise FileNotFoundError(f"--eval-data {p}: no such file or folder (the evaluation task files)")
    if not files:
        raise FileNotFoundError(
            f"--eval-data {', '.join(map(str, paths))}: no {'/'.join(DATA_SUFFIXES)} files"
        )
    return files


class Index:
    """The n-grams (and, with min_chars, the character windows) of the evaluation documents."""

    def __init__(self, files, n: int = 13, min_chars: int = 0):
        self.n, self.min_chars = n, min_chars
        self.grams: dict[tuple, str] = {}
        self.windows: dict[int, str] = {}
        for f in tqdm(files, desc="eval sets", unit="file"):
            for row in read_rows(f):
                for s in strings(row):
                    for g in ngrams(s, n):
                        self.grams.setdefault(g, str(f))
                    if min_chars:
                        t = _flat(s)
                        for i in range(len(t) - min_chars + 1):
                            self.windows.setdefault(hash(t[i : i + min_chars]), str(f))

    def match(self, record) -> dict | None:
        for s in strings(record):
            for g in ngrams(s, self.n):
                if g in self.grams:
                    return {"rule": f"{self.n}-gram", "match": " ".join(g), "eval_file": self.grams[g]}
            if self.min_chars:
                t = _flat(s)
                for i in range(len(t) - self.min_chars + 1):
                    h = hash(t[i : i + self.min_chars])
                    if h in self.windows:
                        return {
                            "rule": f"{self.min_chars}-char substring",
                            "match": t[i : i + self.min_chars],
                            "eval_file": self.windows[h],
                        }
        return None


def decontaminate(input_path, eval_data, out, *, n: int = 13, min_chars: int = 0) -> dict:
    path = Path(input_path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such input file (training JSONL to clean)")
    index = Index(
        eval_files(eval_data if isinstance(eval_data, (list, tuple)) else [eval_data]), n, min_chars
    )
    records = read_rows(path)
    kept, dropped, report = [], [], []
    for i, rec in enumerate(tqdm(records, desc="decontaminate", unit="item")):
        hit = index.match(rec)
        if hit is None:
            kept.append(rec)
        else:
            dropped.append(rec)
            report.append({"id": rec.get("id", i) if isinstance(rec, dict) else i, "line": i + 1, **hit})
    outp = Path(out)
    outp.mkdir(parents=True, exist_ok=True)
    write_jsonl(outp / "clean.jsonl", kept)
    write_jsonl(outp / "dropped.jsonl", dropped)
    counts = {
        "items": len(records),
        "kept": len(kept),
        "dropped": len(dropped),
        "eval_ngrams": len(index.grams),
    }
    atomic_write_text(
        outp / "report.json", json.dumps({"counts": counts, "dropped": report}, indent=2) + "\n"
    )
    manifest = {
        "pipeline": "decontaminate",
        "model": None,
        "seed": None,
        "params": {
            "n": n,
            "min_chars": min_chars,
            "eval_data": [
                str(e) for e in (eval_data if isinstance(eval_data, (list, tuple)) else [eval_data])
            ],
        },
        "counts": counts,
        "files": {k: str(outp / f"{k}.jsonl") for k in ("clean", "dropped")}
        | {"report": str(outp / "report.json")},
    }
    atomic_write_text(outp / "manifest.json", json.dumps(manifest, indent=2) + "\n")
    return manifest
