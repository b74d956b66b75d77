"""Rejection sampling for math (paper section 4.2, "Mathematics": the model samples several reasoning
paths per problem; those reaching the reference answer are kept, and correct / incorrect paths make
preference pairs). Answers are checked with the evaluation checkers (eval.answers): GSM8K's number
match or MATH's boxed-expression equivalence.

Input JSONL: {"id"?, "question", "answer"}. Outputs: sft.jsonl (every correct path, or only the
shortest with keep="shortest"), preference.jsonl (one pair per problem with both: the shortest correct
as chosen, the first incorrect as rejected)."""

from __future__ import annotations

from qwen2.eval.answers import extract_boxed, gsm8k_correct, math_equal
from qwen2.synth.runner import Run, chat, fill, messages, prompt_text, read_items

CHECKERS = {
    "gsm8k": gsm8k_correct,
    "math": lambda out, ref: math_equal(extract_boxed(out), extract_boxed(ref) or ref),
}


def rejection(
    backend,
    input_path,
    out,
    *,
    k=8,
    checker="gsm8k",
    keep="all",
    temperature=0.8,
    top_p=0.95,
    max_tokens=512,
    seed=1234,
    chunk=16,
) -> dict:
    if checker not in CHECKERS:
        raise ValueError(f"--checker {checker!r}: choose one of {', '.join(CHECKERS)}")
    if keep not in ("all", "shortest"):
        raise ValueError(f"--keep {keep!r}: choose 'all' or 'shortest'")
    items = read_items(input_path, ["question", "answer"])
    check, template = CHECKERS[checker], prompt_text("math")
    params = dict(
        k=k,
        checker=checker,
        keep=keep,
        temperature=temperature,
        top_p=top_p,
        max_tokens=max_tokens,
        seed=seed,
    )
    run = Run(out, "rejection", params, backend)

    def work(batch):
        prompts = [fill(template, question=it["question"]) for it in batch]
        outs = backend.sample(
            [chat(p) for p in prompts],
            k,
            temperature=temperature,
            top_p=top_p,
            max_tokens=max_tokens,
            seed=seed,
        )
        return [
            {
                "id": it["id"],
                "prompt": p,
                "samples": [{"text": t, "correct": bool(check(t, str(it["answer"])))} for t in texts],
            }
            for it, p, texts in zip(batch, prompts, outs, strict=True)
        ]

    recs = run.process(items, work, chunk)
    sft, pref = [], []
    for r in recs:
        good = sorted((s["text"] for s in r["samples"] if s["correct"]), key=len)
        bad = [s["text"] for s in r["samples"] if not s["correct"]]
        for t in good[:1] if keep == "shortest" else good:
            sft.append({"messages": messages(r["prompt"], t)})
        if good and bad:
            pref.append(
                {
                    "prompt": [{"role": "user", "content": r["prompt"]}],
                    "chosen": [{"role": "assistant", "content": good[0]}],
                    "rejected": [{"role": "assistant", "content": bad[0]}],
                }
            )
    counts = {
        "items": len(recs),
        "samples": sum(len(r["samples"]) for r in recs),
        "correct": sum(s["correct"] for r in recs for s in r["samples"]),
        "solved": sum(any(s["correct"] for s in r["samples"]) for r in recs),
    }
    return run.finish({"sft": sft, "preference": pref}, counts)
