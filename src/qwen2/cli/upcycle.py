"""`qwen2 upcycle`: a dense Qwen2 checkpoint -> a Qwen2-MoE checkpoint (paper 2.2.3; qwen2.train.upcycle).

    qwen2 upcycle --model DENSE --out MOE --num-experts 16 --top-k 4 --expert-size 64 --shared-experts 4
    qwen2 upcycle --preset Qwen2-57B-A14B            # the plan from Qwen2-7B's shapes, no weights needed
    qwen2 upcycle --preset Qwen2-57B-A14B --model Qwen2-7B --out Qwen2-57B-A14B-init
Without --out only the plan (shapes, copies, parameter counts) is printed.
"""

from __future__ import annotations


def add_parser(sub):
    p = sub.add_parser("upcycle", help="dense checkpoint -> Qwen2-MoE (copy, shuffle, slice, re-init)")
    arg = p.add_argument
    arg(
        "--model",
        default=None,
        help="dense checkpoint directory (omitted with --preset: the plan from the preset's dense parent)",
    )
    arg("--out", default=None, help="new directory for the MoE checkpoint (omitted: print the plan)")
    arg("--preset", default=None, help="take the MoE shape from a preset, e.g. Qwen2-57B-A14B")
    arg("--num-experts", type=int, default=None, help="routed experts n")
    arg("--top-k", type=int, default=None, help="experts per token")
    arg("--expert-size", type=int, default=None, help="intermediate size h_E of one expert")
    arg("--shared-experts", type=int, default=None, help="shared experts, fused in one MLP (default 0)")
    arg("--shared-expert-size", type=int, default=None, help="the fused shared MLP's size (instead)")
    arg("--reinit", type=float, default=0.5, help="fraction of each expert re-initialised (paper: 0.5)")
    arg(
        "--reinit-mode",
        default="element",
        choices=["element", "neuron"],
        help="re-draw single entries (default) or whole intermediate neurons",
    )
    arg("--reinit-std", type=float, default=None, help="std of re-drawn entries (default: initializer_range)")
    arg("--router-std", type=float, default=None, help="std of the router init (default: initializer_range)")
    arg("--norm-topk-prob", action="store_true", default=None, help="renormalise the top-k weights")
    arg("--seed", type=int, default=0)
    p.set_defaults(func=run_upcycle)


def run_upcycle(a) -> int:
    from pathlib import Path

    from qwen2.config import ModelConfig
    from qwen2.train import upcycle as up

    shape = dict(
        num_experts=a.num_experts,
        top_k=a.top_k,
        expert_size=a.expert_size,
        shared_expert_size=a.shared_expert_size,
        norm_topk_prob=a.norm_topk_prob,
    )
    if a.preset:
        shape = up.preset_recipe(a.preset, **shape)
        if a.shared_experts is not None:
            shape["shared_expert_size"] = a.shared_experts * shape["expert_size"]
    else:
        needed = ("num_experts", "top_k", "expert_size")
        missing = [f"--{k.replace('_', '-')}" for k in needed if shape[k] is None]
        if missing:
            raise ValueError(f"give {', '.join(missing)} (or --preset NAME, e.g. Qwen2-57B-A14B)")
        shape = {k: v for k, v in shape.items() if v is not None}
        shape["shared_experts"] = a.shared_experts or 0
    options = dict(
        shape,
        reinit=a.reinit,
        reinit_mode=a.reinit_mode,
        reinit_std=a.reinit_std,
        router_std=a.router_std,
        seed=a.seed,
    )
    if a.model is None:
        if a.out or not a.preset:
            raise ValueError("give --model DENSE_DIR (only --preset alone prints a plan without weights)")
        parent = up.PARENTS.get(a.preset.removeprefix("Qwen/"))
        if parent is None:
            raise ValueError(f"preset {a.preset!r} has no known dense parent; give --model DENSE_DIR")
        dense, where = ModelConfig.preset(parent), f"preset {parent}"
    else:
        dense, where = ModelConfig.from_json(Path(a.model) / "config.json"), a.model
    recipe = up.make_recipe(dense, source=where, **options)
    print(f"upcycling {where}:")
    print(up.format_plan(up.plan(dense, recipe)))
    if a.out is None:
        return 0
    out = up.upcycle_checkpoint(a.model, a.out, **options)
    size = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    print(f"wrote {out}: {size / 1e6:.1f} MB of safetensors")
    return 0
