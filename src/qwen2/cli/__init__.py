"""`qwen2 <command>`: thin. Each command parses its arguments and calls one function.

Each subcommand lives in its own `_add_<name>` function that registers a parser and sets
`func`, a callable taking the parsed namespace. Imports of heavy modules happen inside `func`,
so `qwen2 --help` is instant. Errors a user can fix (`FileNotFoundError`, `ValueError` from our
checks, a missing optional dependency: `qwen2.extras.MissingExtra`) print one line and exit 2, never
a traceback.
"""

from __future__ import annotations

import argparse
import sys

from qwen2.cli.eval import add_parser as _add_eval
from qwen2.cli.posttrain import add_parsers as _add_posttrain
from qwen2.cli.synth import add_parser as _add_synth
from qwen2.cli.upcycle import add_parser as _add_upcycle
from qwen2.extras import MissingExtra


def _add_info(sub):
    p = sub.add_parser(
        "info", help="print a checkpoint's or preset's config, parameter counts and KV-cache size"
    )
    p.add_argument("path", help="a checkpoint directory (config.json) or a preset name such as 'Qwen2-7B'")

    def run(a):
        from qwen2.cli.info import info

        print(info(a.path))

    p.set_defaults(func=run)


def _add_serve(sub):
    p = sub.add_parser(
        "serve", help="serve a checkpoint over an OpenAI-compatible HTTP API (continuous batching)"
    )
    p.add_argument(
        "--model", required=True, help="checkpoint directory (config.json, safetensors, tokenizer files)"
    )
    p.add_argument(
        "--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)"
    )
    p.add_argument("--port", type=int, default=8000)
    p.add_argument(
        "--served-model-name", default=None, help="the model id clients send (default: the folder name)"
    )
    p.add_argument(
        "--api-key",
        default=None,
        help="require 'Authorization: Bearer KEY' on /v1 requests (visible to local users: prefer "
        "--api-key-file or $QWEN2_API_KEY)",
    )
    p.add_argument("--api-key-file", default=None, help="read the API key from this file's first line")
    p.add_argument(
        "--check-finite", action="store_true", help="refuse a checkpoint with a NaN / Inf weight (names it)"
    )
    p.add_argument(
        "--allowed-host",
        action="append",
        default=[],
        metavar="NAME",
        help="a host name clients may use without an API key (repeatable; localhost and IPs always)",
    )
    p.add_argument(
        "--dtype", default=None, choices=["float32", "bfloat16", "float16"], help="default: the checkpoint's"
    )
    p.add_argument("--max-num-seqs", type=int, default=64, help="requests decoded together at most")
    p.add_argument(
        "--max-num-batched-tokens", type=int, default=512, help="tokens per engine step (prefill chunk)"
    )
    p.add_argument(
        "--max-model-len", type=int, default=None, help="prompt + output at most (default: the config's)"
    )

    p.add_argument(
        "--dual-chunk-attention",
        action="store_true",
        help="add Dual Chunk Attention to a checkpoint without it (4x its trained context; SPEC 3 defaults)",
    )
    # Per-request caps and deadlines: qwen2.serve.limits.Limits holds the defaults; a cap broken is a 400
    # naming its flag.
    limit_flags = {
        "max_pending": (int, "HTTP requests held at once, queued or generating (503 beyond; default 256)"),
        "max_body_bytes": (int, "request body size in bytes (413 beyond; default 4 MiB)"),
        "max_choices": (int, "prompts x n in one request (default 400)"),
        "max_messages": (int, "chat messages in one request"),
        "max_prompt_bytes": (int, "UTF-8 bytes of prompt / message text in one request"),
        "max_prompt_tokens": (int, "prompt tokens in one request, all prompts together"),
        "max_logprob_entries": (int, "response size: choices x scored tokens x (1 + top logprobs)"),
        "header_timeout": (float, "seconds a client has to send a request's headers"),
        "body_timeout": (float, "seconds a client has to send a request's body"),
        "shutdown_timeout": (float, "seconds SIGTERM waits for requests in flight before cancelling them"),
    }
    for name, (kind, help_) in limit_flags.items():
        p.add_argument("--" + name.replace("_", "-"), type=kind, default=None, help=help_)

    def run(a):
        from qwen2.serve import serve

        serve(
            a.model,
            host=a.host,
            port=a.port,
            served_model_name=a.served_model_name,
            api_key=a.api_key,
            api_key_file=a.api_key_file,
            allowed_hosts=tuple(a.allowed_host),
            limits={k: getattr(a, k) for k in limit_flags if getattr(a, k) is not None},
            dtype=a.dtype,
            dual_chunk_attention=a.dual_chunk_attention,
            check_finite=a.check_finite,
            max_num_seqs=a.max_num_seqs,
            max_num_batched_tokens=a.max_num_batched_tokens,
            max_model_len=a.max_model_len,
        )

    p.set_defaults(func=run)


def _add_tokenizer(sub):
    p = sub.add_parser("tokenizer", help="tokenizer tools: train a Qwen2-style byte-level BPE")
    tsub = p.add_subparsers(dest="tokenizer_command", required=True)
    t = tsub.add_parser(
        "train", help="train byte-level BPE (Qwen2's pre-tokenizer) and write a checkpoint's tokenizer files"
    )
    t.add_argument(
        "--input",
        nargs="+",
        required=True,
        metavar="FILES",
        help="text files, or directories read recursively",
    )
    t.add_argument("--vocab-size", type=int, required=True, help="all ids, the 3 control tokens included")
    t.add_argument(
        "--out",
        required=True,
        help="directory for tokenizer.json, vocab.json, merges.txt, tokenizer_config.json",
    )

    def run(a):
        from qwen2.tokenizer.train import train_tokenizer

        train_tokenizer(a.input, a.vocab_size, a.out)

    t.set_defaults(func=run)


def _sampling_flags(p, max_new_tokens: int):
    p.add_argument(
        "--check-finite", action="store_true", help="refuse a checkpoint with a NaN / Inf weight (names it)"
    )
    p.add_argument(
        "--dual-chunk-attention",
        action="store_true",
        help="add Dual Chunk Attention to a checkpoint without it (4x its trained context; SPEC 3 defaults)",
    )
    p.add_argument(
        "--model",
        default=None,
        help="checkpoint directory (default: runs/speedrun/model, the speedrun's output)",
    )
    p.add_argument(
        "--dtype", default=None, choices=["float32", "bfloat16", "float16"], help="default: the checkpoint's"
    )
    g = p.add_argument_group("sampling (defaults: the checkpoint's generation_config.json, else greedy)")
    g.add_argument("--max-new-tokens", type=int, default=max_new_tokens)
    g.add_argument("--temperature", type=float, default=None, help="0 = greedy")
    g.add_argument("--top-p", type=float, default=None)
    g.add_argument("--top-k", type=int, default=None, help="0 = off")
    g.add_argument("--min-p", type=float, default=None)
    g.add_argument("--repetition-penalty", type=float, default=None)
    g.add_argument("--presence-penalty", type=float, default=None)
    g.add_argument("--frequency-penalty", type=float, default=None)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--stop", action="append", default=None, metavar="TEXT", help="stop string (repeatable)")
    p.add_argument("--compile", action="store_true", help="compile the decode step with torch.compile")


def _add_generate(sub):
    p = sub.add_parser("generate", help="continue a prompt with a checkpoint, streaming the text to stdout")
    p.add_argument("--prompt", default=None, help="the prompt text (default: read stdin)")
    p.add_argument("--quiet", action="store_true", help="no timing line on stderr")
    _sampling_flags(p, max_new_tokens=256)

    def run(a):
        from qwen2.cli.commands import run_generate

        return run_generate(a)

    p.set_defaults(func=run)


def _add_chat(sub):
    p = sub.add_parser("chat", help="chat with a checkpoint in the terminal (ChatML; /reset, /exit)")
    p.add_argument(
        "--system",
        default=None,
        help="system prompt (default: Qwen2-Instruct's 'You are a helpful assistant.')",
    )
    _sampling_flags(p, max_new_tokens=1024)

    def run(a):
        from qwen2.cli.commands import run_chat

        return run_chat(a)

    p.set_defaults(func=run)


def _add_quantize(sub):
    p = sub.add_parser("quantize", help="write a weight-only int8 / int4 copy of a checkpoint")
    p.add_argument("--model", default=None, help="checkpoint directory (default: runs/speedrun/model)")
    p.add_argument("--out", required=True, help="new directory for the quantized checkpoint")
    p.add_argument("--bits", type=int, required=True, choices=[8, 4])
    p.add_argument("--group-size", type=int, default=128, help="int4: input channels per scale (default 128)")
    p.add_argument("--no-lm-head", action="store_true", help="keep the output layer in float")
    p.add_argument(
        "--check-finite", action="store_true", help="refuse a checkpoint with a NaN / Inf weight (names it)"
    )
    p.add_argument(
        "--dtype",
        default=None,
        choices=["float32", "bfloat16", "float16"],
        help="dtype of the scales and float layers (default: the checkpoint's)",
    )

    def run(a):
        from qwen2.cli.commands import run_quantize

        return run_quantize(a)

    p.set_defaults(func=run)


def _add_pretrain(sub):
    p = sub.add_parser(
        "pretrain",
        help="pre-train from a recipe (tokenizer, data, stage 1, long-context stage); torchrun-ready",
    )
    p.add_argument(
        "--config", help="a flat YAML recipe: `recipe: speedrun|pretrain` plus PretrainConfig fields"
    )
    p.add_argument("--out", help="run folder (overrides the recipe's `out`)")
    p.add_argument(
        "--allow-changed",
        action="store_true",
        help="resume although hyper-parameters changed (recorded in the checkpoint's meta); default: refuse",
    )
    p.add_argument(
        "--no-resume", action="store_true", help="start over instead of resuming the newest checkpoint"
    )

    def run(a):
        from qwen2.train.recipes import PretrainConfig, load_recipe, override, pretrain
        from qwen2.train.speedrun import pretrain_and_report

        cfg = load_recipe(a.config) if a.config else pretrain()
        if not isinstance(cfg, PretrainConfig):
            name = type(cfg).__name__
            raise ValueError(f"{a.config}: a {name} recipe runs with its own command, not pretrain")
        if a.out:
            cfg = override(cfg, {"out": a.out})
        report = pretrain_and_report(cfg, resume=not a.no_resume, allow_changed=a.allow_changed)
        if report:
            print(
                f"model: {report['model']}  report: {cfg.out}/report.md  "
                f"final loss {report['final_loss']:.3f}"
            )

    p.set_defaults(func=run)


def _add_speedrun(sub):
    p = sub.add_parser(
        "speedrun", help="train a tokenizer and a small Qwen2 on a CPU in a time budget, with a report"
    )
    p.add_argument("--minutes", type=float, default=30.0, help="time budget for the whole run (default 30)")
    p.add_argument(
        "--out",
        default="runs/speedrun",
        help="run folder; the model goes to OUT/model (default runs/speedrun)",
    )
    p.add_argument(
        "--corpus",
        help="a folder of text / JSONL / parquet to train on (default: the Python standard library)",
    )
    p.add_argument(
        "--stages",
        default=None,
        help="comma-separated subset of pretrain,synth,sft,reward,dpo,online-dpo,eval,needle (default: all)",
    )
    p.add_argument(
        "--moe",
        action="store_true",
        help="also upcycle the pre-trained model to a small MoE and train it on (+10%% of --minutes)",
    )
    p.add_argument(
        "--allow-changed", action="store_true", help="resume although hyper-parameters changed (recorded)"
    )
    p.add_argument(
        "--no-resume", action="store_true", help="start over instead of resuming the newest checkpoint"
    )

    def run(a):
        from qwen2.train.speedrun import STAGES, speedrun

        if a.minutes <= 0:
            raise ValueError(f"--minutes must be positive, got {a.minutes}")
        stages = [x.strip() for x in a.stages.split(",") if x.strip()] if a.stages else list(STAGES)
        if a.moe and "moe" not in stages:
            stages.insert(1, "moe")
        report = speedrun(
            a.minutes, a.out, a.corpus, resume=not a.no_resume, stages=stages, allow_changed=a.allow_changed
        )
        if report:
            from pathlib import Path

            from qwen2.cli.commands import DEFAULT_MODEL

            wall = report.get("recipe_seconds") or report["wall_seconds"]
            print(
                f"speedrun done in {wall / 60:.1f} min: final held-out loss "
                f"{report['final_eval_loss']:.3f}, {report['tokens_per_s']:.0f} tokens/s, "
                f"MFU {100 * report['mfu']:.1f}%"
            )
            print(f"model: {report['model']}  report: {a.out}/report.md  loss curve: {report['loss_png']}")
            same = Path(report["model"]).resolve() == Path(DEFAULT_MODEL).resolve()
            print(
                "try: qwen2 generate --prompt 'def main():'" + ("" if same else f" --model {report['model']}")
            )
            if "recipe" in report:
                final = Path(a.out) / "posttrain" / "online-dpo" / "model"
                print(f"the post-trained model: qwen2 chat --model {final}  (report card: {a.out}/report.md)")

    p.set_defaults(func=run)


# Registered subcommands, in the order `--help` lists them. Add yours here.
COMMANDS = [
    _add_info,
    _add_generate,
    _add_chat,
    _add_quantize,
    _add_serve,
    _add_tokenizer,
    _add_pretrain,
    _add_speedrun,
    _add_posttrain,
    _add_upcycle,
    _add_eval,
    _add_synth,
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qwen2", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for add in COMMANDS:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        rc = args.func(args)
    except (OSError, ValueError, MissingExtra) as e:  # OSError: missing files, a full disk, ...
        print(f"qwen2 {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return int(rc or 0)
