"""Scale-out wiring for the one loop (DESIGN principle 9: parallelism applied from outside the model).

torchrun's process group (NCCL with one GPU per local rank, gloo on CPU), activation checkpointing of
each decoder layer, DDP or FSDP2 (`fully_shard`, per-parameter DTensor sharding) around the model and
its objective, gradient synchronisation only on a step's last micro-batch, the mean of metrics over
ranks, and the full (unsharded) model and optimizer state that checkpoints and exports need.
Reference: torchtitan's `parallelize` (sharding applied to a finished model, one layer at a time).
"""

from __future__ import annotations

import contextlib
import functools
import os

import torch
import torch.distributed as dist
import torch.nn as nn


def init_distributed() -> tuple[int, int, torch.device]:
    """(rank, world_size, device). Under torchrun (WORLD_SIZE > 1) joins the process group:
    NCCL with one GPU per local rank when CUDA is present, else gloo on CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            dist.init_process_group("nccl")
        else:
            dist.init_process_group("gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    return rank, world, device


class ObjectiveModule(nn.Module):
    """model + objective as one module, so DDP / FSDP2 see the whole step in their forward hooks.
    The Trainer sets `objective` (a function (model, batch) -> (loss, metrics)) before each call."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.net = model
        self.objective = None

    def forward(self, batch):
        return self.objective(self.net, batch)


def checkpoint_layers(model: nn.Module) -> None:
    """Activation checkpointing from outside the model: each decoder layer recomputes in backward."""
    from torch.utils.checkpoint import checkpoint

    for layer in model.model.layers:
        layer.forward = functools.partial(checkpoint, layer.forward, use_reentrant=False)


def parallelize(
    module: ObjectiveModule,
    *,
    parallel: str,
    activation_checkpointing: bool,
    world: int,
    device: torch.device,
) -> nn.Module:
    """The module the loop calls: `module` itself on one process, else DDP or FSDP2 around it."""
    if activation_checkpointing:
        checkpoint_layers(module.net)
    if world == 1:
        return module
    if parallel == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None)
    from torch.distributed.fsdp import fully_shard

    for layer in module.net.model.layers:  # one all-gather per layer: only one layer is whole at a time
        fully_shard(layer)
    fully_shard(module)
    return module


def grad_sync(wrapped: nn.Module, sync: bool):
    """Context for one micro-batch's backward: gradients are all-reduced (DDP) or reduce-scattered
    (FSDP2) only when `sync`, i.e. on a step's last micro-batch."""
    if hasattr(wrapped, "set_requires_gradient_sync"):  # FSDP2
        wrapped.set_requires_gradient_sync(sync)
    if not sync and hasattr(wrapped, "no_sync"):  # DDP
        return wrapped.no_sync()
    return contextlib.nullcontext()


def full_value(t: torch.Tensor) -> float:
    """A scalar that FSDP2 may return as a DTensor (the global gradient norm), as a float."""
    return float(t.full_tensor() if hasattr(t, "full_tensor") else t)


def mean_over_ranks(values: dict[str, torch.Tensor], world: int, device: torch.device) -> dict[str, float]:
    """The mean of each scalar over all ranks (one all-reduce for all of them)."""
    if not values:
        return {}
    keys = sorted(values)
    vec = torch.stack([values[k].reshape(()) for k in keys]).to(device)
    if world > 1:
        dist.all_reduce(vec)
        vec /= world
    return {k: float(v) for k, v in zip(keys, vec.cpu(), strict=True)}


def full_state_dict(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """(model, optimizer) state, unsharded, on the CPU, keyed by parameter name. Collective under FSDP."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    return get_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_full_state_dict(model: nn.Module, optimizer: torch.optim.Optimizer, model_sd: dict, optim_sd: dict):
    """The inverse of full_state_dict: each rank keeps its shard of the full tensors. A parameter the saved
    optimizer has no state for (an MoE expert no token has reached yet: AdamW makes a state at the first
    gradient) gets none now either, as in the run that saved it."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    set_model_state_dict(model, model_sd, options=StateDictOptions(full_state_dict=True))
    set_optimizer_state_dict(
        model, optimizer, optim_sd, options=StateDictOptions(full_state_dict=True, strict=False)
    )
    saved = set(optim_sd.get("state", {}))
    for name, p in model.named_parameters():
        if name not in saved:
            optimizer.state.pop(p, None)


def model_from_state(like: nn.Module, state: dict[str, torch.Tensor]) -> nn.Module:
    """A plain (unwrapped) model of `like`'s class and config holding the full tensors of `state` (built
    on the meta device, assigned: no copy). The class matters: a RewardModel has `score`, no lm_head."""
    with torch.device("meta"):
        plain = type(like)(like.config)
    plain.load_state_dict(state, assign=True, strict=True)
    return plain


def gather_model(model: nn.Module, *, sharded: bool, is_main: bool) -> nn.Module | None:
    """An unsharded model on rank 0 (`model` itself unless FSDP shards it); None elsewhere.
    Collective when `sharded`: every rank must call it."""
    if not sharded:
        return model if is_main else None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return model_from_state(model, sd) if is_main else None
