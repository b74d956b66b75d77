"""`qwen2 speedrun`: the whole Qwen2 recipe in miniature on a laptop CPU, in a time budget (30 minutes).

Stages (paper sections 3-5), each reading the previous one's Hugging Face checkpoint and writing its own:
    pretrain     a Qwen2-style byte-level BPE tokenizer trained on the corpus (the Python standard
                 library by default; --corpus DIR), then pre-training of a small Qwen2 with verifiable
                 problems mixed in (data.tasks: arithmetic, string tasks, passkeys) and the long-context
                 stage (longer rows, RoPE base 10,000 -> 1,000,000) -> OUT/model
    synth        rejection sampling of the pre-trained model on the problems (checked by code)
    moe          (optional, --moe) the pre-trained model upcycled to a small MoE (train.upcycle: 8 experts,
                 top-2, a shared expert, 50% re-initialised) and trained on for a short continuation
                 (train.moe_stage) -> OUT/moe/model; the chain below post-trains the dense model
    sft, reward, dpo (AdamW / OnDARE / OnTIES), online-dpo (OnDARE)   -> OUT/posttrain/<stage>/model
    eval         held-out accuracy and the alignment tax of every model (train.stages.run_chain)
    needle       passkey retrieval at 1x-16x the trained length, plain RoPE vs YaRN + DCA
Every stage resumes (kill it anywhere and run the command again); `stages` picks a subset (the ones
after pretrain need its output). The report card: OUT/report.md + report.json + PNGs.
`qwen2 pretrain --config recipe.yaml` runs the pre-training part from a recipe, at any scale.
"""

from __future__ import annotations

import time
from pathlib import Path

from qwen2.extras import require
from qwen2.train.recipes import PretrainConfig
from qwen2.train.recipes import speedrun as speedrun_recipe

PROMPTS = [
    "import os\nimport sys\n\n\ndef ",
    'class Stack:\n    """',
    "# Return the number of ",
    "def parse_args(argv):\n    ",
    "The following example shows how to ",
]


STAGES = ("pretrain", "synth", "sft", "reward", "dpo", "online-dpo", "eval", "needle")
OPTIONAL = ("moe",)  # not run unless asked for (--moe)
MOE_SHARE = 0.1  # of the budget, on top of it: the MoE continuation
PRETRAIN_SHARE = 0.6  # of the budget: tokenizer, data, both pre-training stages; the rest post-trains


def chain_config(minutes: float):
    """The post-training chain's sizes for a budget (measured on a 2-core CPU: about 40% of 30 minutes)."""
    from qwen2.train.stages import ChainConfig

    scale = minutes / 30
    return ChainConfig(
        problems=max(24, int(1500 * scale)),
        prompts=max(4, int(128 * scale)),
        k=8 if scale >= 0.5 else 3,
        heldout=200 if scale >= 0.5 else 16,
    )


def speedrun(
    minutes: float = 30.0,
    out: str = "runs/speedrun",
    corpus: str | None = None,
    resume: bool = True,
    stages=STAGES,
    allow_changed: bool = False,
) -> dict:
    """Run (or resume) the speedrun's `stages`; returns the report (also OUT/report.json)."""
    from qwen2.train.parallel import init_distributed

    unknown = [s for s in stages if s not in STAGES + OPTIONAL]
    if unknown:
        raise ValueError(
            f"--stages: unknown {', '.join(unknown)}; choose from {', '.join(STAGES + OPTIONAL)}"
        )
    t0 = time.perf_counter()
    cfg = speedrun_recipe(minutes * PRETRAIN_SHARE if set(stages) - {"pretrain"} else minutes, out, corpus)
    run = Path(cfg.out)
    if "pretrain" in stages:
        report = pretrain_and_report(cfg, resume=resume, allow_changed=allow_changed)
    elif (run / "report.json").is_file():
        import json

        report = json.loads((run / "report.json").read_text())
    else:
        raise FileNotFoundError(
            f"{run}: no pre-trained model; run the speedrun with the pretrain stage first"
        )
    if init_distributed()[0] != 0 or not set(stages) - {"pretrain"}:
        return report
    return recipe_report(cfg, report, stages, minutes, t0)


def recipe_report(cfg: PretrainConfig, report: dict, stages, minutes: float, started: float) -> dict:
    """The post-training chain and the long-context check after pre-training, and the report card."""
    from qwen2.train import report as rep
    from qwen2.train.stages import passkey_grid, plot_passkey_grid, run_chain

    run = Path(cfg.out)
    recipe = dict(report.get("recipe") or {})  # a rerun of some stages keeps the others' results
    if "moe" in stages:
        from qwen2.train.moe_stage import run_moe_stage

        recipe["moe"] = run_moe_stage(run, run / "moe", minutes=MOE_SHARE * minutes)
    got = run_chain(run / "posttrain", run, chain_config(minutes), stages)
    chain = {**recipe.get("chain", {}), **{k: v for k, v in got.items() if v}}
    chain["seconds"] = {**recipe.get("chain", {}).get("seconds", {}), **got["seconds"]}
    recipe["chain"] = chain
    if "needle" in stages:
        t = time.perf_counter()
        l0 = cfg.long_seq_len
        grid = passkey_grid(
            run / "model", l0, [l0, 4 * l0, 8 * l0, 16 * l0], depths=(0.0, 0.5, 1.0), trials=1
        )
        recipe["needle"] = {**grid, "png": str(plot_passkey_grid(grid, run / "passkey.png"))}
        chain["seconds"]["needle"] = round(time.perf_counter() - t, 1)
    final = run / "posttrain" / "online-dpo" / "model"
    if (final / "config.json").is_file():
        recipe["chat_samples"] = chat_samples(final)
    report = {**report, "recipe": recipe, "recipe_seconds": round(time.perf_counter() - started, 1)}
    rep.write_recipe_report(run, report)
    return report


def pretrain_and_report(cfg: PretrainConfig, resume: bool = True, allow_changed: bool = False) -> dict:
    """run_pretrain, then (rank 0) plots, throughput, MFU and samples into OUT/report.{md,json}."""
    from qwen2.train.pretrain import run_pretrain

    t0 = time.perf_counter()
    require("matplotlib", "plot", "the speedrun report's plots")  # first: a long run must not fail at its end
    summary = run_pretrain(cfg, resume=resume, allow_changed=allow_changed)
    if not summary:  # ranks > 0
        return {}
    return make_report(cfg, summary, t0)


def make_report(cfg: PretrainConfig, summary: dict, started: float) -> dict:
    """report.{md,json} for a finished run; wall time from `started` (perf_counter) to the report's end."""
    import json

    import torch

    from qwen2.checkpoint import load_model
    from qwen2.config import param_counts
    from qwen2.tokenizer.bpe import load_tokenizer
    from qwen2.train import report as rep

    run = Path(cfg.out)
    metrics = rep.read_metrics(run / "metrics.jsonl")
    model = load_model(run / "model", dtype=None)
    tok = load_tokenizer(run / "model")
    params = param_counts(model.config).total
    loss_png = rep.plot_losses(metrics, run / "loss.png", title=f"Qwen2 pre-training ({params / 1e6:.1f}M)")
    before = json.loads((run / "long_context_before.json").read_text())
    after = json.loads((run / "long_context_after.json").read_text())
    lc_png = rep.plot_long_context(before, after, run / "long_context.png", train_len=cfg.seq_len)
    tail = [i for i, p in enumerate(before["positions"]) if p >= cfg.seq_len]

    def tail_mean(d):
        return sum(d["loss"][i] for i in tail) / max(1, len(tail))

    # Throughput and MFU over the timed training steps (evaluation and checkpoint time excluded).
    seq = {"pretrain": cfg.seq_len, "long": cfg.long_seq_len}
    steps = [r for r in metrics if "step_time_s" in r]
    seconds = sum(r["step_time_s"] for r in steps)
    tokens = sum(r["tokens_per_s"] * r["step_time_s"] for r in steps)
    flops = sum(
        r["tokens_per_s"]
        * r["step_time_s"]
        * rep.flops_per_token(model.config, seq.get(r["stage"], cfg.seq_len))
        for r in steps
    )
    # A finished run's report written again keeps the run's own wall time and measured peak.
    again = summary.get("finished_before") and (run / "report.json").is_file()
    earlier = json.loads((run / "report.json").read_text()) if again else {}
    # the peak of the machine the run trained on
    peak = earlier.get("peak_flops") or rep.peak_flops("cuda" if torch.cuda.is_available() else "cpu")
    train_losses = [r["loss"] for r in steps]
    evals = [r["eval_loss"] for r in metrics if "eval_loss" in r]
    report = {
        "wall_seconds": None,
        "minutes_budget": cfg.minutes,
        "model": str(run / "model"),
        "params": params,
        "tokens": int(tokens),
        "tokens_per_s": tokens / max(seconds, 1e-9),
        "mfu": flops / max(seconds, 1e-9) / peak,
        "peak_flops": peak,
        "final_loss": sum(train_losses[-10:]) / max(1, len(train_losses[-10:])) if train_losses else None,
        "final_eval_loss": evals[-1] if evals else None,
        "loss_png": str(loss_png),
        "long_context_png": str(lc_png),
        "long_context": {
            "seq_len": cfg.long_seq_len,
            "train_len": cfg.seq_len,
            "before": before["mean"],
            "after": after["mean"],
            "before_tail": tail_mean(before),
            "after_tail": tail_mean(after),
        },
        "steps": summary.get("plan"),
        "data_seconds": summary.get("data_seconds"),
    }
    samples = generate_samples(model, tok, cfg.samples, cfg.sample_tokens)
    report["wall_seconds"] = earlier.get("wall_seconds") or round(time.perf_counter() - started, 1)
    rep.write_report(run, report, samples)
    report["samples"] = samples
    return report


def chat_samples(model_dir: Path, n: int = 4) -> list[dict]:
    """The final model's greedy replies through the ChatML template: held-out problems and a free question."""
    from qwen2.data import tasks
    from qwen2.train.stages import FAMILIES, replies

    probs = tasks.problems(n - 1, 12345, FAMILIES) + [{"question": "Who are you?", "answer": ""}]
    got = replies(model_dir, probs, max_new_tokens=24)
    return [{"user": p["question"], "assistant": r[0], "expected": p["answer"]} for p, r in zip(probs, got)]


def generate_samples(model, tok, n: int, max_new_tokens: int) -> list[dict]:
    """Sampled continuations of a few Python/English prompts (pretrain.GENERATION_DEFAULTS, fixed seed)."""
    from qwen2.generation import generate
    from qwen2.train.pretrain import GENERATION_DEFAULTS

    out = []
    for prompt in PROMPTS[:n]:
        ids = tok.encode(prompt)
        new = list(
            generate(
                model,
                ids,
                max_new_tokens=max_new_tokens,
                seed=0,
                stop_token_ids=[tok.endoftext_id],
                temperature=GENERATION_DEFAULTS["temperature"],
                top_k=GENERATION_DEFAULTS["top_k"],
            )
        )
        new = [t for t in new if t != tok.endoftext_id]
        out.append({"prompt": prompt, "completion": tok.decode(new)})
    return out
