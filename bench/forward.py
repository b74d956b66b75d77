"""Prefill throughput of our Qwen2 vs transformers, and our MoE block vs transformers' MoE block.

Same run, same weights, same inputs; printed as ratios (ours / transformers, > 1 means faster).
    python bench/forward.py [--tokens 512] [--repeat 3]
Model: random weights at the real Qwen2-0.5B shape. MoE: one Qwen2-57B-A14B layer (64 experts,
top-8, shared expert 8x wide), hidden and expert widths scaled down so it fits this machine.
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


def moe_pair(dtype, experts_impl: str):
    import transformers
    from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock

    config = ModelConfig.preset("Qwen2-57B-A14B").replace(
        hidden_size=1024,
        num_attention_heads=8,
        num_key_value_heads=2,
        moe_intermediate_size=640,
        shared_expert_intermediate_size=8 * 640,
    )
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


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    rows = bench_prefill(args.tokens, args.repeat) + bench_moe(args.repeat)
    print(table(rows, ["what", "dtype", "ours tok/s", "transformers tok/s", "ratio"]))


if __name__ == "__main__":
    main()
