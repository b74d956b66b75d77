"""Instruction evolution (paper section 4.1, "Instruction Evolution"; Evol-Instruct, Xu et al. 2023):
each instruction is deepened (made harder) or broadened (a new instruction in the same domain) by the
model, with the prompts in prompts/evolve_*.txt. Failed evolutions are dropped: refusals, copies of the
original (same normalized words, or a word-set Jaccard >= `max_similarity`) and ones under `min_words`.

Input {"id"?, "prompt"}; output prompts.jsonl in the prompt format {"prompt": [user turn]} with the
original's id and the operation; the log keeps each drop's reason."""

from __future__ import annotations

import random
import re

from qwen2.synth.runner import Run, chat, fill, prompt_text, read_items

OPS = ("deepen", "broaden")
_REFUSAL = re.compile(
    r"\b(I can(?:no|')t|I am (?:unable|not able)|I'm (?:unable|not able|sorry)|as an AI|I apologi[sz]e)\b",
    re.I,
)


def _words(text: str) -> list[str]:
    return re.findall(r"\w+", text.lower())


def failure(original: str, evolved: str, *, min_words: int, max_similarity: float) -> str | None:
    """Why an evolution is dropped, or None when it is kept."""
    a, b = _words(original), _words(evolved)
    if _REFUSAL.search(evolved):
        return "refusal"
    if a == b or len(set(a) & set(b)) / max(1, len(set(a) | set(b))) >= max_similarity:
        return "copy"
    if len(b) < min_words:
        return "too_short"
    return None


def evolve(
    backend,
    input_path,
    out,
    *,
    ops=OPS,
    rounds=1,
    temperature=0.7,
    max_tokens=256,
    min_words=5,
    max_similarity=0.9,
    seed=1234,
    chunk=16,
) -> dict:
    for op in ops:
        if op not in OPS:
            raise ValueError(f"--ops {op!r}: choose from {', '.join(OPS)}")
    items = read_items(input_path, ["prompt"])
    templates = {op: prompt_text(f"evolve_{op}") for op in ops}
    params = dict(
        ops=list(ops),
        rounds=rounds,
        temperature=temperature,
        max_tokens=max_tokens,
        min_words=min_words,
        max_similarity=max_similarity,
        seed=seed,
    )
    run = Run(out, "evolve", params, backend)

    def work(batch):
        recs = []
        current = {it["id"]: it["prompt"] for it in batch}
        steps = {it["id"]: [] for it in batch}
        for r in range(rounds):
            live = [it for it in batch if current[it["id"]] is not None]
            # the operation is a function of (seed, id, round): the same on a resumed run
            chosen = [random.Random(f"{seed}:{it['id']}:{r}").choice(ops) for it in live]
            outs = backend.sample(
                [
                    chat(fill(templates[op], prompt=current[it["id"]]))
                    for it, op in zip(live, chosen, strict=True)
                ],
                1,
                temperature=temperature,
                max_tokens=max_tokens,
                seed=seed + r,
            )
            for it, op, o in zip(live, chosen, outs, strict=True):
                text = o[0].strip()
                why = failure(current[it["id"]], text, min_words=min_words, max_similarity=max_similarity)
                steps[it["id"]].append({"op": op, "text": text, "dropped": why})
                current[it["id"]] = None if why else text
        for it in batch:
            recs.append({"id": it["id"], "original": it["prompt"], "steps": steps[it["id"]]})
        return recs

    recs = run.process(items, work, chunk)
    kept, dropped = [], {}
    for r in recs:
        for j, s in enumerate(r["steps"]):
            if s["dropped"]:
                dropped[s["dropped"]] = dropped.get(s["dropped"], 0) + 1
            else:
                kept.append(
                    {
                        "id": f"{r['id']}-evol{j + 1}",
                        "source_id": r["id"],
                        "op": s["op"],
                        "prompt": [{"role": "user", "content": s["text"]}],
                    }
                )
    counts = {"items": len(recs), "kept": len(kept), "dropped": dropped}
    return run.finish({"prompts": kept}, counts)
