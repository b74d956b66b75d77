"""Training throughput: our loop vs transformers' Qwen2ForCausalLM with a plain PyTorch loop.

Same config, same batch, same run, fp32 on whatever device this is: hidden 256, 4 layers (4 query
heads, 2 KV heads, intermediate 1024, tied embeddings), the full 151,936-token vocabulary, sequence
512, batch 4. Both sides: AdamW, clip 1.0, one optimizer step per batch. Ours is `Trainer.train_step`
with `next_token_loss` (chunked fp32 cross-entropy over `hidden_states` and `output_weight`); the
reference is `model(input_ids).logits` -> fp32 cross-entropy (full [B*T, V] logits). The two sides alternate
in rounds so machine noise hits both.

    .venv/bin/python bench/train.py [--steps 3] [--rounds 2] [--seq 512] [--batch 4] [--vocab 151936]
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time

import torch


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=3, help="timed steps per round and side")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=151936)
    a = ap.parse_args()

    from transformers import Qwen2Config, Qwen2ForCausalLM

    from qwen2.config import ModelConfig
    from qwen2.model import build_model
    from qwen2.train.loop import TrainConfig, Trainer
    from qwen2.train.objectives import next_token_loss
    from qwen2.train.report import flops_per_token, peak_flops

    cfg = ModelConfig(vocab_size=a.vocab, hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                      max_position_embeddings=4096, torch_dtype="float32")
    torch.manual_seed(0)
    batch = torch.randint(0, a.vocab, (a.batch, a.seq + 1))

    ours = build_model(cfg, seed=0)
    trainer = Trainer(ours, TrainConfig(lr=1e-4, warmup_steps=0, grad_clip=1.0), tempfile.mkdtemp(prefix="bench-train-"))

    hf_cfg = Qwen2Config(**{k: v for k, v in cfg.to_dict().items() if k not in ("architectures", "torch_dtype")})
    hf_cfg._attn_implementation = "sdpa"
    ref = Qwen2ForCausalLM(hf_cfg).float()
    ref.load_state_dict(ours.state_dict(), strict=False)  # same weights (lm_head is tied)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1)
    inputs, labels = batch[:, :-1], batch[:, 1:]

    def step_ours():
        return trainer.train_step(next_token_loss, [batch], total_steps=10**6)["loss"]

    def step_ref():
        # the plain loop: full logits [B, T, V], upcast to fp32, cross-entropy on the same T targets
        logits = ref(input_ids=inputs).logits
        loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), labels.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(ref.parameters(), 1.0)
        ref_opt.step()
        ref_opt.zero_grad(set_to_none=True)
        return loss.item()

    # The first steps allocate buffers and the optimizer state: not timed. Also checks both compute
    # the same loss on the same weights.
    l_ours, l_ref = step_ours(), step_ref()
    print(f"first-step loss: ours {l_ours:.6f}  transformers {l_ref:.6f}")
    times = {"ours": [], "transformers": []}
    for _ in range(a.rounds):
        for name, fn in (("ours", step_ours), ("transformers", step_ref)):
            for _ in range(a.steps):
                t = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t)
    tokens = a.batch * a.seq
    fpt = flops_per_token(cfg, a.seq)
    peak = peak_flops("cpu")
    print(f"config: hidden 256, 4 layers, vocab {a.vocab}, seq {a.seq}, batch {a.batch}, fp32, "
          f"{torch.get_num_threads()} threads; {fpt / 1e6:.1f} MFLOP/token; peak (1024^3 fp32 GEMM) {peak / 1e9:.0f} GFLOP/s")
    print(f"{'':14s}{'tokens/s':>10s}{'MFU':>8s}{'median step s':>15s}")
    rate = {}
    for name, ts in times.items():
        med = sorted(ts)[len(ts) // 2]
        rate[name] = tokens / med
        print(f"{name:14s}{rate[name]:10.0f}{100 * rate[name] * fpt / peak:7.1f}%{med:15.2f}")
    print(f"speed-up: {rate['ours'] / rate['transformers']:.2f}x  (target >= 1.3x)")
    print(f"peak RSS of this process (both sides): {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6:.2f} GB")


if __name__ == "__main__":
    main()
