"""Passkey retrieval beyond the trained length (paper 2.2.2 / 5.2): a model that retrieves within the
length it was trained at, run at 1x-16x that length with plain RoPE, static YaRN, dynamic YaRN and YaRN +
Dual Chunk Attention, as needle-in-a-haystack heat maps.

The speedrun's base model does not retrieve at all (0% at its own length: docs/speedrun_recipe.md), so
its heat maps cannot show what DCA changes. This bench trains a model that does: a small Qwen2 (the real
vocabulary and tokenizer; RoPE base --rope-theta, 1e4 as the paper's models before their long stage) on
data.tasks' passkey problems only, at up to --trained-length tokens (the key's depth and the haystack's
length drawn per example, the loss on the answer's tokens), until it retrieves. Then stages.passkey_grid,
the speedrun's needle stage, scores the saved checkpoint at each length x depth for each variant
(stages.position_variant: the same weights under each position scheme), greedy, and
stages.plot_passkey_grid draws the heat maps. The paper's claim: retrieval holds beyond the trained
length with YaRN + DCA, where plain RoPE fails.

    .venv/bin/python bench/passkey_dca.py [--trained-length 256] [--factors 1,2,4,8,16] [--steps 600]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from qwen2.checkpoint import save_model  # noqa: E402
from qwen2.config import ModelConfig  # noqa: E402
from qwen2.data import tasks  # noqa: E402
from qwen2.model import build_model  # noqa: E402
from qwen2.tokenizer.bpe import load_tokenizer  # noqa: E402
from qwen2.tokenizer.save import save_tokenizer  # noqa: E402
from qwen2.train.losses import IGNORE_INDEX, linear_cross_entropy  # noqa: E402
from qwen2.train.stages import VARIANTS, passkey_grid, plot_passkey_grid  # noqa: E402


def example(tok, rng: random.Random, paragraphs: int) -> tuple[list[int], list[int]]:
    """(ids, labels) of one passkey problem in passkey_grid's form: `paragraphs` of filler with the key
    sentence at a random paragraph boundary; labels only on the answer (" KEY\\n")."""
    key, before = str(rng.randint(10000, 99999)), rng.randint(0, paragraphs)
    text = tasks.FILLER * before + f"The pass key is {key}. " + tasks.FILLER * (paragraphs - before)
    prompt = tok.encode(tasks.prompt_text({"question": text + "What is the pass key?"}))
    answer = tok.encode(f" {key}\n")
    ids = prompt + answer
    return ids[:-1], [IGNORE_INDEX] * (len(prompt) - 1) + answer


def batch(tok, rng: random.Random, rows: int, max_paragraphs: int, pad: int):
    pairs = [example(tok, rng, rng.randint(1, max_paragraphs)) for _ in range(rows)]
    t = max(len(ids) for ids, _ in pairs)
    ids = torch.tensor([x + [pad] * (t - len(x)) for x, _ in pairs])  # right padding: causal, never read
    labels = torch.tensor([y + [IGNORE_INDEX] * (t - len(y)) for _, y in pairs])
    return ids, labels


def train(tok, l0: int, steps: int, rows: int, lr: float, seed: int, rope_theta: float):
    config = ModelConfig(
        hidden_size=128,  # two layers: retrieval needs a previous-token head and an induction head
        intermediate_size=384,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=l0,
        rope_theta=rope_theta,
        tie_word_embeddings=True,
        torch_dtype="float32",
    )
    model = build_model(config, seed=seed).train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0, betas=(0.9, 0.95))
    para = len(tok.encode(tasks.FILLER))
    max_paragraphs = max(1, (l0 - 40) // para)  # the key sentence, question and answer: ~40 tokens
    rng, t0, recent = random.Random(seed), time.perf_counter(), []
    for step in range(steps):
        for g in opt.param_groups:  # warm-up, then constant, then a linear decay over the last fifth
            g["lr"] = lr * min(1.0, (step + 1) / 100, 5 * (steps - step) / steps)
        ids, labels = batch(tok, rng, rows, max_paragraphs, tok.endoftext_id)
        keep = labels != IGNORE_INDEX  # only the answer's rows through the 151,936-wide output layer
        loss = linear_cross_entropy(model.hidden_states(ids)[keep], model.output_weight, labels[keep])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        recent = (recent + [loss.item()])[-50:]
        if step % 100 == 0 or step == steps - 1:
            mean = sum(recent) / len(recent)
            print(f"  step {step:>5}: answer loss {mean:.3f} ({time.perf_counter() - t0:.0f}s)", flush=True)
    return model.eval()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trained-length", type=int, default=256, help="L0: the longest training example")
    ap.add_argument("--factors", default="1,2,4,8,16", help="evaluated lengths as multiples of L0")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--rows", type=int, default=16, help="examples per step")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--trials", type=int, default=4, help="keys per (length, depth) cell")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--rope-theta", type=float, default=1e4, help="RoPE base (Qwen2 before its long stage: 1e4)"
    )
    ap.add_argument("--out", default=str(ROOT / "docs"), help="folder for passkey_dca.{png,json}")
    ap.add_argument("--name", default="passkey_dca", help="the output files' stem")
    args = ap.parse_args()
    l0 = args.trained_length
    tok = load_tokenizer("Qwen2")
    print(f"training a passkey retriever at up to {l0} tokens, {args.steps} steps of {args.rows}", flush=True)
    t0 = time.perf_counter()
    model = train(tok, l0, args.steps, args.rows, args.lr, args.seed, args.rope_theta)
    minutes = (time.perf_counter() - t0) / 60
    lengths = [int(f) * l0 for f in args.factors.split(",")]
    with tempfile.TemporaryDirectory(prefix="passkey-dca-") as tmp:
        ckpt = save_model(model, Path(tmp) / "model")
        save_tokenizer(tok, ckpt)
        grid = passkey_grid(ckpt, l0, lengths, trials=args.trials, variants=VARIANTS, seed=args.seed + 1)
    grid["train"] = {
        "steps": args.steps,
        "rows": args.rows,
        "rope_theta": args.rope_theta,
        "minutes": round(minutes, 1),
    }
    print(f"trained in {minutes:.1f} min; accuracy over depths (rows: variant, columns: length)")
    print(f"{'':<14}" + "".join(f"{n:>8}" for n in lengths))
    for name, acc in grid["accuracy"].items():
        by_length = [
            sum(v for k, v in acc.items() if int(k.split("/")[0]) == n) / len(grid["depths"]) for n in lengths
        ]
        print(f"{name:<14}" + "".join(f"{a:>8.0%}" for a in by_length))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.name}.json").write_text(json.dumps(grid, indent=1))
    print(f"plot: {plot_passkey_grid(grid, out / f'{args.name}.png')}")


if __name__ == "__main__":
    main()
