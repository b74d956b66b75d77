"""ARC-Challenge (paper / blog: 25-shot), lm-evaluation-harness's `arc_challenge` format: "Question:
{question}\nAnswer:" with each choice's text as a continuation (acc, and acc_norm: log-likelihood per
character); shots drawn from the train split by lm-eval's default sampler (Random(1234), in order).

Data (Hugging Face allenai/ai2_arc): DATA/ARC-Challenge/{train,test}-*.parquet (or .jsonl), columns
id, question, choices {text, label}, answerKey.
"""

from __future__ import annotations

from qwen2.eval.harness import lm_eval_fewshot, read_split

KIND = "choice"
SHOTS = 25
METRICS = ("acc", "acc_norm")
WHAT = "allenai/ai2_arc's ARC-Challenge files (columns question, choices, answerKey)"


def patterns(split: str) -> list[str]:
    return [
        f"{root}/{split}-*.{ext}"
        for root in ("ARC-Challenge", "ai2_arc/ARC-Challenge", "arc_challenge")
        for ext in ("parquet", "jsonl")
    ] + [f"ARC-Challenge/*{split}*.jsonl"]


def question(doc: dict) -> str:
    return f"Question: {doc['question']}\nAnswer:"


def gold(doc: dict) -> int:
    return list(doc["choices"]["label"]).index(doc["answerKey"])


def load(data_dir, shots: int) -> list[dict]:
    train = read_split(data_dir, "arc_challenge", patterns("train"), WHAT) if shots else []
    test = read_split(data_dir, "arc_challenge", patterns("test"), WHAT)
    fewshot = lm_eval_fewshot(train, shots)
    docs = []
    for i, d in enumerate(test):
        ctx = "".join(f"{question(s)} {s['choices']['text'][gold(s)]}\n\n" for s in fewshot(i))
        texts = list(d["choices"]["text"])
        docs.append(
            {
                "id": str(d.get("id", i)),
                "prompt": ctx + question(d),
                "continuations": [f" {t}" for t in texts],
                "choices": texts,
                "gold": gold(d),
            }
        )
    return docs
