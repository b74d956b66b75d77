"""Stages of the Qwen2 recipe in miniature, shared by the speedrun and bench/posttrain_effect.py: a base
model pre-trained on text plus verifiable problems (data.tasks), rejection sampling of a model's replies
checked by code into preference pairs (paper 4.1: right over wrong), and the measurements every stage is
judged by: held-out task accuracy (greedy replies through ChatML, checked) and the held-out pre-training
loss whose rise over the base model is the alignment tax (paper 4.3).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch

from qwen2.checkpoint import load_model
from qwen2.data import tasks
from qwen2.tokenizer.bpe import load_tokenizer
from qwen2.tokenizer.chat import encode_chat
from qwen2.train import recipes

FAMILIES = ("arithmetic", "strings")


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
def greedy_replies(
    model_dir: Path, problems: list[dict], chat: bool = True, max_new_tokens: int = 12
) -> list[str]:
    """Greedy replies to each problem: through ChatML (chat) or continuing the pre-training form
    "Question: ...\nAnswer:" (a base model's format), stopping at <|im_end|> / a newline."""
    from qwen2.engine import Engine
    from qwen2.sampling import SamplingParams

    tok = load_tokenizer(model_dir)
    model = load_model(model_dir, dtype=torch.float32).eval()
    engine = Engine(model, max_num_seqs=64, max_model_len=256)
    stops = [tok.im_end_id, tok.endoftext_id]
    params = SamplingParams(temperature=0.0, max_new_tokens=max_new_tokens, stop_token_ids=stops)
    if chat:
        ids = [encode_chat(tok, tasks.as_messages(p)[:-1], add_generation_prompt=True)[0] for p in problems]
    else:
        ids = [tok.encode(tasks.prompt_text(p)) for p in problems]
    outs = engine.generate(ids, params)
    texts = [tok.decode([t for t in o if t not in stops]) for o in outs]
    return texts if chat else [t.split("\n")[0] for t in texts]


def accuracy(model_dir: Path, problems: list[dict], chat: bool = True) -> float:
    """Fraction of `problems` whose greedy reply tasks.check accepts."""
    replies = greedy_replies(model_dir, problems, chat)
    return sum(tasks.check(p, r) for p, r in zip(problems, replies, strict=True)) / len(problems)


@torch.no_grad()
def heldout_lm_loss(model_dir: Path, base_run: Path, rows: int = 32, seq_len: int = 256) -> float:
    """Mean next-token loss on fixed rows of the pre-training held-out split (plain text, no chat)."""
    from qwen2.data import PackedLoader
    from qwen2.data.shards import ShardSet
    from qwen2.train.objectives import token_losses

    run = json.loads((base_run / "summary.json").read_text())["config"]  # pretrain.prepare_data's split
    _, val = ShardSet(base_run / "data" / "corpus").split(run["heldout_fraction"], seed=run["seed"])
    batch = next(PackedLoader(val, seq_len, rows, seed=0, shuffle=False))["input_ids"]
    model = load_model(model_dir, dtype=torch.float32).eval()
    return float(token_losses(model, batch[:, :-1], batch[:, 1:]).mean())


@torch.no_grad()
def sample_pairs(model_dir: Path, problems: list[dict], k: int, seed: int) -> tuple[list[dict], float]:
    """k sampled replies per problem, checked: (one right-over-wrong pair per problem that has both, the
    fraction of right samples)."""
    from qwen2.engine import Engine
    from qwen2.sampling import SamplingParams

    tok = load_tokenizer(model_dir)
    model = load_model(model_dir, dtype=torch.float32).eval()
    engine = Engine(model, max_num_seqs=128, max_model_len=256)
    rng = random.Random(seed)
    rids = []
    for i, p in enumerate(problems):
        ids = encode_chat(tok, tasks.as_messages(p)[:-1], add_generation_prompt=True)[0]
        for j in range(k):
            params = SamplingParams(
                temperature=1.0, max_new_tokens=12, stop_token_ids=[tok.im_end_id], seed=seed + i * k + j
            )
            rids.append((engine.add_request(ids, params), i))
    got = {r: [] for r, _ in rids}
    while engine.has_unfinished():
        for o in engine.step():
            got[o.request_id].extend(o.token_ids)
    replies: list[list[str]] = [[] for _ in problems]
    for r, i in rids:
        replies[i].append(tok.decode([t for t in got[r] if t != tok.im_end_id]))
    pairs, right = [], 0
    for p, rs in zip(problems, replies, strict=True):
        good = [r for r in rs if tasks.check(p, r)]
        bad = [r for r in rs if not tasks.check(p, r)]
        right += len(good)
        if good and bad:
            msgs = tasks.as_messages(p)[:-1]
            pairs.append(
                {
                    "prompt": msgs,
                    "chosen": [{"role": "assistant", "content": rng.choice(good)}],
                    "rejected": [{"role": "assistant", "content": rng.choice(bad)}],
                }
            )
    return pairs, right / (k * len(problems))
