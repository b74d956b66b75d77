"""`qwen2 <command>`: thin. Each command parses its arguments and calls one function.

Each subcommand lives in its own `_add_<name>` function that registers a parser and sets
`func`, a callable taking the parsed namespace. Imports of heavy modules happen inside `func`,
so `qwen2 --help` is instant. Errors a user can fix (`UserError`, `FileNotFoundError`,
`ValueError` from our checks) print one line and exit 2, never a traceback.
"""

from __future__ import annotations

import argparse
import sys


def _add_info(sub):
    p = sub.add_parser("info", help="print a checkpoint's or preset's config, parameter counts and KV-cache size")
    p.add_argument("path", help="a checkpoint directory (config.json) or a preset name such as 'Qwen2-7B'")

    def run(a):
        from qwen2.info import info

        print(info(a.path))

    p.set_defaults(func=run)


def _add_serve(sub):
    p = sub.add_parser("serve", help="serve a checkpoint over an OpenAI-compatible HTTP API (continuous batching)")
    p.add_argument("--model", required=True, help="checkpoint directory (config.json, safetensors, tokenizer files)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--served-model-name", default=None, help="the model id clients send (default: the folder name)")
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1 requests")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"], help="default: the checkpoint's")
    p.add_argument("--max-num-seqs", type=int, default=64, help="requests decoded together at most")
    p.add_argument("--max-num-batched-tokens", type=int, default=512, help="tokens per engine step (prefill chunk)")
    p.add_argument("--max-model-len", type=int, default=None, help="prompt + output at most (default: the config's)")

    def run(a):
        from qwen2.serve import serve

        serve(a.model, host=a.host, port=a.port, served_model_name=a.served_model_name, api_key=a.api_key,
              dtype=a.dtype, max_num_seqs=a.max_num_seqs, max_num_batched_tokens=a.max_num_batched_tokens,
              max_model_len=a.max_model_len)

    p.set_defaults(func=run)


def _add_tokenizer(sub):
    p = sub.add_parser("tokenizer", help="tokenizer tools: train a Qwen2-style byte-level BPE")
    tsub = p.add_subparsers(dest="tokenizer_command", required=True)
    t = tsub.add_parser("train", help="train byte-level BPE (Qwen2's pre-tokenizer) and write a checkpoint's tokenizer files")
    t.add_argument("--input", nargs="+", required=True, metavar="FILES", help="text files, or directories read recursively")
    t.add_argument("--vocab-size", type=int, required=True, help="all ids, the 3 control tokens included")
    t.add_argument("--out", required=True, help="directory for tokenizer.json, vocab.json, merges.txt, tokenizer_config.json")

    def run(a):
        from qwen2.tokenizer_train import train_tokenizer

        train_tokenizer(a.input, a.vocab_size, a.out)

    t.set_defaults(func=run)


# Registered subcommands, in the order `--help` lists them. Add yours here.
COMMANDS = [_add_info, _add_serve, _add_tokenizer]


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
    except (FileNotFoundError, NotADirectoryError, ValueError) as e:
        print(f"qwen2 {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
