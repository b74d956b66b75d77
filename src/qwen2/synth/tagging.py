"""Tagging and selection (paper section 4.1, "Automatic Ontology Extraction" and "Instruction
Selection"; InsTag, Lu et al. 2023). `tag`: the model labels each instruction with fine-grained intent
tags as JSON (prompts/tag.txt); tags are normalized (lowercase, single spaces) and the log keeps the raw
reply. `select`: InsTag's complexity-first diverse sampling: instructions sorted by tag count (most
first; ties by input order), an instruction taken when it adds a tag not yet covered, passes repeated
over the rest until `size` are taken (a pass that adds nothing takes the most complex remaining).

tag input {"id"?, "prompt"} -> tagged.jsonl {"id", "prompt", "tags": [...]} (what select reads)."""

from __future__ import annotations

import json
import re

from qwen2.synth.runner import Run, chat, fill, prompt_text, read_items, write_jsonl


def normalize_tag(tag: str) -> str:
    return " ".join(re.sub(r"[^\w\s-]", " ", tag.lower().replace("_", " ")).split())


def parse_tags(text: str) -> list[str] | None:
    """Tags from the model's JSON list (of {"tag": ...} objects or strings); None when it is not JSON."""
    m = re.search(r"\[.*\]", text, re.S)
    if not m:
        return None
    try:
        data = json.loads(m.group(0))
    except ValueError:
        return None
    tags = []
    for x in data if isinstance(data, list) else []:
        t = x.get("tag") if isinstance(x, dict) else x
        if isinstance(t, str) and normalize_tag(t) and normalize_tag(t) not in tags:
            tags.append(normalize_tag(t))
    return tags


def tag(backend, input_path, out, *, temperature=0.0, max_tokens=256, seed=1234, chunk=16) -> dict:
    items = read_items(input_path, ["prompt"])
    template = prompt_text("tag")
    params = dict(temperature=temperature, max_tokens=max_tokens, seed=seed)
    run = Run(out, "tag", params, backend)

    def work(batch):
        outs = backend.sample(
            [chat(fill(template, prompt=it["prompt"])) for it in batch],
            1,
            temperature=temperature,
            max_tokens=max_tokens,
            seed=seed,
        )
        return [
            {"id": it["id"], "prompt": it["prompt"], "raw": o[0], "tags": parse_tags(o[0])}
            for it, o in zip(batch, outs, strict=True)
        ]

    recs = run.process(items, work, chunk)
    tagged = [
        {"id": r["id"], "prompt": r["prompt"], "tags": r["tags"]} for r in recs if r["tags"] is not None
    ]
    counts = {
        "items": len(recs),
        "tagged": len(tagged),
        "unparsed": len(recs) - len(tagged),
        "distinct_tags": len({t for r in tagged for t in r["tags"]}),
    }
    return run.finish({"tagged": tagged}, counts)


def select_items(items: list[dict], size: int) -> list[dict]:
    """InsTag complexity-first diverse sampling (the docstring above); returns the chosen, in order taken."""
    rest = sorted(range(len(items)), key=lambda i: -len(items[i]["tags"]))
    covered: set[str] = set()
    chosen: list[int] = []
    while rest and len(chosen) < size:
        took = []
        for i in rest:
            if len(chosen) == size:
                break
            if set(items[i]["tags"]) - covered:
                covered |= set(items[i]["tags"])
                chosen.append(i)
                took.append(i)
        if not took:  # every tag covered: the next most complex
            took = [rest[0]]
            chosen.append(rest[0])
        rest = [i for i in rest if i not in set(took)]
    return [items[i] for i in chosen]


def select(input_path, out, *, size: int) -> dict:
    """No model: tagged.jsonl -> OUT/selected.jsonl (prompt format) and OUT/manifest.json."""
    import json as _json
    from pathlib import Path

    from qwen2.files import atomic_write_text

    items = read_items(input_path, ["prompt", "tags"])
    chosen = select_items(items, size)
    outp = Path(out)
    outp.mkdir(parents=True, exist_ok=True)
    n = write_jsonl(
        outp / "selected.jsonl",
        [
            {
                "id": it["id"],
                "tags": it["tags"],
                "prompt": it["prompt"]
                if isinstance(it["prompt"], list)
                else [{"role": "user", "content": it["prompt"]}],
            }
            for it in chosen
        ],
    )
    all_tags = {t for it in items for t in it["tags"]}
    got = {t for it in chosen for t in it["tags"]}
    manifest = {
        "pipeline": "select",
        "model": None,
        "params": {"size": size},
        "seed": None,
        "counts": {"items": len(items), "selected": n, "tags": len(all_tags), "tags_covered": len(got)},
        "files": {"selected": str(outp / "selected.jsonl")},
    }
    atomic_write_text(outp / "manifest.json", _json.dumps(manifest, indent=2) + "\n")
    return manifest
