"""C-Eval (paper: 5-shot), lm-evaluation-harness's `ceval-valid` format: per subject the description
"以下是中国关于{科目}的单项选择题，请选出其中的正确答案。\n\n", the first K dev questions as shots, then
"{question}\nA. ..\nB. ..\nC. ..\nD. ..\n答案：" with choices " A".." D" (acc, acc_norm), on the val split.
The Chinese subject names are lm-eval's (SUBJECTS, as its task YAMLs write them, so the prompt is the
same string); a subject outside that table takes its name from DATA/ceval/subject_mapping.json, else
the file's subject name.

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
SUBJECTS = {  # lm-eval's task YAMLs' description names (its tasks/ceval/_generate_configs.py)
    "accountant": "注册会计师",
    "advanced_mathematics": "高等数学",
    "art_studies": "艺术学",
    "basic_medicine": "基础医学",
    "business_administration": "工商管理",
    "chinese_language_and_literature": "中国语言文学",
    "civil_servant": "公务员",
    "clinical_medicine": "临床医学",
    "college_chemistry": "大学化学",
    "college_economics": "大学经济学",
    "college_physics": "大学物理",
    "college_programming": "大学编程",
    "computer_architecture": "计算机组成",
    "computer_network": "计算机网络",
    "discrete_mathematics": "离散数学",
    "education_science": "教育学",
    "electrical_engineer": "注册电气工程师",
    "environmental_impact_assessment_engineer": "环境影响评价工程师",
    "fire_engineer": "注册消防工程师",
    "high_school_biology": "高中生物",
    "high_school_chemistry": "高中化学",
    "high_school_chinese": "高中语文",
    "high_school_geography": "高中地理",
    "high_school_history": "高中历史",
    "high_school_mathematics": "高中数学",
    "high_school_physics": "高中物理",
    "high_school_politics": "高中政治",
    "ideological_and_moral_cultivation": "思想道德修养与法律基础",
    "law": "法学",
    "legal_professional": "法律职业资格",
    "logic": "逻辑学",
    "mao_zedong_thought": "毛泽东思想和中国特色社会主义理论体系概论",
    "marxism": "马克思主义基本原理",
    "metrology_engineer": "注册计量师",
    "middle_school_biology": "初中生物",
    "middle_school_chemistry": "初中化学",
    "middle_school_geography": "初中地理",
    "middle_school_history": "初中历史",
    "middle_school_mathematics": "初中数学",
    "middle_school_physics": "初中物理",
    "middle_school_politics": "初中政治",
    "modern_chinese_history": "近代史纲要",
    "operating_system": "操作系统",
    "physician": "医师资格",
    "plant_protection": "植物保护",
    "probability_and_statistics": "概率统计",
    "professional_tour_guide": "导游资格",
    "sports_science": "体育学",
    "tax_accountant": "税务师",
    "teacher_qualification": "教师资格",
    "urban_and_rural_planner": "注册城乡规划师",
    "veterinary_medicine": "兽医学",
}


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


def load_exam(
    data_dir, shots: int, *, root: str, splits, fields, description: str, what: str, subjects: dict
) -> list[dict]:
    q, a = fields
    names = {**subject_names(data_dir, root), **subjects}  # lm-eval's names first
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
        data_dir,
        shots,
        root=ROOT,
        splits=SPLITS,
        fields=FIELDS,
        description=DESCRIPTION,
        what=WHAT,
        subjects=SUBJECTS,
    )
