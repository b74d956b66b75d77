"""`qwen2 sft | reward | dpo | online-dpo`: the post-training stages (paper section 4; train.posttrain).

    qwen2 sft        --model runs/speedrun/model --data sft.jsonl    --out runs/sft
    qwen2 reward     --model runs/sft/model      --data prefs.jsonl  --out runs/reward
    qwen2 dpo        --model runs/sft/model      --data prefs.jsonl  --out runs/dpo
    qwen2 online-dpo --model runs/dpo/model      --data prompts.jsonl --reward-model runs/reward/model
    torchrun --nproc-per-node 2 -m qwen2.cli sft --config sft.yaml

`--config` is a flat YAML file of the recipe's fields (`lr: 1e-5`, `epochs: 1`, `optimizer: ondare`, ...);
the flags given on the command line win over it. A run resumes from its newest checkpoint.
"""

from __future__ import annotations

STAGES = {
    "sft": "supervised fine-tuning on {messages} conversations (loss on assistant turns)",
    "reward": "a reward model (Qwen2ForSequenceClassification) on {prompt, chosen, rejected} pairs",
    "dpo": "offline DPO on preference pairs against the frozen starting model",
    "online-dpo": "online DPO: sample k replies with the engine, the reward model picks the pair",
}


def add_parsers(sub):
    for name, what in STAGES.items():
        p = sub.add_parser(name, help=what)
        p.add_argument("--config", help=f"a flat YAML file of {name} recipe fields")
        p.add_argument("--model", help="the starting checkpoint folder (tokenizer beside it)")
        p.add_argument("--data", help="a .jsonl / .parquet file in TRL's conversational format")
        p.add_argument("--out", help="the run folder; the trained model goes to OUT/model")
        if name == "online-dpo":
            p.add_argument("--reward-model", help="the reward model folder (from `qwen2 reward`)")
        if name in ("dpo", "online-dpo"):
            p.add_argument("--base-model", help="the pre-trained checkpoint (for optimizer ondare / onties)")
        p.add_argument("--no-resume", action="store_true", help="start over instead of resuming")
        p.add_argument(
            "--allow-changed", action="store_true", help="resume although hyper-parameters changed (recorded)"
        )
        p.set_defaults(func=run, stage=name)


def config_for(a):
    """The stage's recipe, the YAML file's fields over it, then the flags over both."""
    from qwen2.train.recipes import RECIPES, load_recipe, override

    cfg = load_recipe(a.config, default=a.stage) if a.config else RECIPES[a.stage]()
    if not isinstance(cfg, RECIPES[a.stage]):
        raise ValueError(f"{a.config}: recipe {type(cfg).__name__} is not a {a.stage} recipe")
    flags = {k: getattr(a, k, None) for k in ("model", "data", "out", "reward_model", "base_model")}
    return override(cfg, {k: v for k, v in flags.items() if v is not None}, source="command line")


def run(a) -> int:
    from qwen2.train.posttrain import run_posttrain

    summary = run_posttrain(config_for(a), resume=not a.no_resume, allow_changed=a.allow_changed)
    if summary:
        final = {k: round(v, 4) for k, v in summary["final"].items() if "loss" in k or "acc" in k}
        print(f"{a.stage}: {summary['steps']} steps, model: {summary['model']}  {final}")
    return 0
