"""The effect of each post-training stage at small scale (paper section 4), with fixed step counts: a Qwen2
pre-trained here on text with verifiable problems mixed in (data.tasks: arithmetic, strings, passkeys;
answers checked by code), then train.stages.run_chain:

    synth        rejection sampling of the base model (k samples per problem, checked): SFT data (a right
                 sample, else the reference answer) and right-over-wrong preference pairs (paper 4.1)
    SFT          on those conversations (`qwen2 sft`)
    reward       a reward model on the pairs (`qwen2 reward`): held-out pair accuracy
    DPO          offline DPO from the SFT model with AdamW, OnDARE and OnTIES (`qwen2 dpo`)
    online DPO   from the AdamW DPO model with OnDARE: k samples per prompt, the reward model's best vs worst

Measured for every model: held-out accuracy (greedy, unseen problems, checked) and the held-out
pre-training loss (fixed rows of the corpus's held-out split) whose rise over the base model is the
alignment tax; the Online Merging Optimizer's claim is a smaller tax at similar accuracy. Scale note:
the paper's learning rates (SFT 7e-6, DPO 1e-6) are for 7B+ models; a 3M-parameter model needs larger
ones, and OMO's alpha is raised (train.stages.ChainConfig says which).

    .venv/bin/python bench/posttrain_effect.py [--out runs/posttrain_effect] [--pretrain-steps 800]

Writes OUT/effect.json, docs/posttrain_effect.json and docs/posttrain_effect.png, and prints the table.
Stages already done are reused (each is a resumable run folder); --fresh starts over.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))

from common import table  # noqa: E402
from qwen2.train.stages import ChainConfig, pretrain, run_chain  # noqa: E402


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
    ap.add_argument("--problems", type=int, default=3000, help="rejection-sampled problems (SFT and pairs)")
    ap.add_argument("--prompts", type=int, default=256, help="online DPO prompts")
    ap.add_argument("--k", type=int, default=8, help="samples per problem / prompt")
    ap.add_argument("--heldout", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--plot", default=str(ROOT / "docs" / "posttrain_effect.png"))
    ap.add_argument("--fresh", action="store_true")
    a = ap.parse_args(argv)
    out = Path(a.out)
    if a.fresh and out.exists():
        shutil.rmtree(out)
    t0 = time.perf_counter()
    base_run = pretrain(out, a.pretrain_steps, a.seed, a.pretrain_problems)
    t_pre = round(time.perf_counter() - t0, 1)
    cc = ChainConfig(problems=a.problems, prompts=a.prompts, k=a.k, heldout=a.heldout, seed=a.seed)
    got = run_chain(out, base_run, cc)
    rows = got["eval"]
    for r in rows:
        r["accuracy %"] = f"{100 * r['accuracy']:.1f}"
        r["held-out LM loss"] = f"{r['lm_loss']:.4f}"
        r["tax (nats)"] = f"{r['tax']:+.4f}"
    print(table(rows, ["model", "accuracy %", "held-out LM loss", "tax (nats)"]))
    base_fmt = rows[0].get("accuracy_pretraining_format", 0.0)
    margins = {k: v["final"].get("eval_rewards/margins") for k, v in got["dpo"].items()}
    print(f"base model in its pre-training format: {100 * base_fmt:.1f}% (the table: through ChatML)")
    rm_acc = got["reward"]["final"].get("eval_accuracy")
    print(f"synthesis: {got['synth']}; reward model held-out accuracy {rm_acc}")
    print(f"DPO held-out reward margins: {margins}")
    result = {
        **{k: got[k] for k in ("synth", "sft", "reward", "dpo", "online-dpo")},
        "rows": [
            {
                k: r[k]
                for k in r
                if k in ("model", "accuracy", "lm_loss", "tax", "accuracy_pretraining_format")
            }
            for r in rows
        ],
        "chain": dataclasses.asdict(cc),
        "seconds": {"pretrain": t_pre, **got["seconds"]},
        "command": " ".join(["bench/posttrain_effect.py", *(argv if argv is not None else sys.argv[1:])]),
    }
    (out / "effect.json").write_text(json.dumps(result, indent=2, default=str))
    (ROOT / "docs" / "posttrain_effect.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    plot(rows, Path(a.plot))
    print(f"wrote {out / 'effect.json'}, docs/posttrain_effect.json and {a.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
