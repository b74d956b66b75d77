"""Prefill throughput of our Qwen2 vs transformers, our MoE block vs transformers' MoE block, and our
grouped MoE layer (kernels/moe.py) against this machine's measured matmul peak and memory bandwidth.

Same run, same weights, same inputs; printed as ratios (ours / transformers, > 1 means faster).
    python bench/forward.py [--tokens 512] [--repeat 3] [--only prefill,moe,grouped]
Model: random weights at the real Qwen2-0.5B shape. MoE: one Qwen2-57B-A14B layer (64 experts,
top-8, shared expert 8x wide), hidden and expert widths scaled down so it fits this machine.

The grouped rows time the installed block (forward, and forward + backward with the input's and every
weight's gradient) at 1, 64, 512 and 4096 tokens, as GFLOP/s and as a fraction of the peak: the best of a
few 2048^3 matmuls of the same dtype, timed in the same run. At 1 token the layer is memory-bound, so it
is also given as a fraction of the bandwidth roofline: the bytes of the weights one token reads (its top-k
experts, the shared expert, the router) over the measured read bandwidth (a 1 GiB sum). Above 1 token it
is also given against the expert-shape peak: the same matrix products as plain torch.mm calls with even
routing, timed in the same run (`expert_shape_peak`: each expert sees only T*k/E rows).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import hf_twin, table, timeit  # noqa: E402
from qwen2.config import ModelConfig  # noqa: E402
from qwen2.kernels import install  # noqa: E402
from qwen2.model import SparseMoeBlock, build_model  # noqa: E402

GROUPED_TOKENS = (1, 64, 512, 4096)


def bench_prefill(tokens: int, repeat: int) -> list[dict]:
    rows = []
    config = ModelConfig.preset("Qwen2-0.5B")
    for dtype in (torch.float32, torch.bfloat16):
        model = install(build_model(config, dtype=dtype).eval())  # the kernels, as load_model gives them
        hf = hf_twin(model)
        x = torch.randint(0, config.vocab_size, (1, tokens), generator=torch.Generator().manual_seed(0))
        with (
            torch.inference_mode()
        ):  # the sides take turns, each keeping its best: load and order hit both alike
            ours, ref = float("inf"), float("inf")
            for _ in range(repeat):
                ours = min(ours, timeit(lambda m=model: m(x), repeat=1))
                ref = min(ref, timeit(lambda h=hf: h(x, use_cache=False).logits, repeat=1))
        rows.append(
            {
                "what": f"prefill 0.5B, {tokens} tok",
                "dtype": str(dtype)[6:],
                "ours tok/s": f"{tokens / ours:.0f}",
                "transformers tok/s": f"{tokens / ref:.0f}",
                "ratio": f"{ref / ours:.2f}x",
            }
        )
        del model, hf
    return rows


def moe_config() -> ModelConfig:
    return ModelConfig.preset("Qwen2-57B-A14B").replace(
        hidden_size=1024,
        num_attention_heads=8,
        num_key_value_heads=2,
        moe_intermediate_size=640,
        shared_expert_intermediate_size=8 * 640,
    )


def moe_pair(dtype, experts_impl: str):
    import transformers
    from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock

    config = moe_config()
    torch.manual_seed(0)
    hc = transformers.Qwen2MoeConfig(**config.to_dict())
    hc._experts_implementation = experts_impl
    hf = Qwen2MoeSparseMoeBlock(hc)
    for p in hf.parameters():
        torch.nn.init.normal_(p, 0, 0.02)
    ours = install(SparseMoeBlock(config))  # the decode kernels for the chosen experts, as in a loaded model
    sd, inter = hf.state_dict(), config.moe_intermediate_size
    mine = {k: v for k, v in sd.items() if not k.startswith("experts.")}
    for e in range(
        config.num_experts
    ):  # transformers 5 fuses the experts in memory; the files keep them apart
        mine[f"experts.{e}.gate_proj.weight"] = sd["experts.gate_up_proj"][e, :inter]
        mine[f"experts.{e}.up_proj.weight"] = sd["experts.gate_up_proj"][e, inter:]
        mine[f"experts.{e}.down_proj.weight"] = sd["experts.down_proj"][e]
    ours.load_state_dict(mine)
    return ours.to(dtype).eval(), hf.to(dtype).eval(), config


def bench_moe(repeat: int) -> list[dict]:
    rows = []
    # transformers 5 picks "grouped_mm" (torch._grouped_mm) when it can dispatch, else "eager"
    # (a loop over the experts that received tokens); we time both.
    for dtype in (torch.float32, torch.bfloat16):
        for impl in ("eager", "grouped_mm"):
            ours, hf, config = moe_pair(dtype, impl)
            for t in (1, 64, 512):
                x = torch.randn(1, t, config.hidden_size, dtype=dtype)
                with torch.inference_mode():
                    assert torch.allclose(
                        ours(x).float(), hf(x).float(), atol=5e-2 if dtype == torch.bfloat16 else 1e-5
                    )
                    a = timeit(lambda: ours(x), repeat=repeat + 2)
                    b = timeit(lambda: hf(x), repeat=repeat + 2)
                rows.append(
                    {
                        "what": f"MoE block, {t} tok, vs {impl}",
                        "dtype": str(dtype)[6:],
                        "ours tok/s": f"{t / a:.0f}",
                        "transformers tok/s": f"{t / b:.0f}",
                        "ratio": f"{b / a:.2f}x",
                    }
                )
    return rows


def matmul_peak(dtype, n: int = 2048, tries: int = 5) -> float:
    """GFLOP/s of the best of `tries` n^3 matmuls: the machine's practical peak for this dtype."""
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    a @ b
    best = min(timeit(lambda: a @ b, warmup=0, repeat=1) for _ in range(tries))
    return 2 * n**3 / best / 1e9


def read_bandwidth(gib: float = 1.0, tries: int = 5) -> float:
    """GB/s of the best of `tries` sums over a `gib` GiB fp32 tensor (a read-only stream)."""
    x = torch.ones(int(gib * 2**30) // 4)
    best = min(timeit(lambda: x.sum(), repeat=1) for _ in range(tries))
    return x.numel() * 4 / best / 1e9


def moe_layer_flops(config: ModelConfig, tokens: int) -> int:
    """Forward FLOPs of one MoE layer: router, shared expert and its gate, top-k experts (2 per MAC)."""
    h = config.hidden_size
    per_token = (
        h * config.num_experts
        + 3 * h * config.shared_expert_intermediate_size
        + h
        + config.num_experts_per_tok * 3 * h * config.moe_intermediate_size
    )
    return 2 * per_token * tokens


def moe_token_bytes(config: ModelConfig, itemsize: int) -> int:
    """Weight bytes one token reads: its top-k experts, the shared expert and its gate, the router."""
    h = config.hidden_size
    n = (
        config.num_experts_per_tok * 3 * h * config.moe_intermediate_size
        + 3 * h * config.shared_expert_intermediate_size
        + h * (config.num_experts + 1)
    )
    return n * itemsize


def expert_shape_peak(config: ModelConfig, tokens: int, dtype, tries: int = 3) -> float:
    """GFLOP/s of the layer's own matrix products alone, routing perfectly even: one [T*k/E, H] row block
    through each expert's gate+up and down, and the shared expert over all T rows, as plain torch.mm.
    The 2048^3 peak is out of reach for a layer whose experts see T*k/E rows each (64 at 512 tokens):
    this is what torch's GEMM gives at those shapes, the ceiling the grouped layer is judged against."""
    h, e, inter = config.hidden_size, config.num_experts, config.moe_intermediate_size
    shared = config.shared_expert_intermediate_size
    rows = max(1, tokens * config.num_experts_per_tok // e)
    w13, w2 = torch.randn(e, 2 * inter, h).to(dtype), torch.randn(e, h, inter).to(dtype)
    s13, s2 = torch.randn(2 * shared, h).to(dtype), torch.randn(h, shared).to(dtype)
    xe, he = torch.randn(rows, h).to(dtype), torch.randn(rows, inter).to(dtype)
    xs, hs = torch.randn(tokens, h).to(dtype), torch.randn(tokens, shared).to(dtype)

    def products():
        for i in range(e):
            torch.mm(xe, w13[i].T), torch.mm(he, w2[i].T)
        torch.mm(xs, s13.T), torch.mm(hs, s2.T)

    products()
    best = min(timeit(products, warmup=0, repeat=1) for _ in range(tries))
    return 2 * 3 * h * (e * rows * inter + tokens * shared) / best / 1e9


def bench_grouped(repeat: int) -> list[dict]:
    """Our installed (grouped) MoE layer against the measured peak; the plain model.py block for scale."""
    import copy

    from qwen2.kernels import uninstall

    rows, raw = [], []
    config = moe_config()
    # Other work on the machine slows a sample only while it runs: the peak and the bandwidth are
    # re-measured beside every sample and, like the samples, keep their best.
    bandwidth = read_bandwidth()
    peaks = {}
    for dtype in (torch.float32, torch.bfloat16):
        peaks[dtype] = matmul_peak(dtype)
        torch.manual_seed(0)
        plain = SparseMoeBlock(config)
        for p in plain.parameters():
            torch.nn.init.normal_(p, 0, 0.02)
        plain = plain.to(dtype)
        ours = install(copy.deepcopy(plain))
        uninstall(plain)
        params = list(ours.parameters()) + list(plain.parameters())
        for t in GROUPED_TOKENS:
            x = torch.randn(1, t, config.hidden_size, dtype=dtype)
            xg = x.clone().requires_grad_()
            dy = torch.randn_like(x)

            def step(m):
                for p in params:
                    p.grad = None
                xg.grad = None
                m(xg).backward(dy)

            reps = repeat + 2 if t <= 512 else max(2, repeat - 1)
            for what, flops, run in (
                ("fwd", moe_layer_flops(config, t), lambda m: m(x)),
                ("fwd+bwd", 3 * moe_layer_flops(config, t), step),
            ):
                grad = what != "fwd"
                a = b = float("inf")
                with torch.set_grad_enabled(grad), torch.inference_mode(not grad):
                    run(ours), run(plain)  # warm-up (and the fused weights built)
                for _ in range(reps):
                    peaks[dtype] = max(peaks[dtype], matmul_peak(dtype, tries=1))
                    if t == 1:
                        bandwidth = max(bandwidth, read_bandwidth(tries=1))
                    with torch.set_grad_enabled(grad), torch.inference_mode(not grad):
                        a = min(a, timeit(lambda: run(ours), warmup=0, repeat=1))
                        b = min(b, timeit(lambda: run(plain), warmup=0, repeat=1))
                ceiling = expert_shape_peak(config, t, dtype) if t > 1 else None
                raw.append((dtype, t, what, flops, a, b, moe_token_bytes(config, x.element_size()), ceiling))
    print(f"read bandwidth {bandwidth:.1f} GB/s (1 GiB fp32 sum, best of the run)")
    for dtype, peak in peaks.items():
        print(f"{str(dtype)[6:]} matmul peak {peak:.0f} GFLOP/s (2048^3, best of the run)")
    # fractions of the run's best peak: conservative
    for dtype, t, what, flops, a, b, token_bytes, ceiling in raw:
        gflops = flops / a / 1e9
        rows.append(
            {
                "what": f"grouped MoE layer, {t} tok, {what}",
                "dtype": str(dtype)[6:],
                "ms": f"{a * 1e3:.2f}",
                "tok/s": f"{t / a:.0f}",
                "GFLOP/s": f"{gflops:.1f}",
                "% matmul peak": f"{gflops / peaks[dtype]:.0%}",
                "% expert-shape peak": f"{gflops / ceiling:.0%}" if ceiling else "",
                "% bandwidth roofline": f"{token_bytes / bandwidth / 1e9 / a:.0%}" if t == 1 else "",
                "vs model.py block": f"{b / a:.2f}x",
            }
        )
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--only", default="prefill,moe,grouped", help="comma-separated sections to run")
    args = ap.parse_args()
    only = set(args.only.split(","))
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    rows = (bench_prefill(args.tokens, args.repeat) if "prefill" in only else []) + (
        bench_moe(args.repeat) if "moe" in only else []
    )
    if rows:
        print(table(rows, ["what", "dtype", "ours tok/s", "transformers tok/s", "ratio"]))
    if "grouped" in only:
        cols = ["what", "dtype", "ms", "tok/s", "GFLOP/s", "% matmul peak", "% expert-shape peak"]
        cols.append("% bandwidth roofline")
        print(table(bench_grouped(args.repeat), [*cols, "vs model.py block"]))


if __name__ == "__main__":
    main()
