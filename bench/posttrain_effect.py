"""The effect of each post-training stage at small scale (paper section 4): a Qwen2 pre-trained here on
text + verifiable problems (data.tasks: arithmetic and string tasks, answers checked by code), then

    SFT          on problem conversations (`qwen2 sft`)
    samples      k replies per training prompt from the SFT model, each checked: right over wrong makes a
                 preference pair (rejection sampling with a checker, paper 4.1)
    reward       a reward model trained on those pairs (`qwen2 reward`): held-out pair accuracy
    DPO          offline DPO on the pairs from the SFT model, with AdamW, OnDARE and OnTIES (`qwen2 dpo`)
    online DPO   from the AdamW DPO model: k samples per prompt, the reward model's best vs worst

Measured for every model: held-out accuracy (greedy, 200 unseen problems, checked), and the held-out
pre-training loss (the same rows of the pre-training corpus's held-out split) whose rise over the base
model is the alignment tax. The Online Merging Optimizer's point is a smaller tax at similar accuracy.
Scale note: the paper's learning rates (SFT 7e-6, DPO 1e-6) are for 7B+ models trained on 500K
examples; a 3M-parameter model needs larger ones (here 1e-3 / 1e-4), and the OMO alpha is raised so that
its pull toward the task vector is visible over ~100 steps (stated in the output).

    .venv/bin/python bench/posttrain_effect.py [--out runs/posttrain_effect] [--pretrain-steps 800]

Writes OUT/effect.json, docs/posttrain_effect.png and prints the table. Stages already done are reused
(each is a resumable run folder); --fresh starts over.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))

from common import table  # noqa: E402
from qwen2.data import tasks  # noqa: E402
from qwen2.train import recipes  # noqa: E402
from qwen2.train.posttrain import run_posttrain  # noqa: E402
from qwen2.train.stages import (  # noqa: E402
    FAMILIES,
    accuracy,
    heldout_lm_loss,
    pretrain,
    sample_pairs,
    write_jsonl,
)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["model"] for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.2))
    a.bar(names, [100 * r["accuracy"] for r in rows], color="tab:blue")
    a.set_ylabel("held-out accuracy (%)")
    a.set_ylim(0, 100)
    a.set_title("accuracy on unseen problems (greedy, checked)")
    b.bar(names, [r["tax"] for r in rows], color="tab:red")
    b.set_ylabel("held-out pre-training loss - base (nats)")
    b.set_title("alignment tax")
    for ax in (a, b):
        ax.tick_params(axis="x", rotation=30)
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/posttrain_effect")
    ap.add_argument("--pretrain-steps", type=int, default=800)
    ap.add_argument("--pretrain-problems", type=int, default=30_000, help="problems mixed into pre-training")
    ap.add_argument("--sft-problems", type=int, default=3000)
    ap.add_argument("--pair-problems", type=int, default=600)
    ap.add_argument("--prompts", type=int, default=256, help="online DPO prompts")
    ap.add_argument("--k", type=int, default=8, help="samples per prompt (pairs and online DPO)")
    ap.add_argument("--heldout", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--plot", default=str(ROOT / "docs" / "posttrain_effect.png"))
    ap.add_argument("--fresh", action="store_true")
    a = ap.parse_args(argv)
    out = Path(a.out)
    if a.fresh and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    timings = {}

    def mark(name):
        timings[name] = round(time.perf_counter() - t0 - sum(timings.values()), 1)
        print(f"== {name} done ({timings[name]} s)", flush=True)

    base_run = pretrain(out, a.pretrain_steps, a.seed, a.pretrain_problems)
    base = base_run / "model"
    mark("pretrain")
    train = tasks.problems(a.sft_problems + a.pair_problems + a.prompts, a.seed + 1, FAMILIES)
    sft_p, pair_p = train[: a.sft_problems], train[a.sft_problems : a.sft_problems + a.pair_problems]
    prompt_p = train[a.sft_problems + a.pair_problems :]
    heldout = tasks.held_out(
        train + tasks.problems(a.pretrain_problems, a.seed, tasks.FAMILIES), a.heldout, a.seed + 7, FAMILIES
    )
    sft_data = write_jsonl(out / "sft.jsonl", [{"messages": tasks.as_messages(p)} for p in sft_p])
    common = {"max_len": 256, "heldout_fraction": 0.05, "ckpt_every": 50, "seed": a.seed}
    sft = run_posttrain(
        recipes.override(
            recipes.SFTConfig(),
            {
                **common,
                "model": str(base),
                "data": str(sft_data),
                "out": str(out / "sft"),
                "epochs": 2.0,
                "batch_size": 16,
                "lr": 1e-3,
                "warmup_steps": 10,
                "packing": True,
            },
        )
    )
    sft_dir = Path(sft["model"])
    mark("sft")
    pairs_file = out / "pairs.jsonl"
    if not pairs_file.is_file():
        pairs, right = sample_pairs(sft_dir, pair_p, a.k, a.seed)
        write_jsonl(pairs_file, pairs)
        (out / "pairs.json").write_text(json.dumps({"pairs": len(pairs), "right_fraction": right}))
    pair_info = json.loads((out / "pairs.json").read_text())
    mark("samples")
    rm = run_posttrain(
        recipes.override(
            recipes.RewardConfig(),
            {
                **common,
                "model": str(sft_dir),
                "data": str(pairs_file),
                "out": str(out / "reward"),
                "epochs": 2.0,
                "batch_size": 8,
                "lr": 3e-4,
                "heldout_fraction": 0.1,
            },
        )
    )
    mark("reward")
    dpo_common = {
        **common,
        "model": str(sft_dir),
        "data": str(pairs_file),
        "epochs": 2.0,
        "batch_size": 8,
        "lr": 1e-4,
        "warmup_steps": 5,
        "base_model": str(base),
    }
    omo = {"merge_alpha": 1e-2, "merge_reserve": 0.3}
    dpo = {}
    for opt in ("adamw", "ondare", "onties"):
        extra = {} if opt == "adamw" else {"optimizer": opt, **omo}
        dpo[opt] = run_posttrain(
            recipes.override(recipes.DPOConfig(), {**dpo_common, **extra, "out": str(out / f"dpo-{opt}")})
        )
    mark("dpo")
    prompts = write_jsonl(out / "prompts.jsonl", [{"prompt": tasks.as_messages(p)[:-1]} for p in prompt_p])
    online = run_posttrain(
        recipes.override(
            recipes.OnlineDPOConfig(),
            {
                **common,
                "model": dpo["adamw"]["model"],
                "data": str(prompts),
                "out": str(out / "online-dpo"),
                "reward_model": rm["model"],
                "epochs": 1.0,
                "batch_size": 8,
                "samples": a.k,
                "max_new_tokens": 12,
                "lr": 5e-5,
                "warmup_steps": 2,
                "heldout_fraction": 0.0,
            },
        )
    )
    mark("online-dpo")
    models = {
        "base": base,
        "SFT": sft_dir,
        "DPO AdamW": Path(dpo["adamw"]["model"]),
        "DPO OnDARE": Path(dpo["ondare"]["model"]),
        "DPO OnTIES": Path(dpo["onties"]["model"]),
        "online DPO": Path(online["model"]),
    }
    rows = []
    base_loss = heldout_lm_loss(base, base_run)
    base_text_acc = accuracy(base, heldout, chat=False)  # the base model in its own format
    for name, d in models.items():
        loss = heldout_lm_loss(d, base_run)
        rows.append(
            {"model": name, "accuracy": accuracy(d, heldout), "lm_loss": loss, "tax": loss - base_loss}
        )
    mark("eval")
    for r in rows:
        r["accuracy %"] = f"{100 * r['accuracy']:.1f}"
        r["held-out LM loss"] = f"{r['lm_loss']:.4f}"
        r["tax (nats)"] = f"{r['tax']:+.4f}"
    print(table(rows, ["model", "accuracy %", "held-out LM loss", "tax (nats)"]))
    margins = {k: v["final"].get("eval_rewards/margins") for k, v in dpo.items()}
    result = {
        "rows": [{k: r[k] for k in ("model", "accuracy", "lm_loss", "tax")} for r in rows],
        "base_accuracy_pretraining_format": base_text_acc,
        "pairs": pair_info,
        "reward_model_heldout_accuracy": rm["final"].get("eval_accuracy"),
        "dpo_heldout_margins": margins,
        "online_dpo_final": {
            k: v for k, v in online["final"].items() if k.startswith(("reward/", "time/", "loss"))
        },
        "omo": omo,
        "seconds": timings,
        "command": " ".join(["bench/posttrain_effect.py", *(argv or sys.argv[1:])]),
    }
    print(f"base model, 'Question: ... Answer:' format: {100 * base_text_acc:.1f}% (row above: ChatML)")
    print(f"pairs: {pair_info}; reward model held-out accuracy {result['reward_model_heldout_accuracy']}")
    print(f"DPO held-out reward margins: {margins}")
    (out / "effect.json").write_text(json.dumps(result, indent=2))
    (ROOT / "docs" / "posttrain_effect.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(rows, Path(a.plot))
    print(f"wrote {out / 'effect.json'}, docs/posttrain_effect.json and {a.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
