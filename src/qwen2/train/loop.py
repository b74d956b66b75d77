"""The one training loop (DESIGN principle 7): every objective (pre-training, SFT, DPO, ...) runs here.

AdamW with decoupled weight decay (Loshchilov & Hutter) and no decay on norms, biases and the token
embedding; linear warmup then cosine (or linear / constant) decay to `min_lr_ratio` of the peak;
gradient accumulation; global-norm clipping; optional bf16 autocast and activation checkpointing;
periodic evaluation on held-out batches; metrics to JSONL (+ TensorBoard when installed) and tqdm.
Scale-out with torchrun (DDP or FSDP2, gloo on CPU and NCCL on GPU, same code path) is wired in
parallel.py; checkpoints on disk are state.py's, through `Trainer.state_dict` / `load_state_dict`.

The paper gives no optimiser hyper-parameters (SPEC 1.1); the defaults are the common AdamW choices
(betas 0.9/0.95, eps 1e-8, decay 0.1, clip 1.0). The learning rate is a pure function of the step
within the stage, so a checkpoint needs only the step and the stage's first step to restore it.

    trainer = Trainer(model, TrainConfig(...), run_dir, stage="pretrain")
    if (ckpt := latest_checkpoint(run_dir)):     # state.py: the newest complete checkpoint
        load_checkpoint(trainer, loader, ckpt)
    trainer.fit(next_token_loss, loader, end_step=1000)
    trainer.begin_stage("long", TrainConfig(...))  # a new schedule from the current step on
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from qwen2.extras import MissingExtra, require
from qwen2.train import moe_stats, parallel
from qwen2.train.state import rng_state, save_checkpoint, set_rng_state


@dataclass
class TrainConfig:
    batch_size: int = 8  # sequences per micro-batch per rank
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 20
    schedule: str = "cosine"  # cosine | linear | constant
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # 0 disables clipping
    precision: str = "fp32"  # fp32 | bf16 (autocast; master weights and optimizer stay fp32)
    activation_checkpointing: bool = False
    parallel: str = "ddp"  # ddp | fsdp, used when torchrun starts more than one process
    eval_every: int = 0  # optimizer steps between evaluations (0: only at the end of fit)
    log_every: int = 1
    ckpt_every: int = 0  # optimizer steps between checkpoints (0: only at the end of fit)
    keep_last: int = 2
    seed: int = 0
    # adamw | ondare | onties: the last two are the Online Merging Optimizer (merging.py, SPEC 4), which
    # needs the task vector (Trainer's `task_vector`); defaults from the OMO paper's reference script
    optimizer: str = "adamw"
    merge_alpha: float = 1e-7  # weight of the task vector in each step's merge
    merge_reserve: float = 0.01  # reserve rate p: the fraction each mask keeps

    def validate(self, source: str = "TrainConfig"):
        if self.schedule not in ("cosine", "linear", "constant"):
            raise ValueError(f"{source}: schedule must be cosine, linear or constant, got {self.schedule!r}")
        if self.precision not in ("fp32", "bf16"):
            raise ValueError(f"{source}: precision must be fp32 or bf16, got {self.precision!r}")
        if self.parallel not in ("ddp", "fsdp"):
            raise ValueError(f"{source}: parallel must be ddp or fsdp, got {self.parallel!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(
                f"{source}: optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}"
            )
        for name in ("batch_size", "grad_accum"):
            if getattr(self, name) < 1:
                raise ValueError(f"{source}: {name} must be >= 1, got {getattr(self, name)}")


# ---- optimizer and schedule --------------------------------------------------------------------
OPTIMIZERS = ("adamw", "ondare", "onties")


def build_optimizer(model: nn.Module, cfg: TrainConfig, task_vector: dict | None):
    """AdamW, or the Online Merging Optimizer over the same groups. `task_vector`: {parameter name:
    θ_ref - θ_base} (merging.task_vectors by name); under FSDP2 each is sharded like its parameter."""
    groups = param_groups(model, cfg.weight_decay)
    betas = (cfg.beta1, cfg.beta2)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=betas, eps=cfg.eps, foreach=True)
    from qwen2.train.merging import OnlineMergingOptimizer

    if task_vector is None:
        raise ValueError(
            f"optimizer {cfg.optimizer!r} merges with the task vector (reference - base): "
            "pass Trainer(task_vector=...) (qwen2 dpo / online-dpo: the `base_model` field)"
        )
    tau = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            if name not in task_vector:
                raise KeyError(f"task_vector has no {name!r}: build it from models of this architecture")
            t = task_vector[name].detach().to(p.device, p.dtype)
            if hasattr(p, "device_mesh"):  # an FSDP2 DTensor: shard the task vector the same way
                from torch.distributed.tensor import distribute_tensor

                t = distribute_tensor(t, p.device_mesh, p.placements)
            tau[p] = t
    return OnlineMergingOptimizer(
        groups,
        tau,
        method=cfg.optimizer,
        lr=cfg.lr,
        betas=betas,
        eps=cfg.eps,
        reserve_p=cfg.merge_reserve,
        alpha=cfg.merge_alpha,
    )  # DARE masks from the global torch RNG: per rank, restored by checkpoints with the other RNG states


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups: matrices decay; norms, biases (every 1-D tensor) and the token embedding do not.

    The embedding is excluded as in GPT-style recipes (decay would pull rare tokens' rows to zero);
    with tied embeddings that is also the output layer. An untied lm_head is a matrix and decays.
    """
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or name.endswith("embed_tokens.weight") else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay, "name": "decay"},
        {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"},
    ]


def lr_at(step: int, cfg: TrainConfig, total_steps: int) -> float:
    """Learning rate for optimizer step `step` (0-based) of a stage of `total_steps` steps."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps))
    decay = 0.5 * (1 + math.cos(math.pi * progress)) if cfg.schedule == "cosine" else 1 - progress
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * decay)


# ---- the trainer -------------------------------------------------------------------------------
# Settings fixed when the Trainer is built (they wrap or rewrite modules); a stage may change the rest.
STRUCTURAL = ("activation_checkpointing", "parallel", "optimizer")


class Trainer:
    """Holds the model, its parallel wrapper, the optimizer, the global step and the metrics files.

    `fit` runs one stage (an objective and a loader up to a global step); `begin_stage` starts the
    next one (its settings, a schedule from the current step) and the stages share the optimizer (the
    long-context stage continues pre-training). `meta` is the caller's (the orchestrator's plan):
    kept in checkpoints, restored in place. Checkpoints are written by `state.py`.
    """

    def __init__(
        self,
        model: nn.Module,
        cfg: TrainConfig,
        run_dir: str | os.PathLike,
        *,
        stage: str = "train",
        task_vector: dict | None = None,
    ):
        cfg.validate()
        self.cfg, self.run_dir, self.stage = cfg, Path(run_dir), stage
        self.rank, self.world, self.device = parallel.init_distributed()
        self.model = model.to(self.device)
        self.module = parallel.ObjectiveModule(self.model)
        self.wrapped = parallel.parallelize(
            self.module,
            parallel=cfg.parallel,
            world=self.world,
            activation_checkpointing=cfg.activation_checkpointing,
            device=self.device,
        )
        self.optimizer = build_optimizer(self.model, cfg, task_vector)
        self.step = 0  # optimizer steps done, counted across stages
        self.stage_start = 0  # global step at which the current stage began (its schedule's step 0)
        self.tokens = 0  # tokens trained on, all ranks
        self.meta: dict = {}  # free-form run facts kept in checkpoints (the orchestrator's plan)
        self._tb = None
        if self.rank == 0:
            self.run_dir.mkdir(parents=True, exist_ok=True)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # -- stages and state --
    def begin_stage(self, stage: str, cfg: TrainConfig) -> None:
        """Start stage `stage` at the current step: its settings, its schedule (warmup and decay
        counted from here), its optimizer hyper-parameters. Optimizer moments carry over."""
        cfg.validate(f"stage {stage!r}")
        for name in STRUCTURAL:
            if getattr(cfg, name) != getattr(self.cfg, name):
                raise ValueError(
                    f"stage {stage!r}: {name} is fixed when the Trainer is built "
                    f"({getattr(self.cfg, name)!r}); build a new Trainer to change it"
                )
        self.cfg, self.stage, self.stage_start = cfg, stage, self.step
        for group in self.optimizer.param_groups:
            group.update(betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)
            if group["name"] == "decay":
                group["weight_decay"] = cfg.weight_decay

    def state_dict(self) -> dict:
        """Everything a resumed run needs besides its loader: model and optimizer (full, unsharded,
        on the CPU; collective under FSDP), this process's RNG states, the step, the stage and where
        it began, the tokens seen, `meta` and the world size."""
        model_sd, optim_sd = parallel.full_state_dict(self.model, self.optimizer)
        return {
            "model": model_sd,
            "optimizer": optim_sd,
            "rng": rng_state(),
            "step": self.step,
            "stage": self.stage,
            "stage_start": self.stage_start,
            "tokens": self.tokens,
            "meta": copy.deepcopy(self.meta),
            "world_size": self.world,
        }

    def load_state_dict(self, state: dict) -> None:
        """The inverse of state_dict (the stage's settings come from `begin_stage`, not from here)."""
        if state["world_size"] != self.world:
            raise ValueError(
                f"saved with world_size {state['world_size']}, resumed with {self.world}; "
                f"resume with the same number of processes (the loader position is per rank)"
            )
        parallel.load_full_state_dict(self.model, self.optimizer, state["model"], state["optimizer"])
        set_rng_state(state["rng"])
        self.step, self.stage, self.stage_start = state["step"], state["stage"], state["stage_start"]
        self.tokens = state["tokens"]
        meta = copy.deepcopy(state.get("meta", {}))
        self.meta.clear()  # in place: a caller holding trainer.meta sees the restored plan
        self.meta.update(meta)

    def full_model(self) -> nn.Module | None:
        """The trained model, unsharded, on rank 0 (None elsewhere). Collective under FSDP."""
        sharded = self.world > 1 and self.cfg.parallel == "fsdp"
        return parallel.gather_model(self.model, sharded=sharded, is_main=self.is_main)

    # -- metrics --
    def log(self, record: dict) -> None:
        if not self.is_main:
            return
        record = {"stage": self.stage, "step": self.step, **record}
        with open(self.run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        tb = self._tensorboard()
        if tb is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k != "step":
                    tb.add_scalar(f"{self.stage}/{k}", v, self.step)

    def _tensorboard(self):
        if self._tb is None:
            try:
                require("tensorboard", "train", "TensorBoard metrics")
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:  # the train extra is optional: JSONL alone is complete
                why = (
                    e
                    if isinstance(e, MissingExtra)
                    else f"TensorBoard does not import ({e}): pip install 'qwen2[train]'"
                )
                print(f"note: {why}; metrics go to metrics.jsonl only")
                self._tb = False
            else:
                self._tb = SummaryWriter(str(self.run_dir / "tensorboard"))
        return self._tb or None

    def close(self):
        if self._tb:
            self._tb.close()

    # -- precision --
    def _autocast(self):
        if self.cfg.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _to_device(self, batch):
        if torch.is_tensor(batch):
            return batch.to(self.device, non_blocking=True)
        if isinstance(batch, dict):
            return {k: self._to_device(v) for k, v in batch.items()}
        if isinstance(batch, (tuple, list)):
            return type(batch)(self._to_device(b) for b in batch)
        return batch

    # -- one optimizer step --
    def train_step(self, objective, batches: list, total_steps: int) -> dict:
        """Accumulate gradients over `batches` (cfg.grad_accum micro-batches), clip, step. Returns metrics."""
        cfg, n = self.cfg, len(batches)
        self.module.objective = objective
        lr = lr_at(self.step - self.stage_start, cfg, total_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        sums: dict[str, torch.Tensor] = {}
        for i, batch in enumerate(batches):
            batch = self._to_device(batch)
            with parallel.grad_sync(self.wrapped, sync=i == n - 1):
                with self._autocast():
                    loss, metrics = self.wrapped(batch)
                (loss / n).backward()
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + v.detach().float() / n
        grad_norm = self._clip()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        out = parallel.mean_over_ranks(sums, self.world, self.device)
        out.update(lr=lr, grad_norm=grad_norm)
        return out

    def _clip(self) -> float:
        """Clip the global gradient norm to cfg.grad_clip (0: no clipping); returns the norm before."""
        params = [p for p in self.model.parameters() if p.grad is not None]
        max_norm = self.cfg.grad_clip if self.cfg.grad_clip > 0 else float("inf")
        return parallel.full_value(torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True))

    @torch.no_grad()
    def evaluate(self, objective, batches) -> dict:
        """Mean of the objective's metrics over held-out `batches` (an iterable), all ranks."""
        self.module.objective = objective
        self.model.eval()
        sums: dict[str, torch.Tensor] = {}
        n = 0
        for batch in batches:
            with self._autocast():
                _, metrics = self.wrapped(self._to_device(batch))
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + v.detach().float()
            n += 1
        self.model.train()
        means = parallel.mean_over_ranks(sums, self.world, self.device)
        return {f"eval_{k}": v / max(n, 1) for k, v in means.items()}

    # -- a stage --
    def fit(
        self,
        objective,
        loader,
        *,
        end_step: int | None,
        eval_batches=None,
        on_step=None,
        desc: str | None = None,
    ) -> dict:
        """Train until the global step reaches `end_step`. `loader` yields micro-batches and has
        state_dict()/load_state_dict(); `eval_batches()` returns held-out batches; `on_step(trainer,
        metrics)` runs after each step and may fix the end (an int) or end the stage now (False): a
        time budget, which starts with `end_step=None` (open-ended, the schedule's decay not yet placed).
        Checkpoints every cfg.ckpt_every steps and at the end."""
        from tqdm import tqdm

        if end_step is None and on_step is None:
            raise ValueError("Trainer.fit: end_step=None needs an on_step that fixes the end")
        cfg = self.cfg
        open_end = 10**12  # no end yet: lr_at sees a schedule too long to decay
        end_step = open_end if end_step is None else end_step
        total = end_step - self.stage_start
        it = iter(loader)
        bar = tqdm(
            total=None if end_step == open_end else end_step,
            initial=self.step,
            desc=desc or self.stage,
            disable=not self.is_main,
            dynamic_ncols=True,
        )
        last: dict = {}
        while self.step < end_step:
            t0 = time.perf_counter()
            batches = [next(it) for _ in range(cfg.grad_accum)]
            tokens = sum(_count_tokens(b) for b in batches) * self.world
            metrics = self.train_step(objective, batches, total)
            self.tokens += tokens
            dt = time.perf_counter() - t0
            metrics.update(tokens=self.tokens, tokens_per_s=tokens / max(dt, 1e-9), step_time_s=dt)
            last = metrics
            if eval_batches is not None and cfg.eval_every and self.step % cfg.eval_every == 0:
                metrics.update(self.evaluate(objective, eval_batches()))
            if self.step % cfg.log_every == 0 or self.step == end_step:
                self.log(metrics)
            bar.update(1)
            bar.set_postfix(loss=f"{metrics.get('loss', float('nan')):.3f}", lr=f"{metrics['lr']:.2e}")
            if on_step is not None:  # a time budget may fix (int) or end (False) the stage
                new_end = on_step(self, metrics)
                if new_end is False:
                    new_end = self.step
                if isinstance(new_end, int) and not isinstance(new_end, bool):
                    end_step, total, bar.total = new_end, new_end - self.stage_start, new_end
                    bar.refresh()
            if cfg.ckpt_every and self.step % cfg.ckpt_every == 0 and self.step < end_step:
                save_checkpoint(self, loader)
        bar.close()
        if eval_batches is not None:
            ev = self.evaluate(objective, eval_batches())
            self.log({"final": True, **ev})
            last.update(ev)
        save_checkpoint(self, loader)
        self._plot_expert_load()
        return last

    def _plot_expert_load(self) -> None:
        """OUT/expert_load_<stage>.png: the stage's [layers, experts] load of an MoE model (moe_stats)."""
        load = moe_stats.accumulated_load(self.model)  # collective: every rank calls it
        if load is None or not self.is_main:
            return
        try:
            png = moe_stats.plot_expert_load(load, self.run_dir / f"expert_load_{self.stage}.png", self.stage)
        except MissingExtra as e:  # matplotlib is optional; the per-step summaries are in metrics.jsonl
            print(f"note: {e}; no expert-load plot")
        else:
            print(f"expert load: {png}")


def _count_tokens(batch) -> int:
    """Tokens a micro-batch trains on: its `n_tokens` when it says (padded post-training batches), else
    every target position."""
    from qwen2.train.objectives import split_batch

    if isinstance(batch, dict) and "n_tokens" in batch:
        return int(batch["n_tokens"])
    return int(split_batch(batch)[1].numel())
