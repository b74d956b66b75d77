"""C-Eval (paper: 5-shot), lm-evaluation-harness's `ceval-valid` format: per subject the description
"以下是中国关于{科目}的单项选择题，请选出其中的正确答案。\n\n", the first K dev questions as shots, then
"{question}\nA. ..\nB. ..\nC. ..\nD. ..\n答案：" with choices " A".." D" (acc, acc_norm), on the val split.
The Chinese subject names come from the dataset's subject_mapping.json (DATA/ceval/); without it the
file's subject name is used (the prompt then differs from lm-eval's in that one word).

Data (Hugging Face ceval/ceval-exam): DATA/ceval/{subject}/{dev,val}-*.parquet, or the original
release's DATA/ceval/{dev,val}/{subject}_{dev,val}.csv; columns question, A, B, C, D, answer.
"""

from __future__ import annotations

import json
from pathlib import Path

from qwen2.eval.harness import find_data, read_rows

KIND = "choice"
SHOTS = 5
METRICS = ("acc", "acc_norm")
LETTERS = "ABCD"
ROOT = "ceval"
SPLITS = ("dev", "val")
FIELDS = ("question", "answer")
DESCRIPTION = "以下是中国关于{}的单项选择题，请选出其中的正确答案。\n\n"
WHAT = "ceval/ceval-exam's files (columns question, A, B, C, D, answer)"


def by_subject(data_dir, split: str, root: str, what: str) -> dict[str, list[dict]]:
    """{subject: rows} of one split: the subject is the parquet file's folder or the CSV's name stem."""
    files = find_data(
        data_dir,
        root,
        [
            f"{root}/*/{split}-*.parquet",
            f"{root}/{split}/*.csv",
            f"{root}/{split}/*.jsonl",
            f"{root}/*/{split}*.jsonl",
        ],
        what,
    )
    out: dict[str, list[dict]] = {}
    for f in files:
        subject = f.parent.name if f.parent.name != split else f.stem.removesuffix(f"_{split}")
        out.setdefault(subject, []).extend(read_rows(f))
    return out


def subject_names(data_dir, root: str) -> dict[str, str]:
    path = Path(data_dir) / root / "subject_mapping.json"
    if not path.is_file():
        return {}
    return {k: (v[1] if isinstance(v, list) else v) for k, v in json.loads(path.read_text()).items()}


def load_exam(data_dir, shots: int, *, root: str, splits, fields, description: str, what: str) -> list[dict]:
    q, a = fields
    names = subject_names(data_dir, root)
    dev, test = (by_subject(data_dir, s, root, what) for s in splits)

    def text(d):
        return f"{str(d[q]).strip()}\nA. {d['A']}\nB. {d['B']}\nC. {d['C']}\nD. {d['D']}\n答案："

    docs = []
    for subject in sorted(test):
        fewshot = "".join(f"{text(s)} {s[a]}\n\n" for s in dev.get(subject, [])[:shots])
        desc = description.format(names.get(subject, subject.replace("_", " ")))
        for i, d in enumerate(test[subject]):
            docs.append(
                {
                    "id": f"{subject}/{i}",
                    "prompt": desc + fewshot + text(d),
                    "choices": list(LETTERS),
                    "continuations": [f" {x}" for x in LETTERS],
                    "gold": LETTERS.index(str(d[a]).strip()),
                }
            )
    return docs


def load(data_dir, shots: int) -> list[dict]:
    return load_exam(
        data_dir, shots, root=ROOT, splits=SPLITS, fields=FIELDS, description=DESCRIPTION, what=WHAT
    )
