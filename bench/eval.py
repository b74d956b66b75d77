"""Log-likelihood scoring throughput (questions/s): our harness vs lm-evaluation-harness's `hf` model on the
same checkpoint and the same MMLU- and ARC-format requests, in the same run (issue 13: target >= 2x).

Ours prefills each question's context once (its few-shot prefix reused from the previous question) and
scores the choices over that cache; lm-eval's HFLM runs every (context, choice) as a full sequence. The
two must agree (max |ll difference| printed). Default run: a 4-layer Qwen2 (hidden 256, Qwen2's
vocabulary), 24 MMLU 5-shot questions and 12 ARC 5-shot questions, about two minutes on 2 CPU cores.

    .venv/bin/python bench/eval.py [--questions 24] [--layers 4] [--hidden 256] [--batch-size 8]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from common import table  # noqa: E402 (bench/common.py puts tests/ on the path: eval_data)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--questions", type=int, default=24)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=8)
    a = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import random

    import torch
    from lm_eval.models.huggingface import HFLM

    from eval_data import WORDS, write_data, write_jsonl
    from qwen2.checkpoint import copy_side_files, save_model
    from qwen2.config import ModelConfig
    from qwen2.eval.harness import InProcess, load_task
    from qwen2.model import build_model
    from qwen2.tokenizer.bpe import load_tokenizer
    from qwen2.tokenizer.save import save_tokenizer

    torch.manual_seed(0)
    tmp = Path(tempfile.mkdtemp(prefix="bench-eval-"))
    config = ModelConfig.preset("tiny").replace(
        vocab_size=151936,
        tie_word_embeddings=False,
        hidden_size=a.hidden,
        intermediate_size=4 * a.hidden,
        num_hidden_layers=a.layers,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    model = build_model(config, seed=0).eval()
    save_model(model, tmp / "ckpt")
    tok = load_tokenizer("Qwen2")
    copy_side_files(save_tokenizer(tok, tmp / "tok"), tmp / "ckpt")
    data = write_data(tmp / "data")
    rnd = random.Random(1)
    rows = [
        {
            "question": " ".join(rnd.choice(WORDS) for _ in range(rnd.randint(20, 40))) + "?",
            "subject": "high_school_biology",
            "choices": [" ".join(rnd.choices(WORDS, k=6)) for _ in range(4)],
            "answer": rnd.randrange(4),
        }
        for _ in range(5 + a.questions)
    ]
    for f in (data / "mmlu/all").glob("*"):
        f.unlink()
    write_jsonl(data / "mmlu/all/dev.jsonl", rows[:5])
    write_jsonl(data / "mmlu/all/test.jsonl", rows[5:])

    hf = HFLM(pretrained=str(tmp / "ckpt"), device="cpu", dtype="float32", batch_size=a.batch_size)
    ours = InProcess(model, load_tokenizer(tmp / "ckpt"), batch_size=a.batch_size)
    out = []
    for task, shots, n in (("mmlu", 5, a.questions), ("arc_challenge", 5, a.questions // 2)):
        docs = load_task(task)[1].load(data, shots)[:n]
        pairs = [(d["prompt"], c) for d in docs for c in d["continuations"]]
        t0 = time.perf_counter()
        mine = ours.loglikelihood(pairs)
        t_ours = time.perf_counter() - t0

        from lm_eval.api.instance import Instance

        reqs = [Instance("loglikelihood", {}, p, i) for i, p in enumerate(pairs)]
        t0 = time.perf_counter()
        theirs = hf.loglikelihood(reqs, disable_tqdm=True)
        t_hf = time.perf_counter() - t0
        diff = max(abs(x[0] - y[0]) for x, y in zip(mine, theirs, strict=False))
        out.append(
            {
                "task": f"{task} ({shots}-shot)",
                "questions": len(docs),
                "ours q/s": f"{len(docs) / t_ours:.2f}",
                "lm-eval hf q/s": f"{len(docs) / t_hf:.2f}",
                "ratio": f"{t_hf / t_ours:.2f}x",
                "max |dll|": f"{diff:.1e}",
            }
        )
    print(
        f"model: {a.layers} layers, hidden {a.hidden}, vocab {config.vocab_size}; batch size {a.batch_size}; "
        f"torch threads {torch.get_num_threads()}"
    )
    print(table(out, list(out[0])))


if __name__ == "__main__":
    main()
