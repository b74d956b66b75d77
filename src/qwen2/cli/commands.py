"""The terminal front ends of generation: `qwen2 generate`, `qwen2 chat` and `qwen2 quantize`.

cli.py parses the flags and calls `run_generate` / `run_chat` / `run_quantize` here. Errors a user can
fix are raised as ValueError / FileNotFoundError with one line naming the path and the fix; cli.main
prints them without a traceback.

Chat keeps the conversation as messages and renders it with qwen2.tokenizer.chat (ChatML, Qwen2-Instruct's
default system prompt unless --system). Each turn reuses the KV cache of everything said so far when
the new rendering extends the old one token for token, so only the new user turn is prefilled.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

DEFAULT_MODEL = "runs/speedrun/model"
DTYPES = {
    "float32": "float32",
    "fp32": "float32",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    "float16": "float16",
    "fp16": "float16",
}


# Files of a checkpoint folder that are not weights, copied by `qwen2 quantize`.
def model_dir(path: str | None) -> Path:
    """The checkpoint folder to use, with an error that says what to do when it is not there."""
    d = Path(path or DEFAULT_MODEL)
    if not d.exists():
        if path is None:
            raise FileNotFoundError(
                f"no model at {d} (the speedrun's output): train one with `qwen2 speedrun`, "
                "or pass --model DIR"
            )
        raise FileNotFoundError(f"{d}: no such model directory")
    if not d.is_dir():
        raise NotADirectoryError(f"{d}: not a directory (expected a Hugging Face model folder)")
    if not (d / "config.json").is_file():
        raise FileNotFoundError(f"{d}: no config.json; not a Qwen2 checkpoint folder")
    return d


def load(path: str | None, dtype: str | None, dual_chunk_attention: bool = False, check_finite: bool = False):
    """(model, tokenizer, directory) for a checkpoint folder; dtype None = the checkpoint's own."""
    import torch

    from qwen2.checkpoint import load_model
    from qwen2.tokenizer.bpe import load_tokenizer

    d = model_dir(path)
    tokenizer = load_tokenizer(d)
    model = load_model(
        d,
        dtype=getattr(torch, DTYPES[dtype]) if dtype else None,
        dual_chunk_attention=dual_chunk_attention,
        check_finite=check_finite,
    )
    tokenizer.check_vocab(model.config.vocab_size)
    return model, tokenizer, d


def sampling_params(args, d: Path, tokenizer, chat: bool):
    """The checkpoint's generation_config.json, overridden by the flags the user gave."""
    from qwen2.sampling import SamplingParams

    params = SamplingParams.from_generation_config(
        d,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        min_p=args.min_p,
        repetition_penalty=args.repetition_penalty,
        presence_penalty=args.presence_penalty,
        frequency_penalty=args.frequency_penalty,
        seed=args.seed,
        max_new_tokens=args.max_new_tokens,
    )
    stops = set(params.stop_token_ids)
    if not stops and tokenizer.eos_token_id is not None:
        stops.add(tokenizer.eos_token_id)
    if chat:  # a reply ends at <|im_end|> whatever the config says (and at <|endoftext|>)
        stops |= {tokenizer.im_end_id, tokenizer.endoftext_id}
    return params.replace(stop_token_ids=sorted(stops), stop=list(args.stop or []))


def _stats(gen) -> str:
    return (
        f"[{gen.prompt_tokens} prompt tokens in {gen.prefill_seconds:.2f}s; {gen.decode_tokens} new tokens, "
        f"{gen.decode_tokens_per_second:.1f} tokens/s]"
    )


def run_generate(args) -> int:
    from qwen2.generation import generate, texts_of

    prompt = args.prompt if args.prompt is not None else sys.stdin.read()
    if not prompt:
        raise ValueError("empty prompt: pass --prompt TEXT or pipe text on stdin")
    model, tokenizer, d = load(args.model, args.dtype, args.dual_chunk_attention, args.check_finite)
    params = sampling_params(args, d, tokenizer, chat=False)
    ids = tokenizer.encode(prompt)
    gen = generate(model, ids, params=params, tokenizer=tokenizer, compile=args.compile)
    for piece in texts_of(gen):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    sys.stdout.flush()
    if not args.quiet:
        print(_stats(gen), file=sys.stderr)
    return 0


def run_chat(args) -> int:
    from qwen2.generation import ChatSession
    from qwen2.sampling import check_prompt
    from qwen2.tokenizer.chat import DEFAULT_SYSTEM_PROMPT, encode_chat

    model, tokenizer, d = load(args.model, args.dtype, args.dual_chunk_attention, args.check_finite)
    params = sampling_params(args, d, tokenizer, chat=True)
    system = args.system if args.system is not None else DEFAULT_SYSTEM_PROMPT
    session = ChatSession(model, tokenizer, params, compile=args.compile)
    messages: list[dict] = []
    tty = sys.stdin.isatty()
    if tty:
        try:
            import readline  # noqa: F401  (line editing and history for input())
        except ImportError:
            pass
        print(
            f"qwen2 chat: {d} ({model.config.num_hidden_layers} layers). /reset clears the conversation, "
            "/exit quits.",
            file=sys.stderr,
        )
    while True:
        try:
            line = input(">>> " if tty else "")
        except EOFError:
            break
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            break
        if text == "/reset":
            messages.clear()
            session.reset()
            print("(conversation cleared)", flush=True)
            continue
        messages.append({"role": "user", "content": line})
        ids, _ = encode_chat(tokenizer, messages, add_generation_prompt=True, system_prompt=system)
        try:
            check_prompt(
                ids, context=model.config.max_position_embeddings, vocab_size=model.config.vocab_size
            )
        except ValueError as e:  # the turn is dropped; the conversation so far stays usable
            messages.pop()
            print(f"error: {e} (or /reset to start over)", file=sys.stderr, flush=True)
            continue
        reply = []
        try:
            for piece in session.reply(ids):
                reply.append(piece)
                sys.stdout.write(piece)
                sys.stdout.flush()
        except KeyboardInterrupt:
            sys.stdout.write(" [interrupted]")
        sys.stdout.write("\n")
        gen = session.last
        print(f"[{gen.decode_tokens} tokens, {gen.decode_tokens_per_second:.1f} tokens/s]", flush=True)
        messages.append({"role": "assistant", "content": "".join(reply)})
    return 0


def run_quantize(args) -> int:
    import torch

    from qwen2.checkpoint import copy_side_files, load_model, save_model
    from qwen2.files import atomic_dir
    from qwen2.quantize import quantize_model

    src = model_dir(args.model)
    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"{out}: exists and is not empty; choose a new --out directory")
    model = load_model(
        src, dtype=getattr(torch, DTYPES[args.dtype]) if args.dtype else None, check_finite=args.check_finite
    )
    t0 = time.perf_counter()
    quantize_model(model, bits=args.bits, group_size=args.group_size, lm_head=not args.no_lm_head)
    with atomic_dir(out) as tmp:  # an interrupted run leaves no half-written checkpoint
        save_model(model, tmp)
        copy_side_files(src, tmp)
    size = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    spec = json.loads((out / "config.json").read_text())["quantization"]
    print(
        f"wrote {out}: int{args.bits} ({spec}), {size / 1e6:.1f} MB of safetensors in "
        f"{time.perf_counter() - t0:.1f}s"
    )
    return 0
