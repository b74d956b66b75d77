"""Training reports: FLOPs and MFU, loss curves and the long-context plot (matplotlib PNG), report.md/json.

FLOPs per token follow the PaLM paper's accounting (Chowdhery et al. 2022, appendix B): 6 N for the
matmuls of forward + backward, N = every weight matrix a token multiplies (the output layer
included, the embedding lookup not), plus 12 L H T for attention scores and values (T = sequence
length, no causal discount). MFU needs a peak: on a GPU we take the data-sheet bf16 dense figure when
the device is known; on a CPU (no data sheet for a shared virtual machine) we measure the best fp32
GEMM throughput of this machine in the same process, so MFU reads "share of what a large matmul gets".
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from qwen2.config import ModelConfig, param_counts
from qwen2.extras import require

_GPU_PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "A10": 125e12}


def flops_per_token(config: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token: 6 * (matmul weights one token touches) + 12 * layers * hidden * seq_len."""
    pc = param_counts(config)
    matmul = pc.active - config.vocab_size * config.hidden_size * (1 if config.tie_word_embeddings else 2)
    matmul -= (2 * config.num_hidden_layers + 1) * config.hidden_size  # RMSNorm weights are not matmuls
    matmul += config.vocab_size * config.hidden_size  # the output layer is a matmul (tied or not)
    return 6.0 * matmul + 12.0 * config.num_hidden_layers * config.hidden_size * seq_len


_PEAK_CACHE: dict[str, float] = {}


def peak_flops(device: torch.device | str = "cpu", seconds: float = 1.0) -> float:
    """FLOP/s a training step could reach at best: a GPU's data-sheet bf16 figure, or on CPU the
    measured fp32 throughput of a 1024^3 matmul (best of several timed repeats)."""
    device = torch.device(device)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, value in _GPU_PEAK_BF16.items():
            if key in name:
                return value
    key = str(device)
    if key not in _PEAK_CACHE:
        n = 1024
        a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
        best, stop = float("inf"), time.perf_counter() + seconds
        while time.perf_counter() < stop or best == float("inf"):
            t = time.perf_counter()
            for _ in range(4):
                a @ b
            if device.type == "cuda":
                torch.cuda.synchronize()
            best = min(best, (time.perf_counter() - t) / 4)
        _PEAK_CACHE[key] = 2 * n**3 / best
    return _PEAK_CACHE[key]


def read_metrics(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a torn last line of a killed run
    return out


def plot_losses(metrics: list[dict], png: str | Path, title: str = "pre-training loss") -> Path:
    """Training loss by step per stage (light) with a running mean, and held-out loss (dots)."""
    matplotlib = require("matplotlib", "plot", "plotting the training report")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    stages = list(dict.fromkeys(r.get("stage", "train") for r in metrics))
    for i, stage in enumerate(stages):
        recs = [r for r in metrics if r.get("stage", "train") == stage and "loss" in r]
        if not recs:
            continue
        steps, losses = [r["step"] for r in recs], [r["loss"] for r in recs]
        color = f"C{i}"
        ax.plot(steps, losses, color=color, alpha=0.25, lw=0.8)
        k = max(1, len(losses) // 50)
        windows = [losses[max(0, j - k) : j + 1] for j in range(len(losses))]  # trailing mean of k+1 steps
        smooth = [sum(w) / len(w) for w in windows]
        ax.plot(steps, smooth, color=color, lw=1.8, label=f"{stage} (train)")
        ev = [r for r in metrics if r.get("stage", "train") == stage and "eval_loss" in r]
        if ev:
            ax.plot(
                [r["step"] for r in ev],
                [r["eval_loss"] for r in ev],
                "o",
                color=color,
                ms=4,
                label=f"{stage} (held-out)",
            )
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("next-token loss (nats)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    png = Path(png)
    fig.savefig(png)
    plt.close(fig)
    return png


def plot_long_context(before: dict, after: dict, png: str | Path, train_len: int | None = None) -> Path:
    """Held-out loss by position at the long length after stage 1 and after the long-context stage (top),
    and their difference (bottom: below zero is better), the positions beyond stage 1's length shaded."""
    matplotlib = require("matplotlib", "plot", "plotting the training report")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, dx) = plt.subplots(
        2, 1, figsize=(8, 6), dpi=100, sharex=True, gridspec_kw={"height_ratios": [3, 2]}
    )
    pos = before["positions"]
    ax.plot(
        pos,
        before["loss"],
        "o-",
        ms=3,
        color="C0",
        label=f"after stage 1 (RoPE base {before['rope_theta']:,.0f})",
    )
    ax.plot(
        after["positions"],
        after["loss"],
        "o-",
        ms=3,
        color="C1",
        label=f"after the long-context stage (RoPE base {after['rope_theta']:,.0f})",
    )
    diff = [a - b for a, b in zip(after["loss"], before["loss"], strict=True)]
    dx.bar(
        pos,
        diff,
        width=0.8 * (pos[1] - pos[0] if len(pos) > 1 else 1),
        color=["C2" if d < 0 else "C3" for d in diff],
    )
    dx.axhline(0, color="black", lw=0.8)
    for axis in (ax, dx):
        if train_len:
            axis.axvspan(train_len, after["seq_len"], color="gray", alpha=0.12, lw=0)
            axis.axvline(train_len, color="gray", ls="--", lw=1)
        axis.grid(alpha=0.3)
    ax.set_ylabel("held-out loss (nats)")
    ax.set_title(
        f"Per-position loss at {after['seq_len']} tokens, before and after the long-context stage", pad=28
    )
    ax.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=2, fontsize=8.5, frameon=False)
    dx.set_ylabel("after - before\n(green: lower loss)")
    shaded = f"; shaded: beyond stage 1's length, {train_len}" if train_len else ""
    dx.set_xlabel(f"position in the sequence (bins of {after.get('bin_width', 1)} tokens{shaded})")
    fig.tight_layout()
    png = Path(png)
    fig.savefig(png)
    plt.close(fig)
    return png


def write_report(run_dir: str | Path, summary: dict, samples: list[dict], extra: dict | None = None) -> Path:
    """report.json (everything) and report.md (for people) in run_dir."""
    from qwen2.files import atomic_write_text

    run_dir = Path(run_dir)
    data = {**summary, **(extra or {}), "samples": samples}
    atomic_write_text(run_dir / "report.json", json.dumps(data, indent=2, default=str) + "\n")
    lines = ["# Pre-training report", ""]
    for key, label in (
        ("wall_seconds", "wall time (s)"),
        ("final_loss", "final training loss"),
        ("final_eval_loss", "final held-out loss"),
        ("tokens", "tokens trained"),
        ("tokens_per_s", "training tokens/s"),
        ("mfu", "MFU"),
        ("params", "parameters"),
        ("model", "model"),
    ):
        if key in data:
            value = data[key]
            if key == "mfu":
                value = f"{100 * value:.1f}% (peak {data.get('peak_flops', 0) / 1e9:.0f} GFLOP/s)"
            elif isinstance(value, float):
                value = f"{value:.4g}"
            lines.append(f"- {label}: {value}")
    for key in ("loss_png", "long_context_png"):
        if key in data:
            lines += ["", f"![{key}]({Path(data[key]).name})"]
    if "long_context" in data:
        lc = data["long_context"]
        lines += [
            "",
            f"Held-out loss at {lc['seq_len']} tokens: {lc['before']:.3f} after stage 1, "
            f"{lc['after']:.3f} after the long-context stage "
            f"(positions beyond {lc['train_len']}: "
            f"{lc['before_tail']:.3f} -> {lc['after_tail']:.3f}).",
        ]
    if samples:
        lines += ["", "## Samples", ""]
        for s in samples:
            lines += [f"Prompt: `{s['prompt']!r}`", "", "```", s["prompt"] + s["completion"], "```", ""]
    atomic_write_text(run_dir / "report.md", "\n".join(lines) + "\n")
    return run_dir / "report.md"


def write_recipe_report(run_dir: str | Path, report: dict) -> Path:
    """report.json (everything) and report.md: the pre-training report, then the recipe's stages (each
    one's wall time, tokens and effect), the models' accuracy and alignment tax, passkey retrieval with and
    without YaRN + DCA, and chat samples (speedrun.recipe_report's `report["recipe"]`)."""
    from qwen2.files import atomic_write_text

    run_dir = Path(run_dir)
    write_report(run_dir, {k: v for k, v in report.items() if k != "samples"}, report.get("samples", []))
    recipe, lines = report["recipe"], [""]
    chain = recipe["chain"]
    secs = chain["seconds"]
    rows = {r["model"]: r for r in chain.get("eval") or []}

    def acc(name):
        return f"accuracy {100 * rows[name]['accuracy']:.1f}%" if name in rows else ""

    def tax(name):
        return f"tax {rows[name]['tax']:+.3f}" if name in rows else ""

    def tokens(stage):
        return f"{stage['tokens']:,}" if stage else ""

    table = [
        (
            "pretrain",
            report.get("wall_seconds"),
            f"{report.get('tokens', 0):,}",
            _pretrain_effect(report, rows),
        )
    ]
    if recipe.get("moe"):
        m = recipe["moe"]
        loss, par = m["heldout_loss"], m["params"]
        table.append(
            (
                "moe (upcycled)",
                round(m["seconds"], 1),
                f"{m['tokens']:,}",
                f"held-out loss: dense {loss['dense']:.3f}, upcycled {loss['upcycled']:.3f}, trained "
                f"{loss['trained']:.3f}; {par['total'] / 1e6:.2f}M params, {par['active'] / 1e6:.2f}M active",
            )
        )
    if chain.get("synth"):
        s = chain["synth"]
        table.append(
            (
                "synth",
                secs.get("synth"),
                "",
                f"{100 * s['right_fraction']:.1f}% right samples, {s['pairs']} pairs",
            )
        )
    if chain.get("sft"):
        table.append(("sft", secs.get("sft"), tokens(chain["sft"]), acc("SFT")))
    if chain.get("reward"):
        held = chain["reward"]["final"].get("eval_accuracy")
        table.append(
            (
                "reward",
                secs.get("reward"),
                tokens(chain["reward"]),
                f"held-out pair accuracy {held:.2f}" if held is not None else "",
            )
        )
    for opt, got in (chain.get("dpo") or {}).items():
        margin = got["final"].get("eval_rewards/margins")
        effect = ", ".join(
            x
            for x in (
                acc(f"DPO {opt}"),
                tax(f"DPO {opt}"),
                f"margin {margin:+.3f}" if margin is not None else "",
            )
            if x
        )
        table.append((f"dpo ({opt})", secs.get(f"dpo-{opt}"), tokens(got), effect))
    if chain.get("online-dpo"):
        got = chain["online-dpo"]
        effect = ", ".join(
            x
            for x in (
                acc("online DPO"),
                tax("online DPO"),
                f"reward {got['final'].get('reward/mean', 0):+.3f}",
            )
            if x
        )
        table.append(("online dpo", secs.get("online-dpo"), tokens(got), effect))
    if "needle" in recipe:
        g = recipe["needle"]
        far = [k for k in next(iter(g["accuracy"].values())) if int(k.split("/")[0]) > g["l0"]]
        means = {n: sum(a[k] for k in far) / max(1, len(far)) for n, a in g["accuracy"].items()}
        table.append(
            (
                "needle",
                secs.get("needle"),
                "",
                ", ".join(f"{n} {100 * m:.0f}% beyond {g['l0']}" for n, m in means.items()),
            )
        )
    lines += [
        "## The recipe, stage by stage",
        "",
        "| stage | wall (s) | tokens | effect |",
        "|---|---|---|---|",
    ]
    lines += [f"| {a} | {b if b is not None else ''} | {c} | {d} |" for a, b, c, d in table]
    if rows:
        lines += [
            "",
            "| model | held-out accuracy | held-out pre-training loss | alignment tax |",
            "|---|---|---|---|",
        ]
        lines += [
            f"| {r['model']} | {100 * r['accuracy']:.1f}% | {r['lm_loss']:.4f} | {r['tax']:+.4f} |"
            for r in rows.values()
        ]
    if "needle" in recipe:
        lines += ["", f"![passkey retrieval]({Path(recipe['needle']['png']).name})"]
    if recipe.get("moe", {}).get("expert_load_png"):
        png = Path(recipe["moe"]["expert_load_png"]).relative_to(run_dir)
        lines += ["", f"![expert load of the upcycled MoE]({png.as_posix()})"]
    if recipe.get("chat_samples"):
        lines += ["", "## Chat with the final model (ChatML)", ""]
        for s in recipe["chat_samples"]:
            lines += [
                f"- **user:** {s['user']}  ",
                f"  **assistant:** {s['assistant']!r}"
                + (f" (expected {s['expected']})" if s["expected"] else ""),
            ]
    md = run_dir / "report.md"
    atomic_write_text(md, md.read_text() + "\n".join(lines) + "\n")
    return md


def _pretrain_effect(report: dict, rows: dict) -> str:
    parts = []
    if report.get("final_eval_loss") is not None:
        parts.append(f"held-out loss {report['final_eval_loss']:.3f}")
    if "base" in rows and "accuracy_pretraining_format" in rows["base"]:
        parts.append(
            f"task accuracy {100 * rows['base']['accuracy_pretraining_format']:.1f}% (Question/Answer form)"
        )
    return ", ".join(parts)
