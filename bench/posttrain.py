"""Post-training throughput: our SFT / DPO steps vs TRL's SFTTrainer / DPOTrainer, same run, same data.

One random-weight Qwen2 (hidden 256, 4 layers, 4 query heads, 2 KV heads, intermediate 704, tied
embeddings, the real tokenizer's 151,646-row vocabulary unless --vocab) is saved with save_model and loaded
by transformers' Qwen2ForCausalLM for TRL, so both sides start from the same weights. Data: --conversations
synthetic multi-turn chats (a system prompt, then arithmetic word problems from data.tasks with worked
answers), tokenized once by our tokenizer and given to both sides as the same token ids (TRL receives
pre-tokenized rows, so its tokenization, which is setup, is skipped). SFT trains on every assistant turn
(encode_sft's mask; TRL: completion_only_loss over the same mask); DPO pairs end on the right answer (chosen)
vs a wrong one (rejected), sigmoid loss, beta 0.1.

Both sides: fp32 on the CPU, --threads threads, AdamW (lr, betas, eps equal; no weight decay), clip 1.0,
constant LR, batch --batch-size (DPO: pairs), no gradient accumulation, no packing (right-padded to the
longest row of the batch, the same rows in the same order), no gradient / activation checkpointing (TRL
turns it on by default; it is turned off here as ours is off).

Timing: TRL's step is timed from TrainerCallback.on_step_begin to on_step_end (forward, backward, clip,
optimizer and scheduler; its collation happens before on_step_begin); ours is Trainer.train_step on
prebuilt batches. The sides alternate step by step (ours runs inside TRL's on_step_end, outside TRL's timed
window), so machine noise hits both alike; the first --warmup steps of each side are not timed.
tokens/s = tokens of the batch's conversations (prompt and completion, no padding; the same count on both
sides, checked) / seconds of the timed steps. Reference log-probs precomputed once (ours: label_logps under
no_grad; TRL: precompute_ref_log_probs=True, its _precompute_ref_logps) cover the whole data set once; each
timed step is charged that time pro rata to its pairs (one epoch over the data pays it once, as a real run
does). Peak RSS: the largest rise of the process's RSS high-water mark over a step's starting RSS
(/proc/self/clear_refs resets the mark), max over the timed steps, per side: the step's working memory
(activations, logits), not the weights and optimizer state both hold.

The default data set is one epoch of the timed run (batch-size x (warmup + steps) conversations), so the
precompute is charged exactly once; a larger --conversations spreads it pro rata. The CPU fallback of TRL's
fused log-prob head (Triton runs only on CUDA / XPU) scores every position, prompt and padding included.

    .venv/bin/python bench/posttrain.py                  # ~4 min, 2 shared cores; docs/posttrain_bench.json
    .venv/bin/python bench/posttrain.py --trl-precompute # adds DPO with TRL's precompute_ref_log_probs=True
    .venv/bin/python bench/posttrain.py --steps 1 --warmup 0 --batch-size 1 --vocab 512   # smoke (~1.5 min)
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import random
import re
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import table  # noqa: E402
from qwen2.checkpoint import save_model  # noqa: E402
from qwen2.config import ModelConfig  # noqa: E402
from qwen2.data import tasks  # noqa: E402
from qwen2.data.conversations import encode_completion, encode_sft, pad, preference_batch  # noqa: E402
from qwen2.model import build_model  # noqa: E402
from qwen2.tokenizer.chat import encode_chat  # noqa: E402
from qwen2.train.loop import TrainConfig, Trainer  # noqa: E402
from qwen2.train.posttrain_losses import dpo_objective, label_logps, sft_loss  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SYSTEM = "You are a careful assistant. Work each word problem out step by step, then state the answer."
LR, BETAS, EPS = 1e-5, (0.9, 0.999), 1e-8


# ---- data ------------------------------------------------------------------------------------------
def worked(p: dict, answer: int | None = None) -> str:
    """A worked answer to an arithmetic problem; `answer` replaces the right result (a rejected reply)."""
    a, b = (int(x) for x in re.findall(r"\d+", p["question"])[:2])
    plus = "gets" in p["question"]
    ans = (a + b if plus else a - b) if answer is None else answer
    verb, op = ("adds", "+") if plus else ("takes away", "-")
    return f"It starts with {a}, then {verb} {b}: {a} {op} {b} = {ans}. So the answer is {ans}."


def conversations(n: int, seed: int, seq_len: int, tok) -> list[tuple[list[dict], dict, dict]]:
    """n (prompt, chosen, rejected): a system prompt, 1-3 solved problems as history, then a new question."""
    rng = random.Random(seed)
    probs = iter(tasks.problems(5 * n, seed, families=("arithmetic",)))
    out = []
    for _ in range(n):
        history = [next(probs) for _ in range(rng.randint(1, 3))]
        last = next(probs)
        while True:
            prompt = [{"role": "system", "content": SYSTEM}]
            for p in history:
                prompt += [
                    {"role": "user", "content": p["question"]},
                    {"role": "assistant", "content": worked(p)},
                ]
            prompt.append({"role": "user", "content": last["question"]})
            right = int(last["answer"])
            chosen = {"role": "assistant", "content": worked(last)}
            rejected = {
                "role": "assistant",
                "content": worked(last, right + rng.choice([-1, 1]) * rng.randint(1, 9)),
            }
            longest = max(len(encode_chat(tok, prompt + [m])[0]) for m in (chosen, rejected))
            if longest <= seq_len + 1 or not history:  # +1: the trailing newline is dropped below
                break
            history.pop()  # shorten to fit --seq-len
        out.append((prompt, chosen, rejected))
    return out


def ids_and_mask(tok, messages: list[dict], prompt: list[dict] | None = None) -> tuple[list[int], list[int]]:
    """ChatML ids and loss mask, without the newline after the last <|im_end|> (no loss there, and TRL's
    completion would include it): the mask covers every assistant turn, or only the reply after `prompt`."""
    ids, mask = encode_chat(tok, messages)
    if ids[-1] != tok.im_end_id and mask[-1] == 0:
        ids, mask = ids[:-1], mask[:-1]
    if prompt is not None:
        head = encode_chat(tok, prompt, add_generation_prompt=True)[0]
        mask = [0] * len(head) + mask[len(head) :]
        if ids[: len(head)] != head or not all(mask[len(head) :]):
            raise AssertionError("bench/posttrain.py: the reply is not exactly the tokens after the prompt")
    return ids, mask


def fold(ex: dict, vocab: int) -> dict:
    """--vocab smaller than the tokenizer: fold ids into the model's rows (the same ids on both sides)."""
    return {k: [i % vocab if i >= 0 else i for i in v] for k, v in ex.items()}


def build_data(tok, a) -> dict:
    """Our batches and TRL's pre-tokenized rows, from the same ids and the same loss masks."""
    convs = conversations(a.conversations, a.seed, a.seq_len, tok)
    pad_id = tok.pad_token_id % a.vocab
    sft_ours, sft_trl, pref_ours, pref_trl = [], [], [], []
    for prompt, chosen, rejected in convs:
        ids, mask = ids_and_mask(tok, prompt + [chosen])
        ex = encode_sft(tok, prompt + [chosen], max_len=len(ids) - 1)
        if ex["input_ids"] != ids[:-1]:
            raise AssertionError("bench/posttrain.py: encode_sft and encode_chat give different ids")
        sft_ours.append(fold(ex, a.vocab))
        sft_trl.append(fold({"input_ids": ids}, a.vocab) | {"completion_mask": mask})
        pair, row = [], {}
        for key, reply in (("chosen", chosen), ("rejected", rejected)):
            ids, mask = ids_and_mask(tok, prompt + [reply], prompt)
            n = mask.index(1)
            pair.append(fold(encode_completion(tok, prompt, [reply], max_len=len(ids) - 1), a.vocab))
            row |= fold({"prompt_ids": ids[:n], f"{key}_ids": ids[n:]}, a.vocab)
        pref_ours.append(tuple(pair))
        pref_trl.append(row)
    b = a.batch_size
    groups = [range(s, s + b) for s in range(0, len(convs) - b + 1, b)]
    if not groups:
        raise SystemExit(
            f"bench/posttrain.py: --conversations {a.conversations} < --batch-size {b}; raise it"
        )

    def tokens(examples):  # conversation tokens: the input plus the last target (no padding)
        return sum(len(e["input_ids"]) + 1 for e in examples)

    sft_batches = [(pad([sft_ours[i] for i in g], pad_id), tokens([sft_ours[i] for i in g])) for g in groups]
    pref_batches = [
        (preference_batch([pref_ours[i] for i in g], pad_id), tokens([x for i in g for x in pref_ours[i]]))
        for g in groups
    ]
    lengths = [len(r["input_ids"]) for r in sft_trl]

    def loss_share(batches):  # the fraction of conversation tokens that are targets of the loss
        return sum(int((x["labels"] != -100).sum()) for x, _ in batches) / sum(t for _, t in batches)

    return {
        "loss_share": {"sft": loss_share(sft_batches), "dpo": loss_share(pref_batches)},
        "sft": sft_batches,
        "dpo": pref_batches,
        "sft_trl": sft_trl[: len(groups) * b],
        "dpo_trl": pref_trl[: len(groups) * b],
        "lengths": (min(lengths), statistics.mean(lengths), max(lengths)),
    }


# ---- measurement helpers -----------------------------------------------------------------------------
def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1]) * 1024
    return 0


class Meter:
    """Per-step wall time and peak RSS rise of one side; the first `warmup` steps are dropped."""

    def __init__(self, warmup: int):
        self.warmup, self.times, self.tokens, self.rss, self._rss0 = warmup, [], [], [], 0
        self.n = 0

    def begin(self):
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset VmHWM to the current RSS
        except OSError:
            pass
        self._rss0 = _status("VmRSS")
        self._t0 = time.perf_counter()

    def end(self, tokens: int):
        dt = time.perf_counter() - self._t0
        self.n += 1
        if self.n > self.warmup:
            self.times.append(dt)
            self.tokens.append(tokens)
            self.rss.append(_status("VmHWM") - self._rss0)

    def result(self, charge_s: float = 0.0) -> dict:
        """charge_s: precompute seconds per timed step (pro rata)."""
        seconds = sum(self.times) + charge_s * len(self.times)
        return {
            "tokens": sum(self.tokens),
            "steps": len(self.times),
            "seconds": seconds,
            "step_s_median": statistics.median(self.times) if self.times else float("nan"),
            "step_s": [round(t, 3) for t in self.times],
            "precompute_s_per_step": charge_s,
            "tokens_per_s": sum(self.tokens) / seconds if seconds else float("nan"),
            "peak_rss_rise_mb": max(self.rss) / 2**20 if self.rss else None,
        }


def our_trainer(cfg: ModelConfig, seed: int, a) -> Trainer:
    model = build_model(cfg, seed=seed).train()
    tc = TrainConfig(
        batch_size=a.batch_size,
        lr=LR,
        warmup_steps=0,
        schedule="constant",
        weight_decay=0.0,
        beta1=BETAS[0],
        beta2=BETAS[1],
        eps=EPS,
        grad_clip=1.0,
    )
    return Trainer(model, tc, tempfile.mkdtemp(prefix="bench-posttrain-"))


def trl_args(cls, a, out_dir: str, **kw):
    return cls(
        output_dir=out_dir,
        per_device_train_batch_size=a.batch_size,
        gradient_accumulation_steps=1,
        max_steps=a.warmup + a.steps,
        max_length=a.seq_len,
        learning_rate=LR,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        adam_beta1=BETAS[0],
        adam_beta2=BETAS[1],
        adam_epsilon=EPS,
        max_grad_norm=1.0,
        gradient_checkpointing=False,
        bf16=False,
        use_cpu=True,
        report_to="none",
        logging_strategy="no",
        save_strategy="no",
        dataloader_num_workers=0,
        train_sampling_strategy="sequential",
        disable_tqdm=True,
        seed=a.seed,
        **kw,
    )


def hf_model(path: Path):
    from transformers import Qwen2ForCausalLM

    return Qwen2ForCausalLM.from_pretrained(
        str(path), dtype=torch.float32, attn_implementation="sdpa"
    ).train()


def run_trl(trainer, meter: Meter, ours_steps) -> None:
    """trainer.train() with its steps timed by callbacks; after each TRL step, one step of each of ours."""
    from transformers import TrainerCallback
    from transformers.trainer_callback import PrinterCallback

    step_tokens = []
    inner = trainer.training_step

    def counted(model, inputs, *args, **kw):  # the batch's conversation tokens (attention_mask: no padding)
        step_tokens.append(int(inputs["attention_mask"].sum()))
        return inner(model, inputs, *args, **kw)

    trainer.training_step = counted
    state = {"i": 0}

    class Timer(TrainerCallback):
        def on_step_begin(self, args, st, control, **kw):
            meter.begin()

        def on_step_end(self, args, st, control, **kw):
            meter.end(step_tokens[-1])
            for fn in ours_steps:
                fn(state["i"])
            state["i"] += 1

    trainer.add_callback(Timer())
    trainer.remove_callback(PrinterCallback)  # its end-of-run summary line
    trainer.train()


def our_step(trainer: Trainer, objective, batches, meter: Meter):
    def step(i):
        batch, tokens = batches[i % len(batches)]
        meter.begin()
        trainer.train_step(objective, [batch], total_steps=10**6)
        meter.end(tokens)

    return step


# ---- the benchmarks ----------------------------------------------------------------------------------
def bench_sft(cfg, ckpt, hf_tok, data, a) -> dict:
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    ours, theirs = Meter(a.warmup), Meter(a.warmup)
    trainer = our_trainer(cfg, a.seed, a)
    args = trl_args(SFTConfig, a, tempfile.mkdtemp(prefix="bench-trl-sft-"), completion_only_loss=True)
    trl = SFTTrainer(
        model=hf_model(ckpt),
        args=args,
        train_dataset=Dataset.from_list(data["sft_trl"]),
        processing_class=hf_tok,
    )
    run_trl(trl, theirs, [our_step(trainer, sft_loss, data["sft"], ours)])
    del trainer, trl
    gc.collect()
    return {"ours": ours.result(), "trl": theirs.result()}


def trl_dpo_class():
    """DPOTrainer given rows that are already {prompt_ids, chosen_ids, rejected_ids} (what its own
    tokenization produces, so the same ids as ours, also at a folded --vocab), timing its reference
    log-prob precompute (precompute_ref_log_probs=True; it runs in __init__) in `precompute_s`."""
    from trl import DPOTrainer

    class PreTokenizedDPO(DPOTrainer):
        precompute_s = 0.0

        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            return dataset

        def _precompute_ref_logps(self, dataset, name, batch_size):
            t0 = time.perf_counter()
            try:
                return super()._precompute_ref_logps(dataset, name, batch_size)
            finally:
                type(self).precompute_s += time.perf_counter() - t0

    return PreTokenizedDPO


def precompute_ours(reference, batches) -> tuple[list, float]:
    """Reference log-probs for every batch of the data set, once (label_logps under no_grad), after one
    untimed warm-up call (the steps get one too; with few batches a cold first call would dominate)."""
    out = []
    with torch.no_grad():
        first = batches[0][0]
        label_logps(reference, first["input_ids"], first["labels"], first.get("position_ids"))
        t0 = time.perf_counter()
        for batch, tokens in batches:
            ref = label_logps(reference, batch["input_ids"], batch["labels"], batch.get("position_ids"))
            out.append(({**batch, "ref_logps": ref}, tokens))
    return out, time.perf_counter() - t0


def bench_dpo(cfg, ckpt, hf_tok, data, a) -> dict:
    from datasets import Dataset
    from trl import DPOConfig

    dpo_cls = trl_dpo_class()
    trainer = our_trainer(cfg, a.seed, a)
    reference = copy.deepcopy(trainer.model).eval().requires_grad_(False)
    pre_batches, pre_s = precompute_ours(reference, data["dpo"])
    charge = pre_s / len(pre_batches)  # every batch is one step's pairs
    live_obj, pre_obj = dpo_objective(reference=reference, beta=0.1), dpo_objective(beta=0.1)
    res = {"ours_precompute_s": pre_s}

    # 1. TRL's default (a live reference model) vs ours with a live reference and with precomputed log-probs
    m_live, m_pre, m_trl = Meter(a.warmup), Meter(a.warmup), Meter(a.warmup)
    args = trl_args(DPOConfig, a, tempfile.mkdtemp(prefix="bench-trl-dpo-"), beta=0.1, loss_type=["sigmoid"])
    trl = dpo_cls(
        model=hf_model(ckpt),
        ref_model=hf_model(ckpt).eval(),
        args=args,
        train_dataset=Dataset.from_list(data["dpo_trl"]),
        processing_class=hf_tok,
    )
    run_trl(
        trl,
        m_trl,
        [our_step(trainer, live_obj, data["dpo"], m_live), our_step(trainer, pre_obj, pre_batches, m_pre)],
    )
    res["live"] = {"ours": m_live.result(), "trl": m_trl.result()}
    res["ours_pre_vs_trl_live"] = {"ours": m_pre.result(charge), "trl": m_trl.result()}
    del trl
    gc.collect()

    if a.trl_precompute:  # 2. both precompute the reference log-probs once
        m_pre2, m_trl2 = Meter(a.warmup), Meter(a.warmup)
        args = trl_args(
            DPOConfig,
            a,
            tempfile.mkdtemp(prefix="bench-trl-dpo-pre-"),
            beta=0.1,
            loss_type=["sigmoid"],
            precompute_ref_log_probs=True,
        )
        trl = dpo_cls(  # no ref_model: TRL scores the data set with the initial policy, then holds none
            model=hf_model(ckpt),
            args=args,
            train_dataset=Dataset.from_list(data["dpo_trl"]),
            processing_class=hf_tok,
        )
        trl_charge = dpo_cls.precompute_s / len(pre_batches)
        run_trl(trl, m_trl2, [our_step(trainer, pre_obj, pre_batches, m_pre2)])
        res["precomputed"] = {"ours": m_pre2.result(charge), "trl": m_trl2.result(trl_charge)}
        res["trl_precompute_s"] = dpo_cls.precompute_s
        del trl
    del trainer, reference
    gc.collect()
    return res


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=2, help="timed steps per side and workload")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps per side before the timed ones")
    ap.add_argument("--batch-size", type=int, default=2, help="conversations (DPO: pairs) per step")
    ap.add_argument("--seq-len", type=int, default=256, help="longest conversation (TRL max_length)")
    ap.add_argument(
        "--conversations",
        type=int,
        default=0,
        help="data set size (0: batch-size x (warmup + steps), one epoch; the precompute covers it all)",
    )
    ap.add_argument(
        "--vocab", type=int, default=0, help="model vocabulary rows (0: the tokenizer's, 151,646)"
    )
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--trl-precompute",
        action="store_true",
        help="also run DPO with TRL's precompute_ref_log_probs=True (about +60%% wall time)",
    )
    ap.add_argument("--only", choices=("sft", "dpo"), default=None, help="run one workload")
    ap.add_argument("--out", default=str(ROOT / "docs/posttrain_bench.json"))
    a = ap.parse_args(argv)
    os.environ.setdefault("TQDM_DISABLE", "1")
    warnings.filterwarnings("ignore")
    import datasets
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    datasets.disable_progress_bars()
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    import trl

    from qwen2.tokenizer.bpe import load_tokenizer
    from qwen2.tokenizer.save import save_tokenizer

    t_start = time.perf_counter()
    tok = load_tokenizer("Qwen2")
    a.vocab = a.vocab or len(tok)
    a.conversations = a.conversations or a.batch_size * (a.warmup + a.steps)
    tmp = Path(tempfile.mkdtemp(prefix="bench-posttrain-"))
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(save_tokenizer(tok, tmp / "tokenizer")))
    cfg = ModelConfig(
        vocab_size=a.vocab,
        hidden_size=256,
        intermediate_size=704,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
        max_position_embeddings=4096,
        torch_dtype="float32",
    )
    save_model(build_model(cfg, seed=a.seed), tmp / "model")  # the weights TRL's side loads
    hf_tok.pad_token_id = hf_tok.pad_token_id % a.vocab
    data = build_data(tok, a)

    results = {}
    if a.only in (None, "sft"):
        results["sft"] = bench_sft(cfg, tmp / "model", hf_tok, data, a)
    if a.only in (None, "dpo"):
        results["dpo"] = bench_dpo(cfg, tmp / "model", hf_tok, data, a)

    rows, record = [], []

    def add(name, pair):
        o, t = pair["ours"], pair["trl"]
        if o["tokens"] and t["tokens"] and abs(o["tokens"] - t["tokens"]) > 0:
            print(f"warning: {name}: ours trained {o['tokens']} tokens, TRL {t['tokens']} (expected equal)")
        ratio = o["tokens_per_s"] / t["tokens_per_s"]
        rss = lambda r: "n/a" if r["peak_rss_rise_mb"] is None else f"{r['peak_rss_rise_mb']:.0f}"  # noqa: E731
        rows.append(
            {
                "workload": name,
                "ours tok/s": f"{o['tokens_per_s']:.0f}",
                "TRL tok/s": f"{t['tokens_per_s']:.0f}",
                "ratio": f"{ratio:.2f}x",
                "ours step s": f"{o['step_s_median']:.3f}",
                "TRL step s": f"{t['step_s_median']:.3f}",
                "ours RSS MB": rss(o),
                "TRL RSS MB": rss(t),
            }
        )
        record.append({"workload": name, "ratio": ratio, "ours": o, "trl": t})

    if "sft" in results:
        add("SFT", results["sft"])
    if "dpo" in results:
        d = results["dpo"]
        add("DPO, live reference (both)", d["live"])
        add("DPO, ours precomputed ref vs TRL default", d["ours_pre_vs_trl_live"])
        if "precomputed" in d:
            add("DPO, precomputed ref (both)", d["precomputed"])
    lo, mean, hi = data["lengths"]
    share = data["loss_share"]
    print(
        f"config: hidden 256, 4 layers, vocab {a.vocab}, batch {a.batch_size}, {a.conversations} "
        f"conversations "
        f"of {lo}-{hi} tokens (mean {mean:.0f}; loss on {100 * share['sft']:.0f}% of them in SFT, "
        f"{100 * share['dpo']:.0f}% in DPO), fp32 cpu, {torch.get_num_threads()} threads; {a.warmup} warm-up "
        f"+ {a.steps} timed steps per side; trl {trl.__version__}, transformers {transformers.__version__}, "
        f"torch {torch.__version__}"
    )
    if "dpo" in results:
        d = results["dpo"]
        note = f"ours {d['ours_precompute_s']:.2f} s"
        if "trl_precompute_s" in d:
            note += f", TRL {d['trl_precompute_s']:.2f} s"
        print(f"reference log-probs precomputed over the data set ({len(data['dpo'])} batches): {note}")
    cols = [
        "workload",
        "ours tok/s",
        "TRL tok/s",
        "ratio",
        "ours step s",
        "TRL step s",
        "ours RSS MB",
        "TRL RSS MB",
    ]
    print(table(rows, cols))
    print("ratio = ours / TRL tokens/s (> 1: ours faster; target >= 1.3x); RSS MB: peak rise during a step")
    out = {
        "bench": "bench/posttrain.py",
        "argv": sys.argv[1:] if argv is None else list(argv),
        "config": {
            "hidden": 256,
            "layers": 4,
            "heads": 4,
            "kv_heads": 2,
            "intermediate": 704,
            "vocab": a.vocab,
            "batch_size": a.batch_size,
            "seq_len": a.seq_len,
            "conversations": a.conversations,
            "conversation_tokens": {"min": lo, "mean": mean, "max": hi},
            "loss_share": share,
            "steps": a.steps,
            "warmup": a.warmup,
            "threads": torch.get_num_threads(),
            "dtype": "float32",
            "device": "cpu",
            "lr": LR,
        },
        "versions": {
            "trl": trl.__version__,
            "transformers": transformers.__version__,
            "torch": torch.__version__,
        },
        "results": record,
        "precompute_s": {
            k: results["dpo"][k]
            for k in ("ours_precompute_s", "trl_precompute_s")
            if k in results.get("dpo", {})
        },
        "wall_s": time.perf_counter() - t_start,
    }
    path = Path(a.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(f"json: {path}  wall {out['wall_s']:.0f} s")
    return out


if __name__ == "__main__":
    main()
