"""Constitutional feedback (paper section 4.2, "Constitutional Feedback"; Bai et al. 2022's
critique-and-revise): a reply (the item's "response", or one sampled) is critiqued against a principles
file and rewritten; the revision is the SFT target and (original, revised) the (rejected, chosen)
preference pair. A revision identical to the original makes no pair.

Input {"id"?, "prompt", "response"?}; principles: a text file (default prompts/principles.txt)."""

from __future__ import annotations

from pathlib import Path

from qwen2.synth.runner import Run, chat, fill, messages, prompt_text, read_items


def constitutional(
    backend,
    input_path,
    out,
    *,
    principles=None,
    temperature=0.7,
    max_tokens=512,
    seed=1234,
    chunk=16,
) -> dict:
    items = read_items(input_path, ["prompt"])
    if principles is not None and not Path(principles).is_file():
        raise FileNotFoundError(
            f"--principles {principles}: no such file (a text file, one principle a line)"
        )
    rules = Path(principles).read_text(encoding="utf-8") if principles else prompt_text("principles")
    crit_t, rev_t = prompt_text("critique"), prompt_text("revise")
    params = dict(
        principles=str(principles) if principles else "builtin",
        temperature=temperature,
        max_tokens=max_tokens,
        seed=seed,
    )
    run = Run(out, "constitutional", params, backend)

    def gen(prompts):
        return [
            o[0].strip()
            for o in backend.sample(
                [chat(p) for p in prompts], 1, temperature=temperature, max_tokens=max_tokens, seed=seed
            )
        ]

    def work(batch):
        need = [it for it in batch if not it.get("response")]
        sampled = dict(zip((it["id"] for it in need), gen([it["prompt"] for it in need]), strict=True))
        resp = {it["id"]: it.get("response") or sampled[it["id"]] for it in batch}
        crit = gen(
            [fill(crit_t, principles=rules, prompt=it["prompt"], response=resp[it["id"]]) for it in batch]
        )
        rev = gen(
            [
                fill(rev_t, principles=rules, prompt=it["prompt"], response=resp[it["id"]], critique=c)
                for it, c in zip(batch, crit, strict=True)
            ]
        )
        return [
            {"id": it["id"], "prompt": it["prompt"], "original": resp[it["id"]], "critique": c, "revised": r}
            for it, c, r in zip(batch, crit, rev, strict=True)
        ]

    recs = run.process(items, work, chunk)
    good = [r for r in recs if r["revised"]]
    sft = [{"messages": messages(r["prompt"], r["revised"])} for r in good]
    pref = [
        {
            "prompt": [{"role": "user", "content": r["prompt"]}],
            "chosen": [{"role": "assistant", "content": r["revised"]}],
            "rejected": [{"role": "assistant", "content": r["original"]}],
        }
        for r in good
        if r["revised"].strip() != r["original"].strip()
    ]
    return run.finish({"sft": sft, "preference": pref}, {"items": len(recs), "revised": len(good)})
