"""Post-training end to end (paper section 4; SPEC 4, 7): SFT, the reward model, offline DPO, online DPO.

Each is an objective of the one loop (train.loop.Trainer, DESIGN principle 7) over conversation data
(data.conversations) with the loop's checkpoints, resume, metrics and torchrun; each writes a Hugging
Face checkpoint to OUT/model (the reward model as Qwen2ForSequenceClassification) with the starting
model's tokenizer files beside it.

    run_posttrain(SFTConfig(model="runs/speedrun/model", data="sft.jsonl", out="runs/sft"))

Batches: `ExampleLoader` walks an endless stream of per-epoch shuffles of the records; optimizer step g
takes the next `batch_size * grad_accum * world` records, micro-batch i of rank r its slice, so one
process with batch B*W trains on exactly the records W processes with batch B do. SFT's loss is the mean
over every labelled token of the whole step (all micro-batches and ranks, as transformers'
`num_items_in_batch`): each micro-batch carries `loss_scale` so the loop's equal-weight mean gives it.
DPO's reference log-probs are computed once, before training, by the starting (or `reference`) model,
so no second model is held; online DPO keeps one frozen (its pairs are new every step).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch
import torch.distributed as dist

from qwen2.train.examples import ExampleLoader
from qwen2.train.loop import Trainer
from qwen2.train.recipes import DPOConfig, OnlineDPOConfig, PostTrainConfig, RewardConfig, SFTConfig
from qwen2.train.state import latest_checkpoint, load_checkpoint, read_trainer_info

IGNORE_INDEX = -100


# ---- data --------------------------------------------------------------------------------------------
def split_heldout(items: list, fraction: float, seed: int) -> tuple[list, list]:
    """(train, held-out): a seeded `fraction` of the records (at least one when there are two or more)."""
    if fraction <= 0 or len(items) < 2:
        return items, []
    k = max(1, int(len(items) * fraction))
    order = torch.randperm(len(items), generator=torch.Generator().manual_seed(seed)).tolist()
    held = set(order[:k])
    return [x for i, x in enumerate(items) if i not in held], [x for i, x in enumerate(items) if i in held]


def _labelled(example: dict) -> int:
    return sum(1 for t in example["labels"] if t != IGNORE_INDEX)


def sft_collate(examples: list[dict], cfg: SFTConfig, pad_id: int, parts: int):
    """Pad (or pack) a micro-batch; `loss_scale` = parts / labelled tokens of the whole step."""
    from qwen2.data.conversations import pack, pad

    def collate(micro, whole):
        batch = [examples[i] for i in micro]
        out = pack(batch, cfg.max_len, pad_id) if cfg.packing else pad(batch, pad_id)
        out["n_tokens"] = sum(len(e["input_ids"]) for e in batch)  # not the padding
        step_tokens = sum(_labelled(examples[i]) for i in whole)
        out["loss_scale"] = torch.tensor(parts / max(step_tokens, 1))
        return out

    return collate


def sft_objective(model, batch):
    """SFT loss as a share of the step's token mean (see the module docstring); metrics likewise."""
    from qwen2.train.posttrain_losses import sft_loss

    loss, metrics = sft_loss(model, batch)
    labelled = metrics.pop("tokens")  # the loop's "tokens" counts every position trained on
    if "loss_scale" in batch:
        loss = loss * labelled * batch["loss_scale"]
    return loss, {**metrics, "loss": loss.detach(), "labelled_tokens": labelled}


def pair_collate(pairs: list[tuple[dict, dict]], pad_id: int, ref_logps: torch.Tensor | None = None):
    """TRL's concatenated preference layout (chosen rows, then rejected), with the pairs' reference
    log-probs [2B] when precomputed (ref_logps [N, 2])."""
    from qwen2.data.conversations import preference_batch

    def collate(micro, whole):
        out = preference_batch([pairs[i] for i in micro], pad_id)
        out["n_tokens"] = sum(len(e["input_ids"]) for i in micro for e in pairs[i])
        if ref_logps is not None:
            out["ref_logps"] = torch.cat([ref_logps[micro, 0], ref_logps[micro, 1]])
        return out

    return collate


@torch.no_grad()
def reference_logps(reference, pairs, pad_id: int, batch_size: int, rank: int, world: int, device):
    """[N, 2] (chosen, rejected) sequence log-probs under the frozen reference, once; under torchrun each
    rank scores every world-th pair and one all-reduce shares them."""
    from qwen2.data.conversations import preference_batch
    from qwen2.train.posttrain_losses import label_logps

    out = torch.zeros(len(pairs), 2, dtype=torch.float32, device=device)
    mine = list(range(rank, len(pairs), world))
    reference.eval()
    for s in range(0, len(mine), batch_size):
        idx = mine[s : s + batch_size]
        b = preference_batch([pairs[i] for i in idx], pad_id)
        lp = label_logps(reference, b["input_ids"].to(device), b["labels"].to(device))
        out[idx] = torch.stack(lp.chunk(2), dim=1)
    if world > 1:
        dist.all_reduce(out)
    return out.cpu()


# ---- the runs ----------------------------------------------------------------------------------------
KINDS = {SFTConfig: "sft", RewardConfig: "reward", DPOConfig: "dpo", OnlineDPOConfig: "online-dpo"}


def _load_policy(path: str, device):
    from qwen2.checkpoint import load_model

    return load_model(path, dtype=torch.float32, device=device)


def _task_vector(cfg: DPOConfig, model, device) -> dict | None:
    """θ_ref - θ_base by name for the Online Merging Optimizer: the reference is the SFT model (`model`,
    the starting point), the base the pre-trained one (`base_model`)."""
    if cfg.optimizer == "adamw":
        return None
    if not cfg.base_model:
        raise ValueError(
            f"optimizer {cfg.optimizer!r} needs base_model: the pre-trained checkpoint the SFT model "
            "(`model`) was fine-tuned from; the task vector is their difference"
        )
    base = _load_policy(cfg.base_model, "cpu").state_dict()
    ref = {k: v.detach().to("cpu") for k, v in model.state_dict().items()}
    missing = sorted(set(ref) - set(base))
    if missing:
        raise ValueError(f"base_model {cfg.base_model}: not the SFT model's architecture (no {missing[0]})")
    return {k: ref[k].float() - base[k].float() for k in ref}


def total_steps(cfg: PostTrainConfig, n_train: int, step_size: int) -> int:
    """`steps` when set, else enough steps for `epochs` passes over the training records."""
    return cfg.steps if cfg.steps > 0 else max(1, math.ceil(cfg.epochs * n_train / step_size))


def run_posttrain(cfg: PostTrainConfig, resume: bool = True, allow_changed: bool = False) -> dict:
    """Run (or resume) one post-training stage; returns its summary (also OUT/summary.json).
    allow_changed: resume although the recipe's fields changed (state.load_checkpoint records them)."""
    from qwen2.tokenizer.bpe import load_tokenizer
    from qwen2.train.parallel import init_distributed
    from qwen2.train.pretrain import _write_json

    kind = KINDS[type(cfg)]
    cfg.validate(kind)
    t0 = time.perf_counter()
    rank, world, device = init_distributed()
    run_dir = Path(cfg.out)
    if not resume and rank == 0:
        from qwen2.train.pretrain import clear_run

        clear_run(run_dir)
    if not cfg.data:
        raise ValueError(f"{kind}: no data: set `data` (a .jsonl / .parquet file) or pass --data")
    tok = load_tokenizer(cfg.model)
    pad_id = tok.endoftext_id
    torch.manual_seed(cfg.seed)
    policy = _load_policy(cfg.model, device)
    tok.check_vocab(policy.config.vocab_size)
    build = {"sft": _sft, "reward": _reward, "dpo": _dpo, "online-dpo": _online}[kind]
    model, objective, loader, eval_batches, n_train, extra = build(
        cfg, tok, policy, pad_id, rank, world, device
    )
    task = _task_vector(cfg, policy, device) if isinstance(cfg, DPOConfig) else None
    trainer = Trainer(model, cfg, run_dir, stage=kind, task_vector=task)
    end = total_steps(cfg, n_train, loader.step_size)
    ckpt = latest_checkpoint(run_dir) if resume else None
    if ckpt is not None:
        if read_trainer_info(ckpt)["step"] >= end and (run_dir / "summary.json").is_file():
            if rank == 0:
                print(
                    f"{run_dir} holds a finished {kind} run; pass --no-resume (or another --out) to redo it"
                )
            return json.loads((run_dir / "summary.json").read_text()) if rank == 0 else {}
        load_checkpoint(trainer, loader, ckpt, allow_changed=allow_changed)
        if rank == 0:
            print(f"resuming {run_dir} from {ckpt.name}; --no-resume starts over")
    last = trainer.fit(objective, loader, end_step=end, eval_batches=eval_batches, desc=kind)
    final = trainer.full_model()
    summary = {}
    if rank == 0:
        export_dir = run_dir / "model"
        _export(final, cfg.model, export_dir)
        summary = {
            "kind": kind,
            "steps": trainer.step,
            "records": n_train,
            "tokens": trainer.tokens,
            "final": last,
            "seconds": round(time.perf_counter() - t0, 1),
            "model": str(export_dir),
            **extra,
            "config": cfg.__dict__,
        }
        _write_json(run_dir / "summary.json", summary)
    trainer.close()
    if dist.is_initialized():
        dist.barrier()
    return summary


def _export(model, source_dir: str, out: Path) -> None:
    """The trained model in the Hugging Face layout with the starting model's tokenizer and generation
    config beside it."""
    from qwen2.checkpoint import copy_side_files, save_model

    save_model(model, out)
    copy_side_files(source_dir, out)


def _eval(batches: list):
    return (lambda: batches) if batches else None


def _held_out_batches(items: list, collate, cfg: PostTrainConfig) -> list:
    n = min(len(items), cfg.batch_size * cfg.eval_batches)
    return [
        collate(list(range(s, min(s + cfg.batch_size, n))), list(range(s, min(s + cfg.batch_size, n))))
        for s in range(0, n, cfg.batch_size)
    ]


def _sft(cfg: SFTConfig, tok, policy, pad_id, rank, world, device):
    from qwen2.data.conversations import load_sft

    examples = load_sft(cfg.data, tok, cfg.max_len)
    train, held = split_heldout(examples, cfg.heldout_fraction, cfg.seed)
    parts = cfg.grad_accum * world
    loader = ExampleLoader.for_run(cfg, len(train), sft_collate(train, cfg, pad_id, parts), rank, world)
    held_batches = _held_out_batches(held, sft_collate(held, cfg, pad_id, 1), cfg) if held else []
    return policy, sft_objective, loader, _eval(held_batches), len(train), {}


def _pairs(cfg, tok):
    from qwen2.data.conversations import load_preferences

    pairs = load_preferences(cfg.data, tok, cfg.max_len)
    return split_heldout(pairs, cfg.heldout_fraction, cfg.seed)


def _reward(cfg: RewardConfig, tok, policy, pad_id, rank, world, device):
    from qwen2.train.posttrain_losses import reward_objective
    from qwen2.train.reward_model import RewardModel

    train, held = _pairs(cfg, tok)
    model = RewardModel.from_causal_lm(policy, pad_id, torch.Generator().manual_seed(cfg.seed))
    del policy
    loader = ExampleLoader.for_run(cfg, len(train), pair_collate(train, pad_id), rank, world)
    held_batches = _held_out_batches(held, pair_collate(held, pad_id), cfg) if held else []
    objective = reward_objective(cfg.center_coef or None)
    return model, objective, loader, _eval(held_batches), len(train), {}


def _dpo(cfg: DPOConfig, tok, policy, pad_id, rank, world, device):
    from qwen2.train.posttrain_losses import dpo_objective

    train, held = _pairs(cfg, tok)
    reference = _load_policy(cfg.reference, device) if cfg.reference else policy
    bs = max(1, cfg.batch_size)
    ref_train = reference_logps(reference, train, pad_id, bs, rank, world, device)
    ref_held = reference_logps(reference, held, pad_id, bs, rank, world, device) if held else None
    del reference
    loader = ExampleLoader.for_run(cfg, len(train), pair_collate(train, pad_id, ref_train), rank, world)
    held_batches = _held_out_batches(held, pair_collate(held, pad_id, ref_held), cfg) if held else []
    objective = dpo_objective(beta=cfg.beta, loss_type=cfg.loss_type)
    return policy, objective, loader, _eval(held_batches), len(train), {}


def _online(cfg: OnlineDPOConfig, tok, policy, pad_id, rank, world, device):
    from qwen2.data.conversations import load_prompts
    from qwen2.train.online_dpo import OnlinePairs, reward_scorer
    from qwen2.train.posttrain_losses import dpo_objective
    from qwen2.train.reward_model import load_reward_model

    if world > 1 and cfg.parallel == "fsdp":
        raise ValueError(
            "online-dpo: the engine samples with each rank's whole policy; use parallel: ddp "
            "(FSDP2 shards it), or a `sampler_url` endpoint"
        )
    if not cfg.reward_model:
        raise ValueError("online-dpo: set `reward_model` (a checkpoint written by `qwen2 reward`)")
    prompts = load_prompts(cfg.data)
    reference = _load_policy(cfg.reference or cfg.model, device).requires_grad_(False)
    reward = load_reward_model(cfg.reward_model, dtype=torch.float32, device=device)
    pairs = OnlinePairs(
        prompts, tok, policy, reference, reward_scorer(reward, tok, cfg.max_len), cfg, rank, world
    )
    episode = dpo_objective(beta=cfg.beta, loss_type=cfg.loss_type)

    def objective(model, batch):
        loss, metrics = episode(model, batch)
        return loss, {**metrics, **batch["episode"]}

    steps_cfg = {"prompts": len(prompts), "samples_per_prompt": cfg.samples}
    return policy, objective, pairs, None, len(prompts), steps_cfg
