"""Execution feedback (paper section 4.2, "Coding": the model writes solutions and test cases, they
are run, and failures are fed back for another try; "Instruction Following": responses checked by
code against verifiable constraints).

`execution`: input {"id"?, "prompt", "tests"?} (tests: Python asserts; without them the model writes
them). A solution runs in eval.sandbox with the tests appended; a failure goes back to the model with
its error output, at most `retries` times. Output sft.jsonl with the passing solutions; the log keeps
every attempt and its sandbox status.

`instructions`: input {"id"?, "prompt", "constraints": [{"type", "value"}]}; k samples, kept when they
meet every constraint (constraints.CHECKS); sft.jsonl plus preference pairs (a passing vs a failing)."""

from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor

from qwen2.eval.sandbox import run_program
from qwen2.synth.constraints import check, validate
from qwen2.synth.runner import Run, chat, fill, messages, prompt_text, read_items

_BLOCK = re.compile(r"```(?:python|py)?\s*\n(.*?)```", re.S)


def extract_code(text: str) -> str:
    """The first fenced code block, or the whole text when there is none."""
    m = _BLOCK.search(text)
    return (m.group(1) if m else text).strip() + "\n"


def execution(
    backend,
    input_path,
    out,
    *,
    retries=2,
    temperature=0.2,
    max_tokens=1024,
    timeout=10.0,
    seed=1234,
    chunk=16,
    workers=4,
) -> dict:
    items = read_items(input_path, ["prompt"])
    code_t, tests_t, retry_t = prompt_text("code"), prompt_text("code_tests"), prompt_text("code_retry")
    params = dict(retries=retries, temperature=temperature, max_tokens=max_tokens, timeout=timeout, seed=seed)
    run = Run(out, "execution", params, backend)

    def gen(prompts):
        outs = backend.sample(
            [chat(p) for p in prompts], 1, temperature=temperature, max_tokens=max_tokens, seed=seed
        )
        return [extract_code(o[0]) for o in outs]

    def work(batch):
        need = [it for it in batch if not it.get("tests")]
        made = dict(
            zip(
                (it["id"] for it in need),
                gen([fill(tests_t, prompt=it["prompt"]) for it in need]),
                strict=True,
            )
        )
        tests = {it["id"]: it.get("tests") or made[it["id"]] for it in batch}
        codes = dict(
            zip(
                (it["id"] for it in batch),
                gen([fill(code_t, prompt=it["prompt"]) for it in batch]),
                strict=True,
            )
        )
        attempts = {it["id"]: [] for it in batch}
        live = list(batch)
        with ThreadPoolExecutor(workers) as pool:
            for round_ in range(retries + 1):
                results = list(
                    pool.map(
                        lambda it: run_program(codes[it["id"]] + "\n" + tests[it["id"]], timeout=timeout),
                        live,
                    )
                )
                failed = []
                for it, res in zip(live, results, strict=True):
                    attempts[it["id"]].append(
                        {"code": codes[it["id"]], "status": res.status, "error": res.stderr[-2000:]}
                    )
                    if res.status != "passed":
                        failed.append(it)
                if not failed or round_ == retries:
                    break
                fixes = gen(
                    [
                        fill(
                            retry_t,
                            prompt=it["prompt"],
                            code=codes[it["id"]],
                            error=attempts[it["id"]][-1]["error"] or attempts[it["id"]][-1]["status"],
                        )
                        for it in failed
                    ]
                )
                codes.update(zip((it["id"] for it in failed), fixes, strict=True))
                live = failed
        return [
            {
                "id": it["id"],
                "prompt": it["prompt"],
                "tests": tests[it["id"]],
                "attempts": attempts[it["id"]],
                "passed": attempts[it["id"]][-1]["status"] == "passed",
            }
            for it in batch
        ]

    recs = run.process(items, work, chunk)
    sft = [
        {"messages": messages(r["prompt"], "```python\n" + r["attempts"][-1]["code"] + "```")}
        for r in recs
        if r["passed"]
    ]
    counts = {
        "items": len(recs),
        "passed": sum(r["passed"] for r in recs),
        "passed_first_try": sum(r["attempts"][0]["status"] == "passed" for r in recs),
        "attempts": sum(len(r["attempts"]) for r in recs),
    }
    return run.finish({"sft": sft}, counts)


def instructions(
    backend,
    input_path,
    out,
    *,
    k=4,
    temperature=0.8,
    top_p=0.95,
    max_tokens=512,
    seed=1234,
    chunk=16,
) -> dict:
    items = read_items(input_path, ["prompt", "constraints"])
    for it in items:
        validate(it["constraints"], f"{input_path}: item {it['id']}")
    params = dict(k=k, temperature=temperature, top_p=top_p, max_tokens=max_tokens, seed=seed)
    run = Run(out, "instructions", params, backend)

    def work(batch):
        outs = backend.sample(
            [chat(it["prompt"]) for it in batch],
            k,
            temperature=temperature,
            top_p=top_p,
            max_tokens=max_tokens,
            seed=seed,
        )
        return [
            {
                "id": it["id"],
                "prompt": it["prompt"],
                "samples": [
                    {"text": t, "failed": [c["type"] for c in it["constraints"] if not check(t, c)]}
                    for t in texts
                ],
            }
            for it, texts in zip(batch, outs, strict=True)
        ]

    recs = run.process(items, work, chunk)
    sft, pref = [], []
    for r in recs:
        good = [s["text"] for s in r["samples"] if not s["failed"]]
        bad = [s["text"] for s in r["samples"] if s["failed"]]
        sft += [{"messages": messages(r["prompt"], t)} for t in good]
        if good and bad:
            pref.append(
                {
                    "prompt": [{"role": "user", "content": r["prompt"]}],
                    "chosen": [{"role": "assistant", "content": good[0]}],
                    "rejected": [{"role": "assistant", "content": bad[0]}],
                }
            )
    counts = {"items": len(recs), "kept": len(sft), "samples": sum(len(r["samples"]) for r in recs)}
    return run.finish({"sft": sft, "preference": pref}, counts)
