"""Upcycling vs training from scratch at small scale (paper 2.2.3: upcycling converges faster).

On the Python standard library (the speedrun's corpus, 2 MB, a 4k-id BPE trained here, both cached in
--out): a dense Qwen2 parent (hidden 128, 4 layers, FFN 384) is pre-trained for --pretrain-steps, then
three models continue for --steps on the same batches (the loader resumes where pre-training stopped)
with the same schedule (AdamW, warmup, cosine):
  (a) the dense parent itself;
  (b) its upcycled MoE (qwen2.train.upcycle: 16 experts of 48, top-4, a shared expert of 4 x 48 = 192,
      2 shuffled copies, 50% element-wise re-init): 4 x 48 + 192 = 384 FFN neurons per token, the dense
      FFN's width, so the same active parameters per token besides the 16-wide router;
  (c) the same MoE shape from random init (init_weights).
The MoE objective is next_token_loss (cross-entropy + router_aux_loss_coef x load-balancing loss); the
curves show the cross-entropy. Writes OUT/upcycle.png and OUT/upcycle.json, prints a table.

    .venv/bin/python bench/upcycle.py            # ~7 minutes on 2 CPU cores
    .venv/bin/python bench/upcycle.py --quick    # smoke run: 20 + 10 steps
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import table  # noqa: E402
from qwen2.config import ModelConfig, param_counts  # noqa: E402
from qwen2.data import PackedLoader  # noqa: E402
from qwen2.files import atomic_write_text  # noqa: E402
from qwen2.model import Qwen2, build_model  # noqa: E402
from qwen2.train import TrainConfig, Trainer, next_token_loss  # noqa: E402
from qwen2.train.report import read_metrics  # noqa: E402
from qwen2.train.upcycle import upcycle  # noqa: E402

MOE = dict(num_experts=16, top_k=4, expert_size=48, shared_experts=4)


def data(out: Path):
    """(train, val, vocab): the speedrun's small-budget tokenizer and corpus, cached in `out`."""
    from qwen2.tokenizer.bpe import load_tokenizer
    from qwen2.train.pretrain import corpus_files, prepare_data, prepare_tokenizer
    from qwen2.train.recipes import speedrun

    cfg = speedrun(2.0, str(out))
    files = corpus_files(cfg)
    tok = load_tokenizer(prepare_tokenizer(cfg, out, files))
    train, val = prepare_data(cfg, tok, out, files)
    return train, val, len(tok)


def dense_config(vocab: int) -> ModelConfig:
    return ModelConfig(
        vocab_size=vocab,
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
        max_position_embeddings=1024,
        rope_theta=10_000.0,
        torch_dtype="float32",
        bos_token_id=None,
        eos_token_id=None,
    )


def train(model, run: Path, loader, val, steps: int, lr: float, eval_every: int, seq: int, batch: int):
    shutil.rmtree(run, ignore_errors=True)
    cfg = TrainConfig(
        batch_size=batch,
        lr=lr,
        warmup_steps=max(1, steps // 20),
        eval_every=eval_every,
        schedule="cosine",
        ckpt_every=0,
        seed=0,
    )
    trainer = Trainer(model, cfg, run, stage="train")

    def held_out():
        fixed = PackedLoader(val, seq_len=seq, batch_size=batch, shuffle=False)  # the same 4 batches
        return [next(fixed) for _ in range(8)]

    t0 = time.perf_counter()
    trainer.fit(next_token_loss, loader, end_step=steps, eval_batches=held_out, desc=run.name)
    trainer.close()
    return {"seconds": time.perf_counter() - t0, "metrics": read_metrics(run / "metrics.jsonl")}


def curves(metrics):
    steps = [r for r in metrics if "step_time_s" in r]
    evals = [(r["step"], r["eval_loss"]) for r in metrics if "eval_loss" in r and not r.get("final")]
    return [r["step"] for r in steps], [r["loss"] for r in steps], evals


def smooth(xs, k=10):
    return [sum(xs[max(0, i - k + 1) : i + 1]) / len(xs[max(0, i - k + 1) : i + 1]) for i in range(len(xs))]


def plot(results: dict, png: Path, pretrain: list):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for name, r in results.items():
        steps, loss, evals = curves(r["metrics"])
        (line,) = ax.plot(steps, smooth(loss), label=f"{name} (train, 10-step mean)", alpha=0.8)
        if evals:
            ax.plot(*zip(*evals, strict=True), "o--", color=line.get_color(), label=f"{name} (held-out)")
    ax.set_xlabel(f"continued-training step (after {len(pretrain)} dense pre-training steps)")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title("Upcycling vs scratch: dense parent, upcycled MoE, MoE from random init")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)
    return png


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/bench-upcycle")
    ap.add_argument("--pretrain-steps", type=int, default=240)
    ap.add_argument("--steps", type=int, default=120, help="continued-training steps per model")
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=2e-3, help="peak learning rate of the continued training")
    ap.add_argument("--reinit", type=float, default=0.5)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--quick", action="store_true", help="smoke run: 20 pre-training + 10 steps")
    a = ap.parse_args()
    if a.quick:
        a.pretrain_steps, a.steps = 20, 10
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    train_set, val, vocab = data(out)
    eval_every = max(1, a.steps // 10)

    dense = build_model(dense_config(vocab), seed=0)
    # spread: a step's rows lie 64 rows apart in the stream (as the speedrun), not one file's run of rows
    loader = PackedLoader(train_set, seq_len=a.seq, batch_size=a.batch, seed=0, spread=64)
    pre = train(dense, out / "pretrain", loader, val, a.pretrain_steps, 3e-3, 0, a.seq, a.batch)
    start = loader.state_dict()  # every continuation reads the same batches from here
    print(
        f"dense parent: {a.pretrain_steps} steps in {pre['seconds']:.0f}s, "
        f"final loss {curves(pre['metrics'])[1][-1]:.3f}"
    )

    config, state = upcycle(dense, reinit=a.reinit, seed=0, **MOE)
    with torch.device("meta"):
        upcycled = Qwen2(config)
    upcycled.load_state_dict({k: v.clone() for k, v in state.items()}, strict=True, assign=True)
    scratch = build_model(config.replace(extra={}), seed=1)
    parent = build_model(dense.config, seed=0)
    parent.load_state_dict(dense.state_dict())

    results = {}
    for name, model in (("dense parent", parent), ("upcycled MoE", upcycled), ("MoE from scratch", scratch)):
        loader = PackedLoader(train_set, seq_len=a.seq, batch_size=a.batch, seed=0, spread=64)
        loader.load_state_dict(start)
        results[name] = train(
            model, out / name.replace(" ", "-"), loader, val, a.steps, a.lr, eval_every, a.seq, a.batch
        )

    rows, summary = [], {}
    for name, r in results.items():
        steps, loss, evals = curves(r["metrics"])
        final = [m for m in r["metrics"] if m.get("final")]
        c = param_counts(upcycled.config if "MoE" in name else dense.config)
        marks = {
            f"loss@{f}%": sum(loss[max(0, i - 4) : i + 1]) / len(loss[max(0, i - 4) : i + 1])
            for f, i in ((10, len(loss) // 10), (50, len(loss) // 2), (100, len(loss) - 1))
        }
        summary[name] = {
            "total_params": c.total,
            "active_params": c.active,
            "first_loss": loss[0],
            **marks,
            "final_eval_loss": final[-1]["eval_loss"] if final else None,
            "seconds": r["seconds"],
            "evals": evals,
        }
        rows.append(
            {
                "model": name,
                "params (active)": f"{c.total / 1e6:.2f}M ({c.active / 1e6:.2f}M)",
                "first loss": f"{loss[0]:.3f}",
                **{k: f"{v:.3f}" for k, v in marks.items()},
                "held-out": f"{summary[name]['final_eval_loss']:.3f}",
                "s": f"{r['seconds']:.0f}",
            }
        )
    print(table(rows, list(rows[0])))
    png = plot(results, out / "upcycle.png", curves(pre["metrics"])[1])
    record = {"args": vars(a), "moe": MOE, "results": summary}
    atomic_write_text(out / "upcycle.json", json.dumps(record, indent=2) + "\n")
    u, s = summary["upcycled MoE"], summary["MoE from scratch"]
    print(
        f"upcycled vs scratch after {a.steps} steps: held-out {u['final_eval_loss']:.3f} vs "
        f"{s['final_eval_loss']:.3f} (dense parent {summary['dense parent']['final_eval_loss']:.3f})"
    )
    print(f"plot: {png}  json: {out / 'upcycle.json'}  wall {time.perf_counter() - t0:.0f}s")


if __name__ == "__main__":
    main()
