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


# Registered subcommands, in the order `--help` lists them. Add yours here.
COMMANDS = [_add_info]


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
