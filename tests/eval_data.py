"""Small MMLU-, ARC-, GSM8K- and HellaSwag-format data files in the Hugging Face layouts the eval tasks
read (cais/mmlu parquet, allenai/ai2_arc and openai/gsm8k JSONL): shared by the eval tests."""

import json
import random
from pathlib import Path

WORDS = (
    "cell membrane protein energy light water carbon gene enzyme river stone number seven blue "
    "quickly because large small plant animal root leaf acid base heat cold"
).split()


def _sentence(rnd, n):
    return " ".join(rnd.choice(WORDS) for _ in range(n))


def write_jsonl(path: Path, rows) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def write_data(root: Path, seed: int = 0) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rnd = random.Random(seed)
    subject = "high_school_biology"

    def mmlu_row():
        return {
            "question": _sentence(rnd, rnd.randint(4, 12)) + "?  ",
            "subject": subject,
            "choices": [_sentence(rnd, rnd.randint(1, 4)) for _ in range(4)],
            "answer": rnd.randrange(4),
        }

    for split, n in (("dev", 5), ("test", 8)):
        (root / "mmlu/all").mkdir(parents=True, exist_ok=True)
        pq.write_table(
            pa.Table.from_pylist([mmlu_row() for _ in range(n)]),
            root / f"mmlu/all/{split}-00000-of-00001.parquet",
        )

    def arc_row(i):
        k = rnd.choice((3, 4, 5))
        labels = list("ABCDE"[:k]) if rnd.random() < 0.8 else [str(j + 1) for j in range(k)]
        return {
            "id": f"Q{i}",
            "question": _sentence(rnd, rnd.randint(4, 10)) + "?",
            "choices": {"text": [_sentence(rnd, rnd.randint(1, 5)) for _ in range(k)], "label": labels},
            "answerKey": rnd.choice(labels),
        }

    for split, n in (("train", 12), ("validation", 2), ("test", 5)):
        write_jsonl(
            root / f"ARC-Challenge/{split}-00000-of-00001.jsonl", [arc_row(f"{split}{i}") for i in range(n)]
        )

    def gsm_row():
        a, b = rnd.randint(1, 50), rnd.randint(1, 50)
        return {
            "question": f"Tom has {a} apples and buys {b} more. How many apples does he have?",
            "answer": f"He has {a} + {b} = <<{a}+{b}={a + b}>>{a + b} apples.\n#### {a + b}",
        }

    write_jsonl(root / "gsm8k/main/train-00000-of-00001.jsonl", [gsm_row() for _ in range(8)])
    write_jsonl(root / "gsm8k/main/test-00000-of-00001.jsonl", [gsm_row() for _ in range(3)])
    return root
