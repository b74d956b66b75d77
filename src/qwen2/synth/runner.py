"""What every synthesis run shares: the backend, prompt files, ChatML rendering, the resumable log and
the manifest. Items are processed in chunks; each finished item is one fsynced line of OUT/log.jsonl
(eval.harness.SampleLog), so a killed run redoes at most the chunk in flight. The final outputs are
rebuilt from the log and written atomically, in input order, so a resumed run's files equal an
uninterrupted one's."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Sequence
from importlib import resources
from pathlib import Path

from tqdm import tqdm

from qwen2.eval.harness import Endpoint, InProcess, SampleLog, read_rows
from qwen2.files import atomic_write_text
from qwen2.tokenizer.chat import render_chat


def prompt_text(name: str) -> str:
    """The text of synth/prompts/NAME.txt (editable, versioned with the package)."""
    return resources.files("qwen2.synth").joinpath("prompts", name + ".txt").read_text(encoding="utf-8")


def fill(template: str, **fields) -> str:
    """{name} placeholders only (str.format would choke on the braces of code and JSON in the fields)."""
    return re.sub(
        r"\{(\w+)\}", lambda m: str(fields[m.group(1)]) if m.group(1) in fields else m.group(0), template
    )


def chat(user: str, system: str | None = None) -> str:
    """One user turn as ChatML text with the assistant turn opened: what /v1/completions is sent."""
    msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]
    return render_chat(None, msgs, add_generation_prompt=True)


def make_client(model_or_url: str, *, tokenizer=None, api_key=None, concurrency=8, timeout=600.0, retries=6):
    """An Endpoint for an http(s) URL (our server, vLLM, SGLang), else InProcess over a checkpoint."""
    from qwen2.tokenizer.bpe import load_tokenizer

    if model_or_url.startswith(("http://", "https://")):
        tok = load_tokenizer(tokenizer or "Qwen2")
        return Endpoint(
            model_or_url, tok, api_key=api_key, concurrency=concurrency, timeout=timeout, retries=retries
        )
    from qwen2.checkpoint import load_model

    return InProcess(load_model(model_or_url), load_tokenizer(tokenizer or model_or_url))


def read_items(path, need: Sequence[str]) -> list[dict]:
    """The input rows, each with an "id" (the line number when absent) and the fields in `need`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such input file (expected JSONL, one item a line)")
    rows = read_rows(path)
    seen = set()
    for i, row in enumerate(rows):
        row["id"] = str(row.get("id", i))
        for f in need:
            if f not in row:
                raise ValueError(f"{path}: item {i} has no field {f!r}; every item needs {', '.join(need)}")
        if row["id"] in seen:
            raise ValueError(f"{path}: id {row['id']!r} appears twice; ids must be unique")
        seen.add(row["id"])
    return rows


def messages(prompt: str, reply: str) -> list[dict]:
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": reply}]


def write_jsonl(path: Path, records) -> int:
    recs = list(records)
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs))
    return len(recs)


class Run:
    """OUT/log.jsonl (resumable), the outputs and OUT/manifest.json for one pipeline run."""

    def __init__(self, out, pipeline: str, params: dict, backend=None):
        self.out = Path(out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.pipeline, self.params, self.backend = pipeline, params, backend
        self.log = SampleLog(self.out / "log.jsonl")
        self.started = time.time()

    def process(self, items: list[dict], work: Callable[[list[dict]], list[dict]], chunk: int) -> list[dict]:
        """work(chunk of items) -> one record per item (with its "id"); items already logged are skipped.
        Returns the records of all items in input order."""
        todo = [it for it in items if it["id"] not in self.log.done]
        with tqdm(total=len(items), initial=len(items) - len(todo), desc=self.pipeline, unit="item") as bar:
            for s in range(0, len(todo), chunk):
                for rec in work(todo[s : s + chunk]):
                    self.log.write(rec)
                    bar.update(1)
        self.log.close()
        return [self.log.done[it["id"]] for it in items]

    def finish(self, outputs: dict[str, list], counts: dict) -> dict:
        """Write each output file OUT/NAME.jsonl and the manifest; returns the manifest."""
        files = {name: str(self.out / f"{name}.jsonl") for name in outputs}
        for name, recs in outputs.items():
            counts[name] = write_jsonl(self.out / f"{name}.jsonl", recs)
        manifest = {
            "pipeline": self.pipeline,
            "model": getattr(self.backend, "model", None)
            if isinstance(self.backend, Endpoint)
            else (type(self.backend).__name__ if self.backend is not None else None),
            "base_url": getattr(self.backend, "base", None),
            "params": self.params,
            "seed": self.params.get("seed"),
            "counts": counts,
            "files": files,
            "seconds": round(time.time() - self.started, 3),
        }
        atomic_write_text(self.out / "manifest.json", json.dumps(manifest, indent=2) + "\n")
        return manifest
