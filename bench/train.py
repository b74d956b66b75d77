"""Training throughput: our loop vs transformers' Qwen2ForCausalLM with a plain PyTorch loop.

Same config, same weights, same batch, same run, fp32, on this machine's device (CUDA if present):
hidden 256, 4 layers (4 query heads, 2 KV heads, intermediate 1024, tied embeddings), the full
151,936-token vocabulary, sequence 512, batch 4. Both sides: AdamW, clip 1.0, one optimizer step per
batch. Ours is `Trainer.train_step` with `next_token_loss` (chunked fp32 cross-entropy over
`hidden_states` and `output_weight`); the reference is `model(input_ids).logits` -> fp32 cross-entropy
(full [B*T, V] logits). The two sides alternate in rounds so machine noise hits both. MFU uses
report.flops_per_token and report.peak_flops (a GPU's data sheet, or this CPU's measured fp32 GEMM).

    .venv/bin/python bench/train.py            # the full measurement (a few minutes on 2 CPU cores)
    .venv/bin/python bench/train.py --quick    # smoke run: seq 128, batch 2, one round of one step
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import hf_twin, table, timeit  # noqa: E402
from qwen2.config import ModelConfig  # noqa: E402
from qwen2.model import build_model  # noqa: E402
from qwen2.train.loop import TrainConfig, Trainer  # noqa: E402
from qwen2.train.objectives import next_token_loss  # noqa: E402
from qwen2.train.report import flops_per_token, peak_flops  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=3, help="timed steps per round and side")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=151936)
    ap.add_argument(
        "--quick", action="store_true", help="smoke run: --seq 128 --batch 2 --steps 1 --rounds 1"
    )
    a = ap.parse_args()
    if a.quick:
        a.seq, a.batch, a.steps, a.rounds = 128, 2, 1, 1

    cfg = ModelConfig(
        vocab_size=a.vocab,
        hidden_size=256,
        intermediate_size=1024,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
        max_position_embeddings=4096,
        torch_dtype="float32",
    )
    ours = build_model(cfg, seed=0)
    ref = hf_twin(ours).train()  # same weights (lm_head tied), built before Trainer moves ours to its device
    trainer = Trainer(
        ours, TrainConfig(lr=1e-4, warmup_steps=0, grad_clip=1.0), tempfile.mkdtemp(prefix="bench-train-")
    )
    device = trainer.device
    ref.to(device)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1)
    batch = torch.randint(0, a.vocab, (a.batch, a.seq + 1), generator=torch.Generator().manual_seed(0)).to(
        device
    )
    inputs, labels = batch[:, :-1], batch[:, 1:]

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    def step_ours():
        loss = trainer.train_step(next_token_loss, [batch], total_steps=10**6)["loss"]
        sync()
        return loss

    def step_ref():
        # the plain loop: full logits [B, T, V], upcast to fp32, cross-entropy on the same T targets
        logits = ref(input_ids=inputs).logits
        loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), labels.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(ref.parameters(), 1.0)
        ref_opt.step()
        ref_opt.zero_grad(set_to_none=True)
        sync()
        return loss.item()

    # The first steps allocate buffers and the optimizer state (not timed); both see the same weights,
    # so their first losses agree.
    print(f"first-step loss: ours {step_ours():.6f}  transformers {step_ref():.6f}")
    medians = {"ours": [], "transformers": []}
    for _ in range(a.rounds):
        for name, fn in (("ours", step_ours), ("transformers", step_ref)):
            medians[name].append(timeit(fn, warmup=0, repeat=a.steps))
    tokens, fpt, peak = a.batch * a.seq, flops_per_token(cfg, a.seq), peak_flops(device)
    threads = (
        f"{torch.get_num_threads()} threads" if device.type == "cpu" else torch.cuda.get_device_name(device)
    )
    print(
        f"config: hidden 256, 4 layers, vocab {a.vocab}, seq {a.seq}, batch {a.batch}, fp32, {device.type} "
        f"({threads}); {fpt / 1e6:.1f} MFLOP/token; peak {peak / 1e9:.0f} GFLOP/s"
    )
    rate = {name: tokens / statistics.median(m) for name, m in medians.items()}
    rows = [
        {
            "side": name,
            "tokens/s": f"{rate[name]:.0f}",
            "MFU": f"{100 * rate[name] * fpt / peak:.1f}%",
            "median step s": f"{tokens / rate[name]:.3f}",
        }
        for name in rate
    ]
    print(table(rows, ["side", "tokens/s", "MFU", "median step s"]))
    print(f"speed-up: {rate['ours'] / rate['transformers']:.2f}x  (target >= 1.3x)")
    print(
        "peak RSS of this process (both sides): "
        f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6:.2f} GB"
    )


if __name__ == "__main__":
    main()
