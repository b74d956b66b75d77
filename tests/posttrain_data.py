"""A tiny post-training world for tests: a small trained tokenizer, a random Qwen2 of that vocabulary
saved with its tokenizer, and SFT / preference / prompt files built from data.tasks' arithmetic problems
(preferences: the right answer over a wrong one)."""

from __future__ import annotations

import json
import random
from pathlib import Path


def write_jsonl(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def make_world(root: Path, n: int = 24, vocab: int = 400, seed: int = 0) -> dict:
    """{"model", "base", "sft", "prefs", "prompts"}: paths under `root` (created once, reused)."""
    from qwen2.checkpoint import copy_side_files, save_model
    from qwen2.config import ModelConfig
    from qwen2.data import tasks
    from qwen2.model import build_model
    from qwen2.tokenizer.train import train_tokenizer

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    out = {k: root / k for k in ("model", "base")}
    out.update(sft=root / "sft.jsonl", prefs=root / "prefs.jsonl", prompts=root / "prompts.jsonl")
    if (out["model"] / "config.json").is_file():
        return out
    probs = tasks.problems(n, seed, families=("arithmetic",))
    text = root / "text.txt"
    text.write_text("".join(tasks.as_text(p) for p in tasks.problems(200, seed + 1)) * 2)
    tok = train_tokenizer([text], vocab, root / "tok", progress=False)
    cfg = ModelConfig.preset("tiny").replace(vocab_size=len(tok), tie_word_embeddings=False)
    for name, s in (("base", 1), ("model", 2)):
        save_model(build_model(cfg, seed=s), out[name])
        copy_side_files(root / "tok", out[name])
    rng = random.Random(seed)
    write_jsonl(out["sft"], [{"messages": tasks.as_messages(p)} for p in probs])
    prefs = []
    for p in probs:
        wrong = str(int(p["answer"]) + rng.randint(1, 9))
        msgs = tasks.as_messages(p)
        prefs.append(
            {
                "prompt": msgs[:-1],
                "chosen": [msgs[-1]],
                "rejected": [{"role": "assistant", "content": wrong}],
            }
        )
    write_jsonl(out["prefs"], prefs)
    write_jsonl(out["prompts"], [{"prompt": tasks.as_messages(p)[:-1]} for p in probs])
    return out
