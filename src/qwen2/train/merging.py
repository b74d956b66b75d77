"""The Online Merging Optimizer (Lu et al. 2024, arXiv 2405.17931; SPEC 4), used by Qwen2's RLHF (paper 4.3).

Each step merges the plain Adam update Δθ with the task vector τ_r = θ_r - θ_b of the reference (SFT)
model over the base (pre-trained) model, to reduce the alignment tax:

    m <- β1 m + (1-β1) g;  v <- β2 v + (1-β2) g²;  Δθ = -lr·√(1-β2^t)/(1-β1^t) · m / (√v + ε)
    OnDARE: θ <- θ + (1-α)·F_R(Δθ) + α·F_R(τ_r)          F_R: Bernoulli keep-mask, rate p, survivors / p
    OnTIES: θ <- θ + (1-α)·Δθ' + α·τ_r'                  top-p fraction by |.|, then sign consensus:
            s = sign(F(τ_r) + F(Δθ)) (>= 0 counts +); entries of each whose sign differs from s are zeroed
    then decoupled weight decay θ <- θ - lr·wd·θ (after the merge, as in the reference code).

As the reference code (QwenLM/online_merging_optimizers, optimizers.py ODAdamW / OTAdamW): ε is added to
the un-bias-corrected √v; τ_r is masked once (OnDARE: then clamped to ±clip_val), Δθ every step; OnTIES'
magnitude mask is skipped when p·numel < 1; optional `rescale` restores the masked tensor's L1 norm.
Departures: DARE masks come from `generator` (torch.rand(shape) < p, one draw per parameter in group
order) rather than F.dropout's global RNG, so runs are reproducible; the step-K variant (`online_step`)
is not implemented (K = 1). With p = 1 and α = 0, OnDARE is Adam with decoupled weight decay.
Under FSDP2 the elementwise OnDARE is exact per shard; OnTIES' per-step top-k becomes per shard.
"""

from __future__ import annotations

import math

import torch
from torch import nn

METHODS = ("ondare", "onties")


def task_vectors(model: nn.Module, base: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]):
    """{parameter: θ_r - θ_b} for each trainable parameter of `model`, by name from two state dicts."""
    out = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        for what, sd in (("base", base), ("reference", reference)):
            if name not in sd:
                raise KeyError(
                    f"task_vectors: the {what} state dict has no {name!r}; pass the state dicts "
                    "of the pre-trained (base) and SFT (reference) models of this architecture"
                )
        ref, bas = (sd[name].detach().to(p.device, torch.float32) for sd in (reference, base))
        out[p] = (ref - bas).to(p.dtype)  # the difference in fp32, so bf16 weights lose no small deltas
    return out


def dare_mask(x: torch.Tensor, keep: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """F_R: keep each entry with probability `keep`, survivors scaled by 1/keep (F.dropout(p=1-keep))."""
    if keep >= 1:
        return x
    dev = generator.device if generator is not None else x.device
    kept = (torch.rand(x.shape, generator=generator, device=dev) < keep).to(x.device)
    return x * kept / keep


def magnitude_mask(x: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the top `density` fraction of entries by |x| (none dropped if density·numel < 1, as the code)."""
    k = int(density * x.numel())
    if density >= 1 or k < 1:
        return x
    idx = torch.topk(x.abs().flatten(), k).indices
    return torch.zeros_like(x).flatten().index_fill_(0, idx, 1).view_as(x) * x


def _rescale(masked: torch.Tensor, l1: torch.Tensor, eps: float, clip: float | None) -> torch.Tensor:
    """Scale `masked` back to the L1 norm `l1` of the unmasked tensor (the code's optional `rescale`)."""
    if l1 < 1e-8:
        return masked
    out = masked * (l1 / (masked.abs().sum() + eps))
    return out.clamp(-clip, clip) if clip is not None else out


def _local(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's local shard (a view: in-place updates reach the DTensor), or the tensor itself."""
    return t.to_local() if hasattr(t, "to_local") else t


class OnlineMergingOptimizer(torch.optim.Optimizer):
    """OnDARE / OnTIES AdamW (see the module docstring).

    params: parameters or groups (e.g. train.loop.param_groups(model, wd): a group's weight_decay wins);
    tau: {parameter: task vector}, from `task_vectors(model, base_sd, reference_sd)`; masked here, once.
    reserve_p: the fraction kept by each mask (1: none dropped); alpha: the weight of the task vector.
    """

    def __init__(
        self,
        params,
        tau: dict,
        method: str = "ondare",
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        reserve_p: float = 1.0,
        alpha: float = 0.0,
        rescale: bool = False,
        clip_val: float = 1.0,
        generator: torch.Generator | None = None,
    ):
        if method not in METHODS:
            raise ValueError(f"OnlineMergingOptimizer: method {method!r} is not one of {METHODS}")
        if not 0 < reserve_p <= 1:
            raise ValueError(f"OnlineMergingOptimizer: reserve_p={reserve_p} must be in (0, 1]")
        if not 0 <= alpha <= 1:
            raise ValueError(f"OnlineMergingOptimizer: alpha={alpha} must be in [0, 1]")
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
        super().__init__(params, defaults)
        self.method, self.reserve_p, self.alpha = method, reserve_p, alpha
        self.rescale, self.clip_val, self.eps, self.generator = rescale, clip_val, eps, generator
        with torch.no_grad():
            for group in self.param_groups:
                for p in group["params"]:
                    if p not in tau:
                        raise KeyError(
                            "OnlineMergingOptimizer: a parameter of shape "
                            f"{tuple(p.shape)} has no task vector in `tau`; build tau with "
                            "task_vectors(model, base, reference) over the same model"
                        )
                    t = tau[p].detach().to(p.device, p.dtype).clone()
                    _local(t).copy_(self._mask_tau(_local(t)))  # under FSDP2: each rank masks its shard
                    self.state[p]["tau"] = t

    def _mask_tau(self, t: torch.Tensor) -> torch.Tensor:
        if self.method == "ondare":
            return dare_mask(t, self.reserve_p, self.generator).clamp(-self.clip_val, self.clip_val)
        masked = magnitude_mask(t, self.reserve_p)
        return _rescale(masked, t.abs().sum(), 0.0, None) if self.rescale else masked

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        a = self.alpha
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "step" not in state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                state["step"] += 1
                t = state["step"]
                # FSDP2: every tensor here is a DTensor sharded alike; the arithmetic runs on the shards
                p_, m, v, g, tau = (
                    _local(x) for x in (p, state["exp_avg"], state["exp_avg_sq"], p.grad, state["tau"])
                )
                m.mul_(beta1).add_(g, alpha=1 - beta1)
                v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
                step_size = group["lr"] * math.sqrt(1 - beta2**t) / (1 - beta1**t)
                delta = m / (v.sqrt() + group["eps"]) * -step_size
                if self.method == "ondare":
                    masked = dare_mask(delta, self.reserve_p, self.generator)
                    if self.rescale:
                        masked = _rescale(masked, delta.abs().sum(), self.eps, self.clip_val)
                    update = a * tau + (1 - a) * masked
                else:
                    masked = magnitude_mask(delta, self.reserve_p)
                    if self.rescale:
                        masked = _rescale(masked, delta.abs().sum(), 0.0, None)
                    sign = torch.where(tau + masked >= 0, 1.0, -1.0).to(p_.dtype)  # the majority sign
                    update = a * tau * (tau.sign() == sign) + (1 - a) * masked * (masked.sign() == sign)
                p_.add_(update)
                if group["weight_decay"] > 0:
                    p_.add_(p_, alpha=-group["lr"] * group["weight_decay"])  # decoupled, after the merge
        return loss
