"""GSM8K (paper section 5.1.1: 5-shot chain of thought; the blog says 4: `--shots` overrides), in
lm-evaluation-harness's `gsm8k` format: shots "Question: {q}\nAnswer: {worked answer}\n\n" drawn from
the train split by lm-eval's default sampler (Random(1234)), greedy decoding stopped at "Question:" or
a blank line, scored by answers.gsm8k_correct (the "#### N" / "The answer is N" / last number,
compared after normalising).

Data (Hugging Face openai/gsm8k): DATA/gsm8k/main/{train,test}-*.parquet (or .jsonl), columns
question, answer.
"""

from __future__ import annotations

from qwen2.eval.harness import lm_eval_fewshot, read_split

KIND = "generate"
SHOTS = 5
METRICS = ("exact_match",)
STOP = ["Question:", "\n\n", "</s>", "<|im_end|>"]
MAX_TOKENS = 256
WHAT = "openai/gsm8k's main files (columns question, answer)"


def patterns(split: str) -> list[str]:
    return [f"{root}/{split}-*.{ext}" for root in ("gsm8k/main", "gsm8k") for ext in ("parquet", "jsonl")]


def question(doc: dict) -> str:
    return f"Question: {doc['question']}\nAnswer:"


def load(data_dir, shots: int) -> list[dict]:
    train = read_split(data_dir, "gsm8k", patterns("train"), WHAT) if shots else []
    test = read_split(data_dir, "gsm8k", patterns("test"), WHAT)
    fewshot = lm_eval_fewshot(train, shots)
    return [
        {
            "id": str(i),
            "prompt": "".join(f"{question(s)} {s['answer']}\n\n" for s in fewshot(i)) + question(d),
            "reference": d["answer"],
        }
        for i, d in enumerate(test)
    ]


def score(doc: dict, output: str) -> dict:
    from qwen2.eval.answers import extract_gsm8k, gsm8k_correct

    return {
        "exact_match": float(bool(gsm8k_correct(output, doc["reference"]))),
        "extracted": extract_gsm8k(output),
    }
