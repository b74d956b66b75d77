"""`qwen2 eval`: run evaluation tasks (paper section 5) on a checkpoint or an OpenAI-compatible server.

Thin: parses the flags and calls qwen2.eval.harness.evaluate. `python -m qwen2.cli.eval ...` runs it
on its own as well.
"""

from __future__ import annotations

import argparse
import json
import sys


def add_parser(sub):
    p = sub.add_parser(
        "eval", help="evaluate a checkpoint or an OpenAI-compatible endpoint on benchmark tasks"
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="checkpoint folder (config.json, *.safetensors, tokenizer files)")
    src.add_argument("--base-url", help="an OpenAI-compatible server, e.g. http://127.0.0.1:8000/v1")
    p.add_argument("--api-key", default=None, help="bearer token for --base-url")
    p.add_argument(
        "--tokenizer",
        default=None,
        help="tokenizer folder for --base-url (default: the built-in Qwen2 tokenizer)",
    )
    p.add_argument(
        "--tasks",
        required=True,
        help="comma-separated: mmlu,arc_challenge,hellaswag,ceval,cmmlu,"
        "gsm8k,math,humaneval,mbpp,perplexity,needle",
    )
    p.add_argument(
        "--data", default=None, help="folder holding the tasks' data files (see each task's docstring)"
    )
    p.add_argument("--limit", type=int, default=None, help="score only the first N samples of each task")
    p.add_argument("--shots", type=int, default=None, help="few-shot count (default: the paper's per task)")
    p.add_argument(
        "--out", default="eval-out", help="output folder: results.json, report.md, samples/ (resumable)"
    )
    p.add_argument(
        "--samples",
        type=int,
        default=1,
        help="completions per problem for humaneval/mbpp: pass@k for k in 1,10,100 <= N (default 1, greedy)",
    )
    p.add_argument(
        "--temperature", type=float, default=0.8, help="sampling temperature with --samples > 1 (default 0.8)"
    )
    p.add_argument("--seed", type=int, default=1234, help="sampling seed with --samples > 1")
    p.add_argument("--batch-size", type=int, default=8, help="in-process batch size")
    p.add_argument("--concurrency", type=int, default=8, help="requests in flight against --base-url")
    p.set_defaults(func=run)
    return p


def run(a) -> int:
    from qwen2.eval.harness import EndpointError, evaluate

    try:
        results = evaluate(
            a.model or a.base_url,
            a.tasks,
            data_dir=a.data,
            limit=a.limit,
            shots=a.shots,
            out=a.out,
            tokenizer=a.tokenizer,
            api_key=a.api_key,
            concurrency=a.concurrency,
            batch_size=a.batch_size,
            samples=a.samples,
            temperature=a.temperature,
            seed=a.seed,
        )
    except EndpointError as e:  # the server is down or failing: one line, not a traceback
        print(f"qwen2 eval: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(results, indent=2))
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="qwen2")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["eval", *(sys.argv[1:] if argv is None else argv)])
    try:
        return args.func(args)
    except (FileNotFoundError, ValueError) as e:
        print(f"qwen2 eval: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
