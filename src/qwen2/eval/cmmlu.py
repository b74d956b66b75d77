"""CMMLU (paper: 5-shot), lm-evaluation-harness's `cmmlu` format: the description
"以下是关于{科目}的单项选择题，请直接给出正确答案的选项。\n\n", the first K dev questions, then
"{Question}\nA. ..\nD. ..\n答案：" with choices " A".." D" (acc, acc_norm), on the test split. Chinese
subject names from DATA/cmmlu/subject_mapping.json ({"agronomy": "农学", ...}) when present.

Data (haonan-li/cmmlu): DATA/cmmlu/{dev,test}/{subject}.csv (the release) or
DATA/cmmlu/{subject}/{dev,test}-*.parquet; columns Question, A, B, C, D, Answer.
"""

from __future__ import annotations

from qwen2.eval.ceval import load_exam

KIND = "choice"
SHOTS = 5
METRICS = ("acc", "acc_norm")
DESCRIPTION = "以下是关于{}的单项选择题，请直接给出正确答案的选项。\n\n"
WHAT = "haonan-li/cmmlu's files (columns Question, A, B, C, D, Answer)"


def load(data_dir, shots: int) -> list[dict]:
    return load_exam(
        data_dir,
        shots,
        root="cmmlu",
        splits=("dev", "test"),
        fields=("Question", "Answer"),
        description=DESCRIPTION,
        what=WHAT,
    )
