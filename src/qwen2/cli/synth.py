"""`qwen2 synth <pipeline>`: post-training data synthesis (paper section 4.1-4.2) with our model
in-process or any OpenAI-compatible server. Thin: parses the flags and calls one qwen2.synth function;
prints the run's manifest. `python -m qwen2.cli.synth ...` runs it on its own as well."""

from __future__ import annotations

import argparse
import json
import sys


def _backend(p):
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="checkpoint folder, run in-process")
    src.add_argument(
        "--base-url", help="an OpenAI-compatible server (ours, vLLM, SGLang), e.g. http://127.0.0.1:8000/v1"
    )
    p.add_argument("--api-key", default=None, help="bearer token for --base-url")
    p.add_argument(
        "--tokenizer", default=None, help="tokenizer folder (default: the checkpoint's / built-in Qwen2)"
    )
    p.add_argument("--concurrency", type=int, default=8, help="requests in flight against --base-url")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per request before it is retried")
    p.add_argument("--retries", type=int, default=6, help="retries per request on 429 / 5xx / timeouts")
    p.add_argument(
        "--chunk",
        type=int,
        default=None,
        help="items per round of requests, at most this many redone after a kill (default: 2 x --concurrency,"
        " so a round keeps every request slot busy)",
    )
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--max-tokens", type=int, default=512)


def _io(p):
    p.add_argument("input", help="input JSONL (one item a line)")
    p.add_argument(
        "--out", required=True, help="output folder: log.jsonl (resumable), outputs, manifest.json"
    )


def add_parser(sub):
    p = sub.add_parser(
        "synth", help="synthesize post-training data (rejection sampling, execution feedback, ...)"
    )
    s = p.add_subparsers(dest="pipeline", required=True)

    r = s.add_parser(
        "rejection", help="math: k samples per problem, keep those reaching the reference answer"
    )
    _io(r), _backend(r)
    r.add_argument("--k", type=int, default=8, help="samples per problem")
    r.add_argument("--checker", default="gsm8k", choices=["gsm8k", "math"])
    r.add_argument("--keep", default="all", choices=["all", "shortest"])
    r.add_argument("--temperature", type=float, default=0.8)
    r.add_argument("--top-p", type=float, default=0.95)

    e = s.add_parser("execution", help="code: solutions run against tests in the sandbox, failures retried")
    _io(e), _backend(e)
    e.add_argument("--feedback-retries", type=int, default=2, help="rounds of feeding a failure back")
    e.add_argument("--temperature", type=float, default=0.2)
    e.add_argument("--run-timeout", type=float, default=10.0, help="sandbox seconds per program")
    e.add_argument(
        "--constraints",
        action="store_true",
        help="instruction following: items carry 'constraints' checked by code instead of tests",
    )
    e.add_argument("--k", type=int, default=4, help="samples per instruction with --constraints")

    v = s.add_parser("evolve", help="deepen / broaden instructions; drop refusals, copies, too-short ones")
    _io(v), _backend(v)
    v.add_argument("--ops", default="deepen,broaden", help="comma-separated: deepen,broaden")
    v.add_argument("--rounds", type=int, default=1)
    v.add_argument("--temperature", type=float, default=0.7)
    v.add_argument("--min-words", type=int, default=5)

    t = s.add_parser("tag", help="InsTag: fine-grained intent tags per instruction, by the model, as JSON")
    _io(t), _backend(t)

    sel = s.add_parser("select", help="InsTag selection: tag coverage, then complexity, to a target size")
    _io(sel)
    sel.add_argument("--size", type=int, required=True, help="instructions to select")

    c = s.add_parser("constitutional", help="critique-and-revise against principles; original/revised pairs")
    _io(c), _backend(c)
    c.add_argument("--principles", default=None, help="principles text file (default: the built-in one)")
    c.add_argument("--temperature", type=float, default=0.7)

    d = s.add_parser(
        "decontaminate", help="drop items sharing a 13-gram (or a long substring) with eval sets"
    )
    _io(d)
    d.add_argument(
        "--eval-data", nargs="+", required=True, help="evaluation task files or folders (qwen2 eval --data)"
    )
    d.add_argument("--ngram", type=int, default=13)
    d.add_argument(
        "--min-chars", type=int, default=0, help="also drop on a common substring this long (0: off)"
    )
    p.set_defaults(func=run)
    return p


def run(a) -> int:
    if a.pipeline == "select":
        from qwen2.synth.tagging import select

        manifest = select(a.input, a.out, size=a.size)
    elif a.pipeline == "decontaminate":
        from qwen2.synth.decontaminate import decontaminate

        manifest = decontaminate(a.input, a.eval_data, a.out, n=a.ngram, min_chars=a.min_chars)
    else:
        from qwen2.eval.harness import EndpointError
        from qwen2.synth.runner import make_client

        try:
            backend = make_client(
                a.model or a.base_url,
                tokenizer=a.tokenizer,
                api_key=a.api_key,
                concurrency=a.concurrency,
                timeout=a.timeout,
                retries=a.retries,
            )
            common = dict(seed=a.seed, chunk=a.chunk or 2 * a.concurrency, max_tokens=a.max_tokens)
            manifest = _pipeline(a, backend, common)
        except EndpointError as e:
            print(f"qwen2 synth: error: {e}", file=sys.stderr)
            return 2
    print(json.dumps(manifest, indent=2))
    return 0


def _pipeline(a, backend, common):
    if a.pipeline == "rejection":
        from qwen2.synth.rejection import rejection

        return rejection(
            backend,
            a.input,
            a.out,
            k=a.k,
            checker=a.checker,
            keep=a.keep,
            temperature=a.temperature,
            top_p=a.top_p,
            **common,
        )
    if a.pipeline == "execution":
        from qwen2.synth.execution import execution, instructions

        if a.constraints:
            return instructions(backend, a.input, a.out, k=a.k, temperature=a.temperature, **common)
        return execution(
            backend,
            a.input,
            a.out,
            retries=a.feedback_retries,
            temperature=a.temperature,
            timeout=a.run_timeout,
            **common,
        )
    if a.pipeline == "evolve":
        from qwen2.synth.evolve import evolve

        return evolve(
            backend,
            a.input,
            a.out,
            ops=tuple(a.ops.split(",")),
            rounds=a.rounds,
            temperature=a.temperature,
            min_words=a.min_words,
            **common,
        )
    if a.pipeline == "tag":
        from qwen2.synth.tagging import tag

        return tag(backend, a.input, a.out, **common)
    from qwen2.synth.constitutional import constitutional

    return constitutional(
        backend, a.input, a.out, principles=a.principles, temperature=a.temperature, **common
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="qwen2")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["synth", *(sys.argv[1:] if argv is None else argv)])
    try:
        return args.func(args)
    except (FileNotFoundError, ValueError) as e:
        print(f"qwen2 synth: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
