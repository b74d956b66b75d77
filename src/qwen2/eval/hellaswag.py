"""HellaSwag (blog: 10-shot), lm-evaluation-harness's `hellaswag`: its preprocessing (activity label +
ctx_a + capitalised ctx_b; WikiHow's " [title]" becomes ". ", other [brackets] dropped, double spaces
closed), the four endings as continuations, acc and acc_norm; scored on the validation split with
shots from train drawn by lm-eval's default sampler (Random(1234)).

Data (Hugging Face Rowan/hellaswag): DATA/hellaswag/{train,validation}-*.parquet (or .jsonl), fields
activity_label, ctx_a, ctx_b, endings, label.
"""

from __future__ import annotations

import re

from qwen2.eval.harness import lm_eval_fewshot, read_split

KIND = "choice"
SHOTS = 10
METRICS = ("acc", "acc_norm")
WHAT = "Rowan/hellaswag's files (fields activity_label, ctx_a, ctx_b, endings, label)"


def patterns(split: str) -> list[str]:
    return [f"hellaswag/{split}-*.parquet", f"hellaswag/{split}*.jsonl", f"hellaswag/data/{split}-*.parquet"]


def preprocess(text: str) -> str:
    text = text.strip().replace(" [title]", ". ")
    return re.sub(r"\[.*?\]", "", text).replace("  ", " ")


def process(doc: dict) -> dict:
    ctx = doc["ctx_a"] + " " + doc["ctx_b"].capitalize()
    return {
        "query": preprocess(doc["activity_label"] + ": " + ctx),
        "choices": [preprocess(e) for e in doc["endings"]],
        "gold": int(doc["label"]),
    }


def load(data_dir, shots: int) -> list[dict]:
    train = [process(d) for d in read_split(data_dir, "hellaswag", patterns("train"), WHAT)] if shots else []
    val = [process(d) for d in read_split(data_dir, "hellaswag", patterns("validation"), WHAT)]
    fewshot = lm_eval_fewshot(train, shots)
    docs = []
    for i, d in enumerate(val):
        ctx = "".join(f"{s['query']} {s['choices'][s['gold']]}\n\n" for s in fewshot(i))
        docs.append(
            {
                "id": str(i),
                "prompt": ctx + d["query"],
                "continuations": [f" {c}" for c in d["choices"]],
                "choices": d["choices"],
                "gold": d["gold"],
            }
        )
    return docs
