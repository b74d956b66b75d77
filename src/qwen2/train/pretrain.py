"""Pre-training end to end: tokenizer -> tokenized corpus -> stage 1 -> long-context stage -> HF export.

Paper section 3 / SPEC 1.1: pre-training at 4,096 tokens with RoPE base 10,000, then a final stage at
32,768 tokens with base 1,000,000 on a mixture rich in long documents. Scaled down here (by default
256 -> 1,024 tokens, the same base change). Between the stages only the RoPE base changes
(`Qwen2.set_rope_theta`: the config and the rotary tables), the loop's stage settings
(`Trainer.begin_stage`: batch size, peak learning rate, a new warmup and decay) and the loader (longer
rows, a mixture of documents at least `long_min_doc_tokens` long with the ordinary corpus); the
optimizer carries on. Per-position held-out loss at the long length is measured after each stage
(`long_context.json`) to show what the long stage buys.

Runs with a fixed number of steps, or within a time budget (`minutes`, everything counted: tokenizer,
data, both stages, and a reserve for the export and report): the step time measured over the first
tenth of a stage's share fixes its step count (and so its cosine schedule), and a stage still
running at its deadline (a machine that slowed down) ends there. The plan is kept in every
checkpoint, so a resumed run follows the same schedule. `resume=False` clears the run's outputs
(not the tokenizer and data caches); rerunning a finished run only writes its report again.

The same function runs under torchrun: rank 0 trains the tokenizer and tokenizes, the others wait.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import torch
import torch.distributed as dist

from qwen2.train.loop import Trainer
from qwen2.train.objectives import next_token_loss, token_losses
from qwen2.train.parallel import init_distributed
from qwen2.train.recipes import PretrainConfig, model_config
from qwen2.train.state import latest_checkpoint, load_checkpoint, read_trainer_info


def _barrier():
    if dist.is_initialized():
        dist.barrier()


def corpus_files(cfg: PretrainConfig) -> list[Path]:
    """The corpus's files (the Python standard library's .py/.txt when `corpus` is None), thinned evenly
    to `max_corpus_mb` when set."""
    from qwen2.data.corpus import default_corpus_files, list_files

    if cfg.corpus is None:
        files = default_corpus_files()
    else:
        if not Path(cfg.corpus).exists():
            raise FileNotFoundError(f"corpus {cfg.corpus}: no such file or folder")
        files = list_files([cfg.corpus])
        if not files:
            raise ValueError(f"corpus {cfg.corpus}: no text, JSONL or parquet files in it")
    return _thin(files, cfg.max_corpus_mb)


def _thin(files: list[Path], mb: float) -> list[Path]:
    """Every k-th file so that about `mb` megabytes remain (spread over the whole tree, deterministic)."""
    total = sum(f.stat().st_size for f in files)
    if mb <= 0 or total <= mb * 1e6:
        return files
    k = total / (mb * 1e6)
    return [f for i, f in enumerate(files) if int(i / k) != int((i + 1) / k) or i == 0]


def prepare_tokenizer(cfg: PretrainConfig, run_dir: Path, files: list[Path]) -> Path:
    """An existing tokenizer folder, or a byte-level BPE trained on (a slice of) the corpus into
    run_dir/tokenizer."""
    from qwen2.data.prepare import files_digest

    if cfg.tokenizer:
        return Path(cfg.tokenizer)
    out, text = run_dir / "tokenizer", _thin(files, cfg.tokenizer_max_mb)
    made_from = {"files": len(text), "digest": files_digest(text), "vocab": cfg.tokenizer_vocab}
    stamp = run_dir / "tokenizer_source.json"  # what the cached tokenizer was trained on
    cached = (out / "tokenizer.json").is_file() and stamp.is_file()
    if not cached or json.loads(stamp.read_text()) != made_from:
        from qwen2.tokenizer.train import train_tokenizer

        stamp.unlink(missing_ok=True)
        train_tokenizer(text, cfg.tokenizer_vocab, out)
        _write_json(stamp, made_from)
    return out


# What a run writes besides its caches (tokenizer/, data/): removed by a fresh start (--no-resume).
RUN_OUTPUTS = (
    "checkpoints",
    "model",
    "tensorboard",
    "metrics.jsonl",
    "summary.json",
    "long_context_before.json",
    "long_context_after.json",
    "report.json",
    "report.md",
    "loss.png",
    "long_context.png",
    # the speedrun's later stages read this run's model: a fresh pre-training makes them stale
    "posttrain",
    "moe",
    "passkey.png",
)


def clear_run(run_dir: Path) -> None:
    for name in RUN_OUTPUTS:
        path = run_dir / name
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)


def prepare_data(cfg: PretrainConfig, tok, run_dir: Path, files: list[Path]):
    """Tokenized shards under run_dir/data (cached by prepare_corpus's fingerprint) -> (train, val)."""
    from qwen2.data import Source, prepare_corpus
    from qwen2.data.shards import ShardSet

    report = prepare_corpus([Source("corpus", files)], tok, run_dir / "data")
    shards = ShardSet(run_dir / "data" / report["sources"]["corpus"]["dir"])
    return shards.split(cfg.heldout_fraction, seed=cfg.seed)


def prepare_tasks(cfg: PretrainConfig, tok, run_dir: Path, stage: str):
    """The verifiable problems (data.tasks) of `stage` ("pretrain" or "long") as tokenized shards, one
    problem a document, or None without task_problems. Written as JSONL under run_dir/tasks and prepared
    without filters or deduplication (templated problems look repetitive by design). The long stage's
    passkeys hide the key in filler that fills up to long_seq_len tokens."""
    import random

    from qwen2.data import Source, prepare_corpus, tasks
    from qwen2.data.shards import ShardSet

    if not cfg.task_problems:
        return None
    families = tuple(f.strip() for f in cfg.task_families.split(",") if f.strip())
    key = f"{stage}-{cfg.task_problems}-{'-'.join(families)}-{cfg.seed}" + (
        f"-{cfg.long_seq_len}" if stage == "long" else ""
    )
    folder = run_dir / "tasks" / key
    if stage == "pretrain":
        probs = tasks.problems(cfg.task_problems, cfg.seed, families)
    else:  # long passkeys: the filler's paragraphs (~25 tokens each) reach the stage's row length
        rng, top = random.Random(cfg.seed + 1), max(1, cfg.long_seq_len // 28)
        probs = [
            tasks.passkey(rng, rng.randint(top // 4, top)) for _ in range(max(1, cfg.task_problems // 20))
        ]
    made = folder / "problems.jsonl"
    if not made.is_file():
        from qwen2.files import atomic_write_text

        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_text(made, "".join(json.dumps({"text": tasks.as_text(p)}) + "\n" for p in probs))
    report = prepare_corpus([Source("tasks", [made])], tok, folder / "data", None, None, progress=False)
    return ShardSet(folder / "data" / report["sources"]["tasks"]["dir"])


def stage1_mixture(cfg: PretrainConfig, train, task_docs):
    """Stage 1's data: the corpus, with the problems at task_share of the tokens when there are any."""
    from qwen2.data import Mixture

    if task_docs is None:
        return train
    return Mixture(
        {"corpus": train, "tasks": task_docs}, {"corpus": 1 - cfg.task_share, "tasks": cfg.task_share}
    )


def long_mixture(cfg: PretrainConfig, train, task_docs=None, long_tasks=None):
    """The long-context stage's data: documents >= long_min_doc_tokens, mixed with the ordinary corpus,
    and at task_share of the tokens the problems: half stage 1's (so the short skills are not forgotten
    while RoPE's base changes), half the long passkeys."""
    from qwen2.data import Mixture

    long_docs = train.select(min_tokens=cfg.long_min_doc_tokens)
    if len(long_docs) == 0:
        raise ValueError(
            f"the corpus has no document of {cfg.long_min_doc_tokens}+ tokens for the "
            f"long-context stage; lower long_min_doc_tokens or add longer documents"
        )
    sources = {"long": long_docs, "all": train}
    sources.update({k: v for k, v in (("tasks", task_docs), ("long_tasks", long_tasks)) if v is not None})
    share = cfg.task_share if len(sources) > 2 else 0.0
    weights = {"long": cfg.long_mix * (1 - share), "all": (1 - cfg.long_mix) * (1 - share)}
    weights.update({k: share / (len(sources) - 2) for k in sources if k not in weights})
    return Mixture(sources, weights)


@torch.no_grad()
def per_position_loss(model, val, seq_len: int, rows: int = 32, bins: int = 32) -> dict:
    """Mean held-out next-token loss by position (in `bins` equal buckets) over `rows` rows of `seq_len`."""
    from qwen2.data import PackedLoader

    longest = val.select(min_tokens=seq_len + 1)
    data = longest if len(longest) >= 1 else val
    batch = next(PackedLoader(data, seq_len, rows, seed=0, shuffle=False))["input_ids"]
    model.eval()
    batch = batch.to(model.output_weight.device)
    losses = token_losses(model, batch[:, :-1], batch[:, 1:])
    model.train()
    per_pos = losses.mean(0).cpu()  # [T]
    width = seq_len // bins
    return {
        "seq_len": seq_len,
        "rope_theta": model.config.rope_theta,
        "bin_width": width,
        "positions": [i * width + width // 2 for i in range(bins)],
        "loss": [float(per_pos[i * width : (i + 1) * width].mean()) for i in range(bins)],
        "mean": float(per_pos.mean()),
    }


class _Budget:
    """A stage's time budget, as `Trainer.fit`'s on_step: measures the step time for the first tenth
    of the budget (at least `calib` steps after the first, which pays one-off costs), then fixes the
    stage's step count, and so its cosine decay, in trainer.meta["plan"] (kept in checkpoints). If
    the machine then slows down, the stage ends at the deadline instead of overrunning the budget.
    Under torchrun rank 0's clock decides for every rank (they must agree on the step count)."""

    def __init__(self, key: str, seconds: float, calib: int):
        self.key, self.seconds, self.calib = key, seconds, calib
        self.t0, self.first = time.perf_counter(), None

    def _decide(self, trainer) -> int | None:
        """The stage's last step (the current one: out of time), or None: no decision this step."""
        now = time.perf_counter()
        if now - self.t0 >= self.seconds:
            return trainer.step
        if self.first is None:
            self.first = (trainer.step, now)
            return None
        done = trainer.step - self.first[0]
        calibrated = done >= self.calib and now - self.t0 >= 0.1 * self.seconds
        if self.key not in trainer.meta["plan"] and calibrated:
            per_step = (now - self.first[1]) / done
            return trainer.step + max(1, int(0.97 * (self.seconds - (now - self.t0)) / per_step))
        return None

    def __call__(self, trainer, metrics):
        plan = trainer.meta.setdefault("plan", {})
        end = self._decide(trainer) if trainer.rank == 0 else None
        if dist.is_initialized():
            msg = torch.tensor([-1 if end is None else end], dtype=torch.int64, device=trainer.device)
            dist.broadcast(msg, 0)
            end = None if int(msg) < 0 else int(msg)
        if end is None:
            return None
        plan[self.key] = end
        return False if end <= trainer.step else end


def run_pretrain(cfg: PretrainConfig, resume: bool = True, allow_changed: bool = False) -> dict:
    """Run (or resume) the whole pre-training; returns a summary (also written to run_dir/summary.json)."""
    from qwen2.data import PackedLoader
    from qwen2.model import build_model
    from qwen2.tokenizer.bpe import load_tokenizer

    t0 = time.perf_counter()
    run_dir = Path(cfg.out)
    rank, world, device = init_distributed()
    files = corpus_files(cfg)
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        if not resume:
            clear_run(run_dir)
        tok_dir = prepare_tokenizer(cfg, run_dir, files)
    _barrier()
    tok_dir = prepare_tokenizer(cfg, run_dir, files) if rank else tok_dir
    tok = load_tokenizer(tok_dir)
    if rank == 0:
        prepare_data(cfg, tok, run_dir, files)
        for stage in ("pretrain", "long"):
            prepare_tasks(cfg, tok, run_dir, stage)
    _barrier()
    train, val = prepare_data(cfg, tok, run_dir, files)
    task_docs = {stage: prepare_tasks(cfg, tok, run_dir, stage) for stage in ("pretrain", "long")}
    t_data = time.perf_counter() - t0

    mcfg = model_config(cfg.model, len(tok)).replace(
        rope_theta=cfg.rope_theta,
        bos_token_id=tok.endoftext_id,
        eos_token_id=tok.endoftext_id,
        max_position_embeddings=max(cfg.long_seq_len, 4096),
    )
    torch.manual_seed(cfg.seed)
    model = build_model(mcfg, device=device, seed=cfg.seed)
    trainer = Trainer(model, cfg.train_config("pretrain"), run_dir, stage="pretrain")

    def packed(data, seq_len: int, batch_size: int):
        return PackedLoader(data, seq_len, batch_size, rank, world, seed=cfg.seed, spread=cfg.spread)

    loader = packed(stage1_mixture(cfg, train, task_docs["pretrain"]), cfg.seq_len, cfg.batch_size)
    long_data = long_mixture(cfg, train, task_docs["pretrain"], task_docs["long"])
    long_loader = packed(long_data, cfg.long_seq_len, cfg.long_batch_size)

    def begin_long_stage():
        """RoPE base 10^4 -> 10^6 on the plain Qwen2 (trainer.model: under DDP / FSDP2 the wrappers
        hold it; its rotary tables are not parameters, so nothing is re-sharded), then the stage."""
        trainer.model.set_rope_theta(cfg.long_rope_theta)
        trainer.begin_stage("long", cfg.train_config("long"))

    ckpt = latest_checkpoint(run_dir) if resume else None
    info = read_trainer_info(ckpt) if ckpt else {"stage": "pretrain", "step": 0, "meta": {}}
    stage, plan = info["stage"], info.get("meta", {}).get("plan", {})
    finished = stage == "long" and info["step"] >= plan.get("long", float("inf"))
    if finished and (run_dir / "summary.json").is_file():
        if rank == 0:
            print(
                f"{run_dir} holds a finished run (step {info['step']}): writing its report again; "
                f"pass --no-resume (or another --out) to train from scratch"
            )
        trainer.close()
        if rank:
            return {}
        return {**json.loads((run_dir / "summary.json").read_text()), "finished_before": True}
    if stage == "long":  # its settings now; the step, its start and the optimizer come from the checkpoint
        begin_long_stage()
    if ckpt is not None:
        load_checkpoint(
            trainer, long_loader if stage == "long" else loader, ckpt, allow_changed=allow_changed
        )
        if rank == 0:
            print(f"resuming {run_dir} from {ckpt.name} (stage {stage}); --no-resume starts over")
    plan = trainer.meta.setdefault("plan", {})
    # Time kept back for what follows training: per-position losses, export, report and samples.
    reserve = max(20.0, 0.03 * cfg.minutes * 60)

    def eval_batches(data, seq_len, bs):
        def batches():
            held_out = PackedLoader(data, seq_len, bs, rank, world, seed=0, shuffle=False)
            return [next(held_out) for _ in range(cfg.eval_batches)]

        return batches

    def stage_end(key: str, share: float, calib: int, fixed_end: int):
        """(end_step, on_step): the planned end, or open-ended under a time budget, or `fixed_end`."""
        if key in plan:
            return plan[key], None
        if not cfg.minutes:
            plan[key] = fixed_end
            return fixed_end, None
        left = cfg.minutes * 60 - (time.perf_counter() - t0) - reserve
        return None, _Budget(key, max(1.0, left * share), calib)

    # ---- stage 1 ----
    if stage == "pretrain":
        end, budget = stage_end("pretrain", 1 - cfg.long_fraction, min(3, cfg.warmup_steps), cfg.steps)
        trainer.fit(
            next_token_loss,
            loader,
            end_step=end,
            on_step=budget,
            eval_batches=eval_batches(val, cfg.seq_len, cfg.batch_size),
            desc="pretrain",
        )
        plain = trainer.full_model()
        if rank == 0:
            _write_json(run_dir / "long_context_before.json", per_position_loss(plain, val, cfg.long_seq_len))
        begin_long_stage()
    end, budget = stage_end("long", 1.0, min(2, cfg.long_warmup_steps), trainer.stage_start + cfg.long_steps)
    last = trainer.fit(
        next_token_loss,
        long_loader,
        end_step=end,
        on_step=budget,
        desc="long-context",
        eval_batches=eval_batches(val, cfg.long_seq_len, cfg.long_batch_size),
    )
    summary = {}
    plain = trainer.full_model()
    if rank == 0:
        _write_json(run_dir / "long_context_after.json", per_position_loss(plain, val, cfg.long_seq_len))
        export(plain, tok_dir, run_dir / "model")
        train_seconds = round(time.perf_counter() - t0 - t_data, 1)
        summary = {
            "steps": trainer.step,
            "plan": plan,
            "tokens": trainer.tokens,
            "final": last,
            "data_seconds": round(t_data, 1),
            "train_seconds": train_seconds,
            "model": str(run_dir / "model"),
            "config": cfg.__dict__,
        }
        _write_json(run_dir / "summary.json", summary)
    trainer.close()
    _barrier()
    return summary


# Sampling defaults written beside a model trained from scratch (the report's samples use the same), so
# `qwen2 generate` / `qwen2 chat` sample instead of falling into greedy decoding's loops.
GENERATION_DEFAULTS = {"do_sample": True, "temperature": 0.7, "top_k": 40}


def export(model, tok_dir: Path, out: Path) -> Path:
    """The final model in the Hugging Face layout, with the tokenizer's files beside it (checkpoint's
    SIDE_FILES), and a generation_config.json (GENERATION_DEFAULTS, stopping at <|endoftext|>) unless
    the tokenizer has one."""
    from qwen2.checkpoint import copy_side_files, save_model
    from qwen2.tokenizer.bpe import load_tokenizer

    save_model(model, out)
    copy_side_files(tok_dir, out)
    if not (out / "generation_config.json").is_file():
        eot = load_tokenizer(tok_dir).endoftext_id
        _write_json(
            out / "generation_config.json", {**GENERATION_DEFAULTS, "bos_token_id": eot, "eos_token_id": eot}
        )
    return out


def _write_json(path: Path, obj) -> None:
    from qwen2.files import atomic_write_text

    atomic_write_text(path, json.dumps(obj, indent=2, default=str) + "\n")
