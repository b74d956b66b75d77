"""The speedrun's optional MoE stage (`qwen2 speedrun --moe`): the pre-trained dense model upcycled to a small
Qwen2-MoE as Qwen2-57B-A14B was initialised (paper 2.2.3; upcycle.py), then a short continuation of
pre-training in the one loop, so the report shows what upcycling costs and what the continuation buys back.

    summary = run_moe_stage(Path("runs/speedrun"), Path("runs/speedrun/moe"), minutes=3)

Expert width: the MoE keeps the dense model's FFN compute per token, so top_k routed experts plus the
shared expert (shared_experts experts wide) add up to the dense FFN:
(top_k + shared_experts) * expert_size = intermediate_size, expert_size rounded to the nearest multiple
of 8 (at least 8), not merely to an integer: torch._grouped_mm, which transformers' default experts
implementation and our kernels.moe call, needs rows of a multiple of 16 bytes (8 bf16 values). The speedrun
model: 384 / 3 = 128 exactly; the test model: 160 / 3 = 53.3 -> 56. Routing, the shared expert's gate and
the re-initialised half of each expert make the upcycled model differ from its parent (not function
preserving), hence the held-out loss before the continuation.

The continuation trains on the base run's pre-training corpus (its train split, pretrain.prepare_data's
split) at the base run's stage-1 row length, batch size, peak learning rate and optimizer settings, with
next_token_loss (cross-entropy + router_aux_loss_coef x the load-balancing loss; expert load logged),
for `steps` steps or a wall-time budget of `minutes` (pretrain._Budget fixes the step count, and so the
cosine decay, after measuring the step time). Held-out losses: stages.heldout_lm_loss, the measure the
report's alignment tax uses, of the dense parent, of the upcycled model before training
(OUT/upcycled, a checkpoint too) and of the result (OUT/model).

Resumable like every stage: a rerun after kill -9 continues from the newest checkpoint (the upcycling is
seeded, so the model it rebuilds first is the same); a finished stage (OUT/summary.json) is read back.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from pathlib import Path

import torch

# What a stage writes; removed by resume=False.
OUTPUTS = (
    "checkpoints",
    "model",
    "upcycled",
    "tensorboard",
    "metrics.jsonl",
    "summary.json",
    "heldout_before.json",
    "expert_load_moe.png",
)
STAGE = "moe"


def expert_width(intermediate_size: int, top_k: int, shared_experts: int) -> int:
    """The expert width whose active FFN per token (top_k routed + the shared experts) matches the dense
    one, to the nearest multiple of 8 (the module docstring says why)."""
    if top_k < 1 or shared_experts < 0:
        raise ValueError(f"moe stage: top_k must be >= 1, shared_experts >= 0; got {top_k}, {shared_experts}")
    return max(8, 8 * round(intermediate_size / (top_k + shared_experts) / 8))


def _train_config(pre: dict, steps: int | None, seed: int):
    """The base run's stage-1 loop settings (its TrainConfig fields), a short warmup and this stage's seed."""
    from qwen2.train.loop import TrainConfig

    cfg = TrainConfig(**{f.name: pre[f.name] for f in dataclasses.fields(TrainConfig) if f.name in pre})
    warmup = min(cfg.warmup_steps, 10, max(1, steps // 5)) if steps else min(cfg.warmup_steps, 10)
    return dataclasses.replace(cfg, warmup_steps=warmup, seed=seed, optimizer="adamw")


def _write_json(path: Path, obj) -> None:
    from qwen2.files import atomic_write_text

    atomic_write_text(path, json.dumps(obj, indent=2, default=str) + "\n")


def run_moe_stage(
    base_run: Path,
    out: Path,
    *,
    steps: int | None = None,
    minutes: float | None = None,
    num_experts: int = 8,
    top_k: int = 2,
    shared_experts: int = 1,
    reinit: float = 0.5,
    seed: int = 0,
    resume: bool = True,
) -> dict:
    """Upcycle base_run/model, continue pre-training for `steps` steps or `minutes`, export OUT/model; returns
    the summary (also OUT/summary.json): dense / upcycled / trained held-out loss, steps, tokens, seconds,
    total and active parameters, the expert-load PNG and the model folder. Give one of steps, minutes."""
    from qwen2.config import ModelConfig, param_counts
    from qwen2.data import PackedLoader
    from qwen2.data.shards import ShardSet
    from qwen2.model import Qwen2
    from qwen2.train.loop import Trainer
    from qwen2.train.objectives import next_token_loss
    from qwen2.train.parallel import init_distributed
    from qwen2.train.pretrain import _Budget, export
    from qwen2.train.stages import heldout_lm_loss
    from qwen2.train.state import latest_checkpoint, load_checkpoint
    from qwen2.train.upcycle import upcycle

    t0 = time.perf_counter()
    base_run, out = Path(base_run), Path(out)
    if (steps is None) == (minutes is None):
        raise ValueError(f"moe stage: give one of steps and minutes, got steps={steps}, minutes={minutes}")
    if steps is not None and steps < 1 or minutes is not None and minutes <= 0:
        raise ValueError(f"moe stage: steps must be >= 1, minutes > 0; got steps={steps}, minutes={minutes}")
    dense_dir = base_run / "model"
    for need in (dense_dir / "config.json", base_run / "summary.json", base_run / "data" / "corpus"):
        if not need.exists():
            raise FileNotFoundError(f"{need}: missing; the MoE stage needs a finished pre-training run")
    pre = json.loads((base_run / "summary.json").read_text())["config"]
    dense = ModelConfig.from_json(dense_dir / "config.json")
    recipe = dict(
        num_experts=num_experts,
        top_k=top_k,
        expert_size=expert_width(dense.intermediate_size, top_k, shared_experts),
        shared_experts=shared_experts,
        reinit=reinit,
        seed=seed,
    )
    out.mkdir(parents=True, exist_ok=True)
    if not resume:
        for name in OUTPUTS:
            path = out / name
            shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    done = out / "summary.json"
    if done.is_file():
        summary = json.loads(done.read_text())
        if summary.get("recipe") != recipe:
            raise ValueError(
                f"{done}: a finished MoE stage with another recipe ({summary.get('recipe')}); "
                f"pass resume=False (--no-resume) or another output folder"
            )
        print(f"{out} holds a finished MoE stage: reading its summary; --no-resume trains it again")
        return {**summary, "finished_before": True}

    # The upcycled model: rebuilt on every run (seeded, so the same), its own copy of every tensor.
    config, state = upcycle(dense_dir, **recipe)
    with torch.device("meta"):
        model = Qwen2(config)
    model.load_state_dict({k: v.float().clone() for k, v in state.items()}, strict=True, assign=True)
    del state
    before_file = out / "heldout_before.json"
    if not before_file.is_file():  # measured once, on the upcycled model before any step
        export(model, dense_dir, out / "upcycled")
        before = {
            "dense": heldout_lm_loss(dense_dir, base_run),
            "upcycled": heldout_lm_loss(out / "upcycled", base_run),
        }
        _write_json(before_file, before)
    before = json.loads(before_file.read_text())

    if init_distributed()[2].type == "cpu":  # as load_model gives CPU models: the grouped MoE kernels
        from qwen2.kernels import install

        install(model)
    trainer = Trainer(model, _train_config(pre, steps, seed), out, stage=STAGE)
    train, val = ShardSet(base_run / "data" / "corpus").split(pre["heldout_fraction"], seed=pre["seed"])
    seq_len, rows = pre["seq_len"], pre["batch_size"]
    rank, world = trainer.rank, trainer.world
    loader = PackedLoader(train, seq_len, rows, rank, world, seed=seed, spread=pre.get("spread", 1))

    def eval_batches():
        held_out = PackedLoader(val, seq_len, rows, rank, world, seed=0, shuffle=False)
        return [next(held_out) for _ in range(pre.get("eval_batches", 4))]

    ckpt = latest_checkpoint(out) if resume else None
    if ckpt is not None:
        load_checkpoint(trainer, loader, ckpt)
        print(f"resuming {out} from {ckpt.name}; --no-resume starts over")
    plan = trainer.meta.setdefault("plan", {})
    budget = None
    if STAGE not in plan and steps is not None:
        plan[STAGE] = steps
    elif STAGE not in plan:  # time kept back for the held-out loss, the export and the summary
        seconds = minutes * 60 - (time.perf_counter() - t0)
        seconds -= max(5.0, 0.05 * seconds)
        budget = _Budget(STAGE, max(1.0, seconds), min(3, trainer.cfg.warmup_steps))
    end = plan.get(STAGE)
    last = trainer.fit(
        next_token_loss, loader, end_step=end, on_step=budget, eval_batches=eval_batches, desc="moe"
    )
    plain = trainer.full_model()
    trainer.close()
    export(plain, dense_dir, out / "model")
    counts, dense_counts = param_counts(config), param_counts(dense)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    png = out / f"expert_load_{STAGE}.png"
    summary = {
        "recipe": recipe,
        "heldout_loss": {
            "dense": before["dense"],
            "upcycled": before["upcycled"],
            "trained": heldout_lm_loss(out / "model", base_run),
        },
        "steps": trainer.step,
        "tokens": trainer.tokens,
        "seconds": round(time.perf_counter() - t0, 1),
        "train_seconds": round(sum(r.get("step_time_s", 0.0) for r in records), 1),
        "final": {k: float(v) for k, v in last.items()},
        "params": {
            "dense": dense_counts.total,
            "total": counts.total,
            "active": counts.active,
            "dense_active": dense_counts.active,
        },
        "expert_load_png": str(png) if png.is_file() else None,
        "upcycled": str(out / "upcycled"),
        "model": str(out / "model"),
    }
    _write_json(done, summary)
    return summary
