"""MMLU (paper section 5.1.1: 5-shot), lm-evaluation-harness's `mmlu` format exactly: per subject the
description "The following are multiple choice questions (with answers) about {subject}.\n\n", the
first K questions of the dev split as shots, then the question, "Answer:" and the choices " A".." D"
scored by log-likelihood (acc).

Data (Hugging Face cais/mmlu): DATA/mmlu/all/{dev,test}-*.parquet, or DATA/mmlu/{dev,test}/*.parquet
or *.jsonl, with columns question, subject, choices (4 strings), answer (0-3).
"""

from __future__ import annotations

from qwen2.eval.harness import read_split

KIND = "choice"
SHOTS = 5
METRICS = ("acc",)
LETTERS = "ABCD"
WHAT = "cais/mmlu's files (columns question, subject, choices, answer)"


def patterns(split: str, root: str = "mmlu") -> list[str]:
    return [
        f"{root}/all/{split}-*.parquet",
        f"{root}/all/{split}*.jsonl",
        f"{root}/{split}/*.parquet",
        f"{root}/{split}/*.jsonl",
        f"{root}/{split}*.parquet",
        f"{root}/{split}*.jsonl",
        f"{root}/*/{split}-*.parquet",
    ]


def question(doc: dict) -> str:
    """lm-eval's doc_to_text."""
    c = doc["choices"]
    return f"{doc['question'].strip()}\nA. {c[0]}\nB. {c[1]}\nC. {c[2]}\nD. {c[3]}\nAnswer:"


def description(subject: str) -> str:
    return (
        f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"
    )


def prompt(doc: dict, shots: list[dict]) -> str:
    fewshot = "".join(f"{question(s)} {LETTERS[int(s['answer'])]}\n\n" for s in shots)
    return description(doc["subject"]) + fewshot + question(doc)


def load(data_dir, shots: int) -> list[dict]:
    dev = read_split(data_dir, "mmlu", patterns("dev"), WHAT)
    test = read_split(data_dir, "mmlu", patterns("test"), WHAT)
    by_subject: dict[str, list[dict]] = {}
    for d in dev:
        by_subject.setdefault(d["subject"], []).append(d)
    seen: dict[str, int] = {}
    docs = []
    for d in sorted(test, key=lambda d: d["subject"]):  # lm-eval runs subject by subject
        i = seen[d["subject"]] = seen.get(d["subject"], -1) + 1
        docs.append(
            {
                "id": f"{d['subject']}/{i}",
                "prompt": prompt(d, by_subject.get(d["subject"], [])[:shots]),
                "continuations": [f" {x}" for x in LETTERS],
                "choices": list(LETTERS),
                "gold": int(d["answer"]),
                "subject": d["subject"],
            }
        )
    return docs
