"""Expert load of a Qwen2-MoE model in training: which share of the routed (token, slot) pairs each expert
of each layer received, the scalar summaries the loop logs, a per-run accumulator and a heat map.

The load is what the router does (softmax over all experts, top-k; SPEC 2.6), computed from the router
logits the model already collects for the auxiliary loss. The loop's metrics must be scalars (averaged
over micro-batches and ranks), so per step only summaries are logged: `moe/max_load` and `moe/min_load`,
the largest and smallest load x num_experts over all layers and experts (1 = perfectly balanced; 0 =
an expert no token picked), and `moe/load_cv`, the spread of the loads (std / mean over a layer's
experts, averaged over layers). Under DDP / FSDP each is the mean over ranks of the rank's value, so a
max is the mean of the ranks' maxima, which is at least the max of the global load.

The full [layers, experts] load of a run is summed on the model (`accumulate`, called by the objective in
training mode) and read back, averaged over calls and ranks, by `accumulated_load`, which the caller
passes to `plot_expert_load` at the end of a run.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from qwen2.extras import require


@torch.no_grad()
def expert_load(
    router_logits: list[torch.Tensor], top_k: int, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """[layers, experts] fp32: the fraction of layer l's routed (token, slot) pairs sent to expert e (each
    row sums to 1). router_logits: one [T, E] tensor per MoE layer; mask [T] or [B, S]: 1 on real tokens."""
    if not router_logits:
        raise ValueError("expert_load: no router logits (the model has no MoE layer)")
    g = torch.stack([r.detach().float() for r in router_logits])  # [L, T, E]
    n_layers, tokens, n_exp = g.shape
    ids = torch.topk(F.softmax(g, dim=-1), top_k, dim=-1).indices  # [L, T, k]
    w = torch.ones(tokens, device=g.device) if mask is None else mask.reshape(-1).to(g.device).float()
    if w.numel() != tokens:
        raise ValueError(f"expert_load: mask has {w.numel()} tokens, router logits {tokens}")
    counts = torch.zeros(n_layers, n_exp, device=g.device)
    counts.scatter_add_(1, ids.reshape(n_layers, -1), w.repeat_interleave(top_k).expand(n_layers, -1))
    return counts / counts.sum(dim=1, keepdim=True).clamp_min(1e-12)


def load_summary(load: torch.Tensor) -> dict[str, torch.Tensor]:
    """The scalar metrics of a [layers, experts] load (see the module docstring)."""
    scaled = load * load.shape[1]
    return {
        "moe/max_load": scaled.max(),
        "moe/min_load": scaled.min(),
        "moe/load_cv": (load.std(dim=1, unbiased=False) / load.mean(dim=1)).mean(),
    }


_SUM, _COUNT = "_expert_load_sum", "_expert_load_count"


def accumulate(model: torch.nn.Module, load: torch.Tensor) -> None:
    """Add one micro-batch's [layers, experts] load to the run's sum kept on `model` (plain attributes:
    not in the state dict)."""
    d = model.__dict__
    d[_SUM] = load.detach().clone() if d.get(_SUM) is None else d[_SUM] + load.detach()
    d[_COUNT] = d.get(_COUNT, 0) + 1


def accumulated_load(model: torch.nn.Module, *, reset: bool = True) -> torch.Tensor | None:
    """The mean [layers, experts] load over every `accumulate` call since the last reset, and over ranks
    when a process group is up (then collective: every rank must call it). None when nothing was added."""
    d = model.__dict__
    total, count = d.get(_SUM), d.get(_COUNT, 0)
    if reset:
        d[_SUM], d[_COUNT] = None, 0
    if total is None:
        return None
    mean = total / count
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(mean)
        mean /= torch.distributed.get_world_size()
    return mean.cpu()


def plot_expert_load(loads: torch.Tensor, path: str | Path, title: str = "expert load") -> Path:
    """A PNG of a [layers, experts] load: a heat map of load x num_experts (1 = balanced) per layer and
    expert, and the histogram of those values. Needs matplotlib (the `plot` extra)."""
    require("matplotlib", "plot", "the expert-load plot")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scaled = (loads.detach().float().cpu() * loads.shape[1]).numpy()
    path = Path(path)
    fig, (ax, hx) = plt.subplots(
        1, 2, figsize=(12, 1.5 + 0.25 * scaled.shape[0]), gridspec_kw={"width_ratios": [3, 1]}
    )
    im = ax.imshow(scaled, aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set(xlabel="expert", ylabel="MoE layer", title=f"{title} (load x experts; 1 = balanced)")
    fig.colorbar(im, ax=ax)
    hx.hist(scaled.ravel(), bins=min(50, max(10, scaled.size // 4)))
    hx.axvline(1.0, color="k", lw=1, ls="--")
    hx.set(xlabel="load x experts", ylabel="(layer, expert) pairs")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
