"""The effect of YaRN and Dual Chunk Attention on a trained model (paper 2.2.2 / 5.2): held-out loss by
position at 4x, 8x and 16x the length the model was trained at, for four ways to run the same weights:

- plain RoPE: positions beyond training as they come;
- static YaRN: rope_scaling {"type": "yarn", "factor": L / L0, "original_max_position_embeddings": L0},
  the factor chosen for each evaluated length L (as a user would configure it for that context);
- dynamic YaRN: the same with "dynamic": true and factor 16 (the factor follows the current length);
- YaRN + DCA: config.with_dual_chunk_attention (chunk 3 L0 / 4, local L0 / 16, YaRN's temperature),
  as `qwen2 generate --dual-chunk-attention` adds it.
L0 = the length the model was trained at: the speedrun recipe's long_seq_len (1,024; the exported
config.json says 4,096, the context the model is offered at, not the one it saw).

Documents: the speedrun's held-out split (the same shards and seed as training), the rows cut from its
documents of at least L + 1 tokens; where fewer than --rows such documents exist, the longest held-out
documents are packed (separated by <|endoftext|>) and the output says so. The paper's claim: plain RoPE
degrades past L0 while YaRN + DCA keeps the loss flat.

    .venv/bin/python bench/long_context_effect.py [--run runs/speedrun] [--factors 4,8,16] [--rows 8]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from qwen2.checkpoint import load_model  # noqa: E402
from qwen2.train import recipes  # noqa: E402
from qwen2.train.objectives import token_losses  # noqa: E402
from qwen2.train.stages import VARIANTS, position_variant  # noqa: E402


def held_out_rows(run: Path, length: int, rows: int) -> tuple[torch.Tensor, str]:
    from qwen2.data import PackedLoader
    from qwen2.tokenizer import load_tokenizer
    from qwen2.train.pretrain import corpus_files, prepare_data

    cfg = recipes.speedrun(out=str(run))
    tok = load_tokenizer(run / "model")
    _, val = prepare_data(cfg, tok, run, corpus_files(cfg))
    long_docs = val.select(min_tokens=length + 1)
    if len(long_docs) >= rows:
        docs = [torch.as_tensor(long_docs[i][: length + 1].astype("int64")) for i in range(rows)]
        return torch.stack(docs), f"{rows} held-out documents of {length + 1}+ tokens"
    pool = val.select(min_tokens=min(length // 4, 2048))
    batch = next(PackedLoader(pool if len(pool) else val, length, rows, seed=0, shuffle=False))["input_ids"]
    return batch[:, : length + 1], f"packed held-out documents ({len(long_docs)} have {length + 1}+ tokens)"


@torch.no_grad()
def losses_by_position(model, rows: torch.Tensor, bins: int) -> list[float]:
    losses = torch.cat([token_losses(model, r[None, :-1], r[None, 1:]) for r in rows]).mean(0)  # [T]
    width = losses.numel() // bins
    return [float(losses[i * width : (i + 1) * width].mean()) for i in range(bins)]


def plot(results: dict, l0: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths = sorted(int(x) for x in results)
    fig, axes = plt.subplots(1, len(lengths), figsize=(4.6 * len(lengths), 3.8), sharey=True)
    for ax, length in zip(axes if len(lengths) > 1 else [axes], lengths):
        r = results[str(length)]
        for name in VARIANTS:
            ax.plot(r["positions"], r["loss"][name], label=name, lw=1.4)
        ax.axvline(l0, color="k", ls="--", lw=0.8)
        ax.set_title(f"{length:,} tokens ({length // l0}x the trained {l0:,})")
        ax.set_xlabel("position")
        ax.grid(alpha=0.3)
    (axes[0] if len(lengths) > 1 else axes).set_ylabel("held-out loss (nats)")
    (axes[0] if len(lengths) > 1 else axes).legend()
    fig.suptitle("Loss by position beyond the training length: the speedrun model, four position schemes")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"plot: {path}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", default="runs/speedrun", help="a speedrun folder (its model/ and data/)")
    ap.add_argument("--factors", default="4,8,16", help="lengths as multiples of the trained length")
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--trained-length", type=int, default=None, help="default: the recipe's long_seq_len")
    ap.add_argument("--bins", type=int, default=32)
    ap.add_argument("--out", default=str(ROOT / "docs"), help="folder for long_context_effect.{png,json}")
    args = ap.parse_args()
    run = Path(args.run)
    base = load_model(run / "model", dtype=torch.float32, kernels=False)
    l0 = args.trained_length or recipes.speedrun(out=str(run)).long_seq_len
    results = {}
    for f in (int(x) for x in args.factors.split(",")):
        length = f * l0
        rows, source = held_out_rows(run, length, args.rows)
        r = {"source": source, "loss": {}, "mean_beyond_l0": {}}
        for name in VARIANTS:
            losses = losses_by_position(position_variant(base, name, length, l0), rows, args.bins)
            r["loss"][name] = losses
            beyond = [x for i, x in enumerate(losses) if (i + 0.5) * length / args.bins > l0]
            r["mean_beyond_l0"][name] = sum(beyond) / len(beyond)
            print(
                f"{length:>6} tokens  {name:<13} mean loss {sum(losses) / len(losses):.3f}, "
                f"beyond {l0}: {r['mean_beyond_l0'][name]:.3f}   ({source})",
                flush=True,
            )
        r["positions"] = [(i + 0.5) * length / args.bins for i in range(args.bins)]
        results[str(length)] = r
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "long_context_effect.json").write_text(json.dumps(results, indent=1))
    plot(results, l0, out / "long_context_effect.png")


if __name__ == "__main__":
    main()
