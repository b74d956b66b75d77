"""Stages of the Qwen2 recipe in miniature, shared by the speedrun and bench/posttrain_effect.py: a base
model pre-trained on text plus verifiable problems (data.tasks), rejection sampling of a model's replies
checked by code into preference pairs (paper 4.1: right over wrong), and the measurements every stage is
judged by: held-out task accuracy (greedy replies through ChatML, checked) and the held-out pre-training
loss whose rise over the base model is the alignment tax (paper 4.3).
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from qwen2.checkpoint import load_model
from qwen2.data import tasks
from qwen2.tokenizer.bpe import load_tokenizer
from qwen2.tokenizer.chat import encode_chat
from qwen2.train import recipes

FAMILIES = ("arithmetic", "strings")
VARIANTS = ("plain RoPE", "static YaRN", "dynamic YaRN", "YaRN + DCA")


def write_jsonl(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def pretrain(
    out: Path, steps: int, seed: int, problems: int = 30_000, share: float = 0.5, corpus_mb: float = 8.0
) -> Path:
    """A base model: the speedrun recipe for `steps` steps on a slice of the default corpus with
    `problems` verifiable problems mixed in (recipes.PretrainConfig.task_*); returns the run folder."""
    from qwen2.train.pretrain import run_pretrain

    cfg = recipes.override(
        recipes.speedrun(30.0, str(out / "base")),
        {
            "minutes": 0.0,
            "steps": steps,
            "long_steps": max(5, steps // 15),
            "ckpt_every": 100,
            "eval_every": 0,
            "max_corpus_mb": corpus_mb,
            "task_problems": problems,
            "task_share": share,
            "seed": seed,
        },
    )
    run_pretrain(cfg)
    return out / "base"


@torch.no_grad()
def replies(
    model_dir: Path,
    problems: list[dict],
    *,
    chat: bool = True,
    k: int = 1,
    temperature: float = 0.0,
    seed: int = 0,
    max_new_tokens: int = 12,
) -> list[list[str]]:
    """k replies per problem from our Engine (greedy at temperature 0): through ChatML (`chat`) or continuing
    the pre-training form "Question: ...\nAnswer:" (a base model's format; the first line)."""
    from qwen2.engine import Engine
    from qwen2.sampling import SamplingParams

    tok = load_tokenizer(model_dir)
    model = load_model(model_dir, dtype=torch.float32).eval()
    engine = Engine(model, max_num_seqs=128, max_model_len=512)
    stops = [tok.im_end_id, tok.endoftext_id]
    rids = []
    for i, p in enumerate(problems):
        if chat:
            ids = encode_chat(tok, tasks.as_messages(p)[:-1], add_generation_prompt=True)[0]
        else:
            ids = tok.encode(tasks.prompt_text(p))
        for j in range(k):
            params = SamplingParams(
                temperature=temperature,
                max_new_tokens=max_new_tokens,
                stop_token_ids=stops,
                seed=seed + i * k + j,
            )
            rids.append((engine.add_request(ids, params), i))
    got = {r: [] for r, _ in rids}
    while engine.has_unfinished():
        for o in engine.step():
            got[o.request_id].extend(o.token_ids)
    out: list[list[str]] = [[] for _ in problems]
    for r, i in rids:
        text = tok.decode([t for t in got[r] if t not in stops])
        out[i].append(text if chat else text.split("\n")[0].strip())
    return out


def accuracy(model_dir: Path, problems: list[dict], chat: bool = True) -> float:
    """Fraction of `problems` whose greedy reply tasks.check accepts."""
    got = replies(model_dir, problems, chat=chat)
    return sum(tasks.check(p, r[0]) for p, r in zip(problems, got, strict=True)) / len(problems)


@torch.no_grad()
def heldout_lm_loss(model_dir: Path, base_run: Path, rows: int = 32, seq_len: int = 256) -> float:
    """Mean next-token loss on fixed rows of the pre-training corpus's held-out split (plain text)."""
    from qwen2.data import PackedLoader
    from qwen2.data.shards import ShardSet
    from qwen2.train.objectives import token_losses

    run = json.loads((base_run / "summary.json").read_text())["config"]  # pretrain.prepare_data's split
    _, val = ShardSet(base_run / "data" / "corpus").split(run["heldout_fraction"], seed=run["seed"])
    batch = next(PackedLoader(val, seq_len, rows, seed=0, shuffle=False))["input_ids"]
    model = load_model(model_dir, dtype=torch.float32).eval()
    return float(token_losses(model, batch[:, :-1], batch[:, 1:]).mean())


def rejection_sample(model_dir: Path, problems: list[dict], k: int, seed: int, chat: bool) -> dict:
    """Rejection sampling with a checker (paper 4.1): k samples at temperature 1 per problem, each checked.
    Returns {"sft": SFT records (a right sample; the reference answer where none was right), "pairs":
    right-over-wrong preference records (problems with a wrong sample), "right": fraction of right samples,
    "gold": SFT records that took the reference answer}."""
    rng = random.Random(seed)
    got = replies(model_dir, problems, chat=chat, k=k, temperature=1.0, seed=seed)
    sft, pairs, right, gold = [], [], 0, 0
    for p, rs in zip(problems, got, strict=True):
        good = [r for r in rs if tasks.check(p, r)]
        bad = [r for r in rs if not tasks.check(p, r) and r]
        right += len(good)
        answer = min(good, key=len) if good else p["answer"]
        gold += not good
        sft.append({"messages": tasks.as_messages(p, answer)})
        if bad:  # right over wrong; the reference answer stands in when no sample was right
            pairs.append(
                {
                    "prompt": tasks.as_messages(p)[:-1],
                    "chosen": [{"role": "assistant", "content": rng.choice(good) if good else p["answer"]}],
                    "rejected": [{"role": "assistant", "content": rng.choice(bad)}],
                }
            )
    return {"sft": sft, "pairs": pairs, "right": right / (k * len(problems)), "gold": gold}


# ---- the post-training chain ----------------------------------------------------------------------------
@dataclass
class ChainConfig:
    """Sizes and settings of the post-training chain at small scale. The paper's learning rates (SFT 7e-6,
    DPO 1e-6) are for 7B+ models; a few-million-parameter model needs larger ones. OMO keeps the reference
    alpha 1e-7: each step adds alpha * task vector, so over a few hundred steps alpha 1e-2 extrapolated the
    SFT delta several times over (tax +39.9 nats) and 1e-3 doubled AdamW's tax; reserve 0.3 measured the
    lowest tax (bench/omo_sweep.py)."""

    problems: int = 3000  # rejection-sampled: SFT data, and preference pairs where samples disagree
    prompts: int = 256  # online DPO
    k: int = 8  # samples per problem / prompt
    heldout: int = 200  # accuracy problems, unseen in every stage
    seed: int = 0
    sft_lr: float = 1e-3
    reward_lr: float = 3e-4
    dpo_lr: float = 1e-4
    online_lr: float = 5e-5
    dpo_optimizers: tuple = ("adamw", "ondare", "onties")
    online_optimizer: str = "ondare"  # the paper's RLHF uses the Online Merging Optimizer
    merge_alpha: float = 1e-7
    merge_reserve: float = 0.3


CHAIN_STAGES = ("synth", "sft", "reward", "dpo", "online-dpo", "eval")


def run_chain(out: Path, base_run: Path, cc: ChainConfig, stages=CHAIN_STAGES, log=print) -> dict:
    """synth -> SFT -> reward model -> DPO (each optimizer) -> online DPO -> eval, each stage a run folder
    under `out` that resumes (finished stages are read back); returns what each stage measured."""
    from qwen2.files import atomic_write_text
    from qwen2.train.posttrain import run_posttrain

    out.mkdir(parents=True, exist_ok=True)
    base = base_run / "model"
    pre = json.loads((base_run / "summary.json").read_text())["config"]
    seen = tasks.problems(pre.get("task_problems") or 0, pre["seed"], tuple(pre["task_families"].split(",")))
    problems = tasks.problems(cc.problems + cc.prompts, cc.seed + 1, FAMILIES)
    synth_p, prompt_p = problems[: cc.problems], problems[cc.problems :]
    heldout = tasks.held_out(problems + seen, cc.heldout, cc.seed + 7, FAMILIES)
    result: dict = {"seconds": {}}
    common = {"max_len": 256, "heldout_fraction": 0.05, "ckpt_every": 50, "seed": cc.seed}

    def timed(name, fn):
        t = time.perf_counter()
        value = fn()
        result["seconds"][name] = round(time.perf_counter() - t, 1)
        log(f"== {name}: {result['seconds'][name]} s")
        return value

    def post(cls, fields):
        summary = run_posttrain(recipes.override(cls(), {**common, **fields}, source=fields["out"]))
        return {k: summary[k] for k in ("final", "steps", "tokens", "model", "seconds")}

    # synthesis: rejection sampling of the pre-trained model in its own format
    made = out / "synth.json"
    if "synth" in stages and not made.is_file():
        got = timed("synth", lambda: rejection_sample(base, synth_p, cc.k, cc.seed, chat=False))
        write_jsonl(out / "sft.jsonl", got["sft"])
        write_jsonl(out / "pairs.jsonl", got["pairs"])
        info = {"problems": len(synth_p), "right_fraction": got["right"], "gold_topped_up": got["gold"]}
        atomic_write_text(made, json.dumps({**info, "pairs": len(got["pairs"])}))
    result["synth"] = json.loads(made.read_text()) if made.is_file() else None
    sft_dir, rm_dir = out / "sft" / "model", out / "reward" / "model"
    if "sft" in stages:
        sft = {"out": str(out / "sft"), "model": str(base), "data": str(out / "sft.jsonl"), "lr": cc.sft_lr}
        sft.update(epochs=2.0, batch_size=16, warmup_steps=10, packing=True)
        result["sft"] = timed("sft", lambda: post(recipes.SFTConfig, sft))
    if "reward" in stages:
        rm = {"out": str(out / "reward"), "model": str(sft_dir), "data": str(out / "pairs.jsonl")}
        rm.update(epochs=2.0, batch_size=8, lr=cc.reward_lr, heldout_fraction=0.1)
        result["reward"] = timed("reward", lambda: post(recipes.RewardConfig, rm))
    omo = {"merge_alpha": cc.merge_alpha, "merge_reserve": cc.merge_reserve, "base_model": str(base)}
    dpo = {"model": str(sft_dir), "data": str(out / "pairs.jsonl"), "epochs": 2.0, "batch_size": 8}
    dpo.update(lr=cc.dpo_lr, warmup_steps=5)
    result["dpo"] = {}
    for opt in cc.dpo_optimizers if "dpo" in stages else ():
        fields = {
            **dpo,
            "out": str(out / f"dpo-{opt}"),
            **({} if opt == "adamw" else {"optimizer": opt, **omo}),
        }
        result["dpo"][opt] = timed(f"dpo-{opt}", lambda f=fields: post(recipes.DPOConfig, f))
    if "online-dpo" in stages:
        write_jsonl(out / "prompts.jsonl", [{"prompt": tasks.as_messages(p)[:-1]} for p in prompt_p])
        start = out / f"dpo-{cc.dpo_optimizers[0]}" / "model"
        online = {"out": str(out / "online-dpo"), "model": str(start), "data": str(out / "prompts.jsonl")}
        online.update(reward_model=str(rm_dir), epochs=1.0, batch_size=8, samples=cc.k, max_new_tokens=12)
        online.update(lr=cc.online_lr, warmup_steps=2, heldout_fraction=0.0)
        if cc.online_optimizer != "adamw":
            online.update(optimizer=cc.online_optimizer, **omo)
        result["online-dpo"] = timed("online-dpo", lambda: post(recipes.OnlineDPOConfig, online))
    if "eval" in stages:
        models = {"base": base, "SFT": sft_dir}
        models.update({f"DPO {o}": out / f"dpo-{o}" / "model" for o in cc.dpo_optimizers})
        models["online DPO"] = out / "online-dpo" / "model"
        result["eval"] = timed("eval", lambda: evaluate(models, base_run, heldout))
    return result


def evaluate(models: dict[str, Path], base_run: Path, heldout: list[dict]) -> list[dict]:
    """Per model present: held-out accuracy (ChatML; the base model also in its pre-training format),
    held-out pre-training loss and its change over the base model (the alignment tax)."""
    rows = []
    base_loss = None
    for name, d in models.items():
        if not (Path(d) / "config.json").is_file():
            continue
        loss = heldout_lm_loss(Path(d), base_run)
        base_loss = loss if base_loss is None else base_loss
        row = {
            "model": name,
            "accuracy": accuracy(Path(d), heldout),
            "lm_loss": loss,
            "tax": loss - base_loss,
        }
        if name == "base":
            row["accuracy_pretraining_format"] = accuracy(Path(d), heldout, chat=False)
        rows.append(row)
    return rows


def position_variant(base, name: str, length: int, l0: int):
    """`base`'s weights under another position scheme for `length` tokens (trained at l0): one of VARIANTS
    (plain RoPE, static YaRN with factor length / l0, dynamic YaRN, YaRN + DCA as
    ModelConfig.with_dual_chunk_attention adds it)."""
    from qwen2.model import build_model

    c = base.config.replace(max_position_embeddings=l0)
    if name == "YaRN + DCA":
        config = c.with_dual_chunk_attention(context=length)
    else:
        config = c.replace(max_position_embeddings=length)
        yarn = {"type": "yarn", "original_max_position_embeddings": l0}
        if name == "static YaRN":
            config = config.replace(rope_scaling={**yarn, "factor": length / l0})
        elif name == "dynamic YaRN":
            config = config.replace(rope_scaling={**yarn, "factor": 16.0, "dynamic": True})
    model = build_model(config, seed=None)
    model.load_state_dict(base.state_dict(), strict=True, assign=True)
    return model.eval()


@torch.no_grad()
def passkey_grid(
    model_dir: Path,
    l0: int,
    lengths: list[int],
    depths=(0.0, 0.25, 0.5, 0.75, 1.0),
    trials: int = 2,
    variants=("plain RoPE", "YaRN + DCA"),
    seed: int = 0,
) -> dict:
    """Needle in a haystack in the form the model was trained on (data.tasks' passkey: the key hidden in
    filler, asked for at the end), at each length x depth, greedy, for each position variant of the same
    weights (position_variant; trained at l0). {"lengths", "depths", "accuracy": {variant: {"L/d": acc}}}."""
    from qwen2.generation import generate

    tok = load_tokenizer(model_dir)
    base = load_model(model_dir, dtype=torch.float32, kernels=False)
    para = len(tok.encode(tasks.FILLER))
    rng = random.Random(seed)
    out = {"lengths": list(lengths), "depths": list(depths), "l0": l0, "accuracy": {}}
    jobs = []
    for n in lengths:
        paragraphs = max(1, (n - 40) // para)
        for d in depths:
            for _ in range(trials):
                key, before = str(rng.randint(10000, 99999)), round(d * paragraphs)
                text = (
                    tasks.FILLER * before + f"The pass key is {key}. " + tasks.FILLER * (paragraphs - before)
                )
                jobs.append(
                    (n, d, key, tok.encode(tasks.prompt_text({"question": text + "What is the pass key?"})))
                )
    for name in variants:
        acc: dict[str, float] = {}
        for n in lengths:
            model = position_variant(base, name, max(n, l0) + 64, l0)
            mine = [j for j in jobs if j[0] == n]
            for s in range(0, len(mine), 4):
                batch = mine[s : s + 4]
                gen = generate(model, [j[3] for j in batch], 8, temperature=0.0)
                for _ in gen:
                    pass
                for i, (_, d, key, _) in enumerate(batch):
                    text = tok.decode(gen.output_ids[i])
                    acc[f"{n}/{d}"] = acc.get(f"{n}/{d}", 0.0) + (key in text) / trials
        out["accuracy"][name] = acc
    return out


def plot_passkey_grid(grid: dict, path: Path) -> Path:
    """One heat map per variant: depth (rows) x length (columns), accuracy 0-1."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names, lengths, depths = list(grid["accuracy"]), grid["lengths"], grid["depths"]
    fig, axes = plt.subplots(1, len(names), figsize=(4.2 * len(names) + 1, 3.4), squeeze=False)
    for ax, name in zip(axes[0], names, strict=True):
        cells = [[grid["accuracy"][name][f"{n}/{d}"] for n in lengths] for d in depths]
        im = ax.imshow(cells, cmap="RdYlGn", vmin=0, vmax=1, aspect="auto")
        ax.set_xticks(range(len(lengths)), [f"{n // 1024}K" if n >= 1024 else str(n) for n in lengths])
        ax.set_yticks(range(len(depths)), [f"{int(100 * d)}%" for d in depths])
        ax.set_xlabel(f"context (tokens; trained at {grid['l0']})")
        ax.set_ylabel("key depth")
        ax.set_title(name)
    fig.colorbar(im, ax=axes[0].tolist())
    fig.suptitle("passkey retrieval", y=1.04)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path
