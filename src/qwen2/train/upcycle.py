"""Dense-to-MoE upcycling, as Qwen2-57B-A14B was initialised (paper section 2.2.3; SPEC.md section 5).

From a dense Qwen2 whose FFN is h_FFN wide, for n experts of width h_E, in every layer:
  1. the dense FFN is copied ceil(n * h_E / h_FFN) times;
  2. each copy is shuffled along the intermediate dimension by its own random permutation, applied
     alike to the rows of gate_proj and up_proj and to the columns of down_proj, so any set of
     intermediate neurons is a valid sub-MLP (SwiGLU is a sum over neurons);
  3. the shuffled copies, laid end to end, are cut into consecutive h_E-wide experts; the leftover
     neurons (copies * h_FFN - n * h_E of them) are dropped (an expert may straddle two copies);
  4. a fraction `reinit` (the paper: 50%) of each expert's parameters is re-initialised.
Attention, norms, embeddings and the output layer are copied unchanged. For Qwen2-57B-A14B from
Qwen2-7B: h_FFN 18,944, h_E 2,560, n 64 -> 9 copies, 6,656 neurons dropped per layer.

Choices the paper leaves open (SPEC 5), each an argument, recorded in config.json under "upcycling":
  * re-initialisation (`reinit_mode`): "element" (default) re-draws each entry of each expert weight
    matrix independently with probability `reinit` (a Bernoulli mask per matrix); "neuron" re-draws
    whole intermediate neurons (a gate row, its up row and its down column together). Re-drawn values
    come from N(0, reinit_std^2), reinit_std defaulting to the config's initializer_range (0.02), the
    distribution the model's own init_weights uses.
  * shared expert (the paper's 8 shared experts, stored fused as one MLP of shared_experts * h_E): built
    the same way from fresh copies of its own: ceil(S / h_FFN) new permutations laid end to end, the
    first S neurons kept (when S = h_FFN: the whole dense FFN, shuffled), then re-initialised like the
    routed experts (`reinit_shared=False` keeps it intact).
  * router (mlp.gate): N(0, router_std^2), router_std defaulting to initializer_range (HF's init); 0
    gives equal logits. shared_expert_gate: zeros, so sigmoid(gate) = 1/2 for every token at the start.
Randomness: layer i draws from its own generator seeded by (seed, i) (numpy SeedSequence), in this
order: the routed permutations, the shared ones, the router, then the re-initialisation of expert
0..n-1 (gate, up, down) and of the shared expert; so `upcycle_layer` reproduces any layer alone.

    config, state = upcycle(dense_model_or_dir, num_experts=64, top_k=8, expert_size=2560, shared_experts=8)
    upcycle_checkpoint("Qwen2-7B", "Qwen2-57B-A14B-init", **preset_recipe("Qwen2-57B-A14B"))
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from qwen2.config import PRESETS, ModelConfig, param_counts
from qwen2.files import atomic_dir

# Dense parents of the MoE presets (SPEC 5: secondary sources name Qwen2-7B; the shapes match exactly).
PARENTS = {"Qwen2-57B-A14B": "Qwen2-7B", "Qwen2-57B-A14B-Instruct": "Qwen2-7B-Instruct", "tiny-moe": "tiny"}
REINIT_MODES = ("element", "neuron")
PROJ = ("gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class Recipe:
    """The upcycling options; `resolve(dense)` fills the defaults that come from the dense config."""

    num_experts: int
    top_k: int
    expert_size: int
    shared_expert_size: int = 0
    reinit: float = 0.5
    reinit_mode: str = "element"
    reinit_std: float | None = None  # None: the dense config's initializer_range
    reinit_shared: bool = True
    router_std: float | None = None  # None: initializer_range
    norm_topk_prob: bool = False  # Qwen2-57B-A14B: false (SPEC 2.6)
    router_aux_loss_coef: float = 0.001
    seed: int = 0

    def resolve(self, dense: ModelConfig, source: str = "upcycle") -> Recipe:
        if dense.is_moe or dense.model_type != "qwen2":
            raise ValueError(
                f"{source}: model_type {dense.model_type!r} ({dense.num_experts} experts) is "
                f"not a dense Qwen2 model; upcycle a dense checkpoint (model_type 'qwen2')"
            )
        if dense.quantization:
            raise ValueError(f"{source}: config.json has 'quantization'; upcycle the float checkpoint")
        for name in ("num_experts", "top_k", "expert_size"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{source}: {name} must be a positive integer, got {getattr(self, name)!r}")
        if self.top_k > self.num_experts:
            raise ValueError(f"{source}: top_k {self.top_k} exceeds num_experts {self.num_experts}")
        if self.shared_expert_size < 0:
            raise ValueError(f"{source}: shared_expert_size must be >= 0, got {self.shared_expert_size}")
        if not 0.0 <= self.reinit <= 1.0:
            raise ValueError(f"{source}: reinit is a fraction in [0, 1], got {self.reinit}")
        if self.reinit_mode not in REINIT_MODES:
            raise ValueError(f"{source}: reinit_mode must be one of {REINIT_MODES}, got {self.reinit_mode!r}")
        std = dense.initializer_range
        out = dataclasses.replace(
            self,
            reinit_std=std if self.reinit_std is None else float(self.reinit_std),
            router_std=std if self.router_std is None else float(self.router_std),
        )
        if out.reinit_std < 0 or out.router_std < 0:
            raise ValueError(f"{source}: reinit_std and router_std must be >= 0")
        return out

    def copies(self, h_ffn: int) -> int:
        """ceil(n * h_E / h_FFN): dense FFN copies the routed experts are cut from (SPEC 5, step 1)."""
        return math.ceil(self.num_experts * self.expert_size / h_ffn)

    def shared_copies(self, h_ffn: int) -> int:
        return math.ceil(self.shared_expert_size / h_ffn)


def preset_recipe(name: str, **overrides) -> dict:
    """The MoE shape of a preset (e.g. Qwen2-57B-A14B) as `upcycle` keyword arguments."""
    key = name.removeprefix("Qwen/")
    moe = ModelConfig.preset(key)
    if not moe.is_moe:
        raise ValueError(
            f"preset {name!r} is dense; choose a MoE preset: "
            f"{', '.join(k for k, v in PRESETS.items() if v.get('num_experts'))}"
        )
    opts = dict(
        num_experts=moe.num_experts,
        top_k=moe.num_experts_per_tok,
        expert_size=moe.moe_intermediate_size,
        shared_expert_size=moe.shared_expert_intermediate_size,
        norm_topk_prob=moe.norm_topk_prob,
        router_aux_loss_coef=moe.router_aux_loss_coef,
    )
    return {**opts, **{k: v for k, v in overrides.items() if v is not None}}


def moe_config(dense: ModelConfig, recipe: Recipe, parent: str | None = None) -> ModelConfig:
    """The Qwen2-MoE config: the dense fields, every layer sparse, the recipe under extra['upcycling']."""
    h = dense.intermediate_size
    record = {
        "paper": "Qwen2 technical report 2.2.3",
        "parent": parent,
        "copies": recipe.copies(h),
        "shared_copies": recipe.shared_copies(h),
        "dropped_per_layer": recipe.copies(h) * h - recipe.num_experts * recipe.expert_size,
        "shared_expert_gate_init": "zeros",
        **{
            k: v
            for k, v in dataclasses.asdict(recipe).items()
            if k
            not in (
                "num_experts",
                "top_k",
                "expert_size",
                "shared_expert_size",
                "norm_topk_prob",
                "router_aux_loss_coef",
            )
        },
    }
    extra = {k: v for k, v in dense.extra.items() if k not in ("architectures", "upcycling")}
    return dense.replace(
        model_type="qwen2_moe",
        num_experts=recipe.num_experts,
        num_experts_per_tok=recipe.top_k,
        moe_intermediate_size=recipe.expert_size,
        shared_expert_intermediate_size=recipe.shared_expert_size,
        norm_topk_prob=recipe.norm_topk_prob,
        router_aux_loss_coef=recipe.router_aux_loss_coef,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        extra={**extra, "upcycling": record},
    )


def make_recipe(
    dense: ModelConfig,
    *,
    num_experts: int,
    top_k: int,
    expert_size: int,
    shared_experts: int = 0,
    shared_expert_size: int | None = None,
    source: str = "upcycle",
    **options,
) -> Recipe:
    """The Recipe of `upcycle`'s keywords; shared_expert_size overrides shared_experts * expert_size."""
    size = shared_experts * expert_size if shared_expert_size is None else shared_expert_size
    if shared_expert_size is not None and shared_experts and size != shared_experts * expert_size:
        raise ValueError(
            f"{source}: shared_expert_size {size} != shared_experts {shared_experts} x "
            f"expert_size {expert_size}; give one of the two"
        )
    return Recipe(
        num_experts=num_experts, top_k=top_k, expert_size=expert_size, shared_expert_size=size, **options
    ).resolve(dense, source)


# ---- one layer ----------------------------------------------------------------------------------
@dataclass
class LayerUpcycle:
    """One layer's MoE tensors (names relative to `mlp.`) and how they were made.

    index [n, h_E]: the dense intermediate neuron behind each expert neuron; perms [copies, h_FFN]:
    copy c's permutation (index = cat(perms)[:n*h_E]); shared_index / shared_perms likewise;
    reinit_masks: True where an entry of that tensor was re-drawn."""

    tensors: dict[str, torch.Tensor]
    index: torch.Tensor
    perms: torch.Tensor
    shared_index: torch.Tensor
    shared_perms: torch.Tensor
    reinit_masks: dict[str, torch.Tensor]


def layer_generator(seed: int, layer: int) -> torch.Generator:
    """Layer `layer`'s own random stream, so any layer can be reproduced alone."""
    return torch.Generator().manual_seed(int(np.random.SeedSequence([seed, layer]).generate_state(1)[0]))


def _cut(gate, up, down, perms: torch.Tensor, width: int, count: int):
    """Lay the permuted copies end to end and cut `count` slices of `width` neurons (rest dropped)."""
    index = perms.flatten()[: width * count].view(count, width)
    return index, [(gate[i], up[i], down[:, i]) for i in index]


def _reinit(tensors: dict, fraction: float, std: float, mode: str, g: torch.Generator) -> dict:
    """Re-draw `fraction` of each SwiGLU's entries from N(0, std^2) in place; returns the masks."""
    masks = {}
    if mode == "neuron":  # one draw per intermediate neuron: its gate row, up row and down column
        width = tensors["gate_proj"].shape[0]
        redraw = torch.rand(width, generator=g) < fraction
        masks = {"gate_proj": redraw[:, None], "up_proj": redraw[:, None], "down_proj": redraw[None, :]}
        masks = {k: m.expand_as(tensors[k]) for k, m in masks.items()}
    for name in PROJ:
        w = tensors[name]
        if mode == "element":
            masks[name] = torch.rand(w.shape, generator=g) < fraction
        fresh = torch.randn(w.shape, generator=g) * std
        tensors[name] = torch.where(masks[name], fresh.to(w.dtype), w)
    return masks


def upcycle_layer(
    gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor, recipe: Recipe, generator: torch.Generator
) -> LayerUpcycle:
    """The MoE block of one layer from its dense SwiGLU (gate/up [h_FFN, H], down [H, h_FFN])."""
    h_ffn, hidden = gate.shape
    g, dtype = generator, gate.dtype
    perms = torch.stack([torch.randperm(h_ffn, generator=g) for _ in range(recipe.copies(h_ffn))])
    fresh = [torch.randperm(h_ffn, generator=g) for _ in range(recipe.shared_copies(h_ffn))]
    shared_perms = torch.stack(fresh or [torch.empty(0, dtype=torch.long)])  # [0 or copies, h_FFN]
    router = (torch.randn(recipe.num_experts, hidden, generator=g) * recipe.router_std).to(dtype)
    index, slices = _cut(gate, up, down, perms, recipe.expert_size, recipe.num_experts)
    shared_index, (shared,) = _cut(gate, up, down, shared_perms, recipe.shared_expert_size, 1)
    tensors = {"gate.weight": router, "shared_expert_gate.weight": torch.zeros(1, hidden, dtype=dtype)}
    masks = {}
    parts = [(f"experts.{e}.", s, True) for e, s in enumerate(slices)]
    for prefix, mlp, reinit in parts + [("shared_expert.", shared, recipe.reinit_shared)]:
        named = dict(zip(PROJ, mlp, strict=True))  # index-gathered: copies, never views of the dense weights
        if reinit and recipe.reinit > 0:
            for k, m in _reinit(named, recipe.reinit, recipe.reinit_std, recipe.reinit_mode, g).items():
                masks[f"{prefix}{k}.weight"] = m
        tensors.update({f"{prefix}{k}.weight": v.contiguous() for k, v in named.items()})
    return LayerUpcycle(tensors, index, perms, shared_index[0], shared_perms, masks)


# ---- a whole model -----------------------------------------------------------------------------
def _dense_state(dense) -> tuple[ModelConfig, dict[str, torch.Tensor], str | None]:
    if isinstance(dense, (str, os.PathLike)):
        from qwen2.checkpoint import load_model

        model = load_model(dense, dtype=None, kernels=False)  # memory-mapped: no copy of the dense weights
        return model.config, model.state_dict(), str(dense)
    return dense.config, dense.state_dict(), None


def upcycle(
    dense,
    *,
    num_experts: int,
    top_k: int,
    expert_size: int,
    shared_experts: int = 0,
    shared_expert_size: int | None = None,
    reinit: float = 0.5,
    reinit_mode: str = "element",
    reinit_std: float | None = None,
    reinit_shared: bool = True,
    router_std: float | None = None,
    norm_topk_prob: bool = False,
    router_aux_loss_coef: float = 0.001,
    seed: int = 0,
) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """A dense Qwen2 (a model, or a checkpoint folder) -> (Qwen2-MoE config, its state dict in HF names).

    The options are the module docstring's; `Qwen2(config).load_state_dict(state, strict=True)` takes it.
    The copied tensors (attention, norms, embeddings) are the dense model's own, not copies.
    """
    dense_config, state, parent = _dense_state(dense)
    recipe = make_recipe(
        dense_config,
        num_experts=num_experts,
        top_k=top_k,
        expert_size=expert_size,
        shared_experts=shared_experts,
        shared_expert_size=shared_expert_size,
        reinit=reinit,
        reinit_mode=reinit_mode,
        reinit_std=reinit_std,
        reinit_shared=reinit_shared,
        router_std=router_std,
        norm_topk_prob=norm_topk_prob,
        router_aux_loss_coef=router_aux_loss_coef,
        seed=seed,
        source=f"{parent}/config.json" if parent else "upcycle",
    )
    config = moe_config(dense_config, recipe, parent=Path(parent).name if parent else None)
    out = {k: v for k, v in state.items() if ".mlp." not in k}  # attention, norms, embeddings, lm_head
    for i in range(dense_config.num_hidden_layers):
        p = f"model.layers.{i}.mlp."
        layer = upcycle_layer(
            state[p + "gate_proj.weight"],
            state[p + "up_proj.weight"],
            state[p + "down_proj.weight"],
            recipe,
            layer_generator(recipe.seed, i),
        )
        out.update({p + k: v for k, v in layer.tensors.items()})
    return config, out


def plan(dense: ModelConfig, recipe: Recipe) -> dict:
    """The shapes and counts an upcycling produces (no weights needed)."""
    moe = moe_config(dense, recipe)
    h, pc, pd, r = dense.intermediate_size, param_counts(moe), param_counts(dense), recipe
    neurons = r.num_experts * r.expert_size + (r.shared_expert_size if r.reinit_shared else 0)
    return {
        "dense_ffn": h,
        "hidden": dense.hidden_size,
        "layers": dense.num_hidden_layers,
        "experts": r.num_experts,
        "top_k": r.top_k,
        "expert_size": r.expert_size,
        "shared_expert_size": r.shared_expert_size,
        "copies": r.copies(h),
        "shared_copies": r.shared_copies(h),
        "dropped_per_layer": moe.extra["upcycling"]["dropped_per_layer"],
        "dense_params": pd.total,
        "moe_params": pc.total,
        "moe_active": pc.active,
        "reinit_params": round(r.reinit * 3 * dense.hidden_size * neurons * dense.num_hidden_layers),
        "config": moe,
    }


def format_plan(p: dict) -> str:
    lines = [
        f"dense FFN {p['dense_ffn']} x {p['layers']} layers (hidden {p['hidden']}) -> {p['experts']} experts "
        f"of {p['expert_size']}, top-{p['top_k']}, shared expert {p['shared_expert_size']}",
        f"copies per layer: ceil({p['experts']} * {p['expert_size']} / {p['dense_ffn']}) = {p['copies']} "
        f"({p['dropped_per_layer']} neurons dropped); shared expert from {p['shared_copies']} more",
        f"parameters: dense {p['dense_params'] / 1e9:.3f}B -> MoE {p['moe_params'] / 1e9:.3f}B total, "
        f"{p['moe_active'] / 1e9:.3f}B active per token; re-initialised {p['reinit_params'] / 1e9:.3f}B",
    ]
    return "\n".join(lines)


def upcycle_checkpoint(dense_dir: str | os.PathLike, out_dir: str | os.PathLike, **options) -> Path:
    """Read a dense checkpoint folder, write the upcycled Qwen2-MoE checkpoint (config.json with the
    recipe under "upcycling", safetensors, the dense folder's tokenizer and generation files) to
    `out_dir`, which must not exist or be empty. Written into a temporary folder beside it, renamed at
    the end: an interrupted run leaves nothing half-written."""
    from qwen2.checkpoint import copy_side_files, save_model
    from qwen2.model import Qwen2

    src, out = Path(dense_dir), Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"{out}: exists and is not empty; choose a new output directory")
    config, state = upcycle(src, **options)
    with torch.device("meta"):
        model = Qwen2(config)
    model.load_state_dict(state, strict=True, assign=True)
    with atomic_dir(out) as tmp:
        save_model(model, tmp)
        copy_side_files(src, tmp)
    return out
