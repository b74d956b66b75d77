"""The Online Merging Optimizer's settings at small scale: offline DPO from a speedrun's SFT model on its
preference pairs, once per optimizer setting, each scored by its alignment tax (the held-out pre-training
loss's rise over the base model) and its held-out preference accuracy and margin.

OnDARE adds alpha x the task vector (SFT - base) at every step, so over N steps it moves N x alpha task
vectors further than the SFT model: alpha must stay far below 1 / N.
The sweep that set train.stages.ChainConfig (on the speedrun recorded before it changed, 357 DPO
steps): AdamW tax +1.657; OnDARE alpha 1e-7 with reserve 0.01 +1.695, with reserve 0.3 +1.629; alpha 1e-3
reserve 0.3 +3.297; alpha 1e-2 reserve 0.3 +39.9 (diverged).

    .venv/bin/python bench/omo_sweep.py [--run runs/speedrun] adamw ondare:1e-7:0.01 ondare:1e-7:0.3

Each SETTING is `adamw` or `METHOD:ALPHA:RESERVE` (METHOD ondare or onties). Needs a speedrun with its
sft stage done (OUT/posttrain/sft/model and OUT/posttrain/pairs.jsonl).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))

from common import table  # noqa: E402
from qwen2.train import recipes  # noqa: E402
from qwen2.train.posttrain import run_posttrain  # noqa: E402
from qwen2.train.stages import ChainConfig, heldout_lm_loss  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("settings", nargs="+", help="adamw or METHOD:ALPHA:RESERVE")
    ap.add_argument("--run", default="runs/speedrun", help="a speedrun folder with its sft stage done")
    ap.add_argument("--out", default="runs/omo_sweep")
    a = ap.parse_args()
    run, out, cc = Path(a.run), Path(a.out), ChainConfig()
    chain = run / "posttrain"
    for need in (chain / "sft" / "model", chain / "pairs.jsonl"):
        if not need.exists():
            raise SystemExit(f"{need}: missing; run `qwen2 speedrun --out {run}` (its sft stage) first")
    base = run / "model"
    l0 = heldout_lm_loss(base, run)
    rows = []
    for s in a.settings:
        fields = {
            "model": str(chain / "sft" / "model"),
            "data": str(chain / "pairs.jsonl"),
            "out": str(out / s.replace(":", "-")),
            "epochs": 2.0,
            "batch_size": 8,
            "lr": cc.dpo_lr,
            "warmup_steps": 5,
            "max_len": 256,
            "heldout_fraction": 0.05,
            "ckpt_every": 1000,
            "seed": cc.seed,
        }
        if s != "adamw":
            method, alpha, reserve = s.split(":")
            fields.update(optimizer=method, merge_alpha=float(alpha), merge_reserve=float(reserve))
            fields["base_model"] = str(base)
        t = time.perf_counter()
        summary = run_posttrain(recipes.override(recipes.DPOConfig(), fields, source=s))
        final = summary["final"]
        rows.append(
            {
                "setting": s,
                "steps": summary["steps"],
                "tax": f"{heldout_lm_loss(Path(summary['model']), run) - l0:+.3f}",
                "held-out pref. accuracy": f"{final['eval_rewards/accuracies']:.3f}",
                "held-out margin": f"{final['eval_rewards/margins']:+.3f}",
                "s": f"{time.perf_counter() - t:.0f}",
            }
        )
        print(rows[-1], flush=True)
    print(table(rows, list(rows[0])))


if __name__ == "__main__":
    main()
