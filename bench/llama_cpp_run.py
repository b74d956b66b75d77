"""llama.cpp's side of bench/decode.py, run by an interpreter that imports llama_cpp (llama-cpp-python built
from PyPI's source), never by this project's: it imports nothing of qwen2 and prints one JSON line.

    PY bench/llama_cpp_run.py quantize SRC.gguf DST.gguf q8_0|q4_k_m
    PY bench/llama_cpp_run.py decode MODEL.gguf --prompt IDS.json --tokens N --threads T

`decode` loads the model, runs the prompt through it in one batch (prefill tokens/s), then decodes greedily
(argmax of the last logits, as qwen2.generate's temperature 0) N tokens one at a time, timing the span
from the first token chosen to the last, the same (N - 1) steps bench/decode.py times for ours; the five
most likely ids after the prompt come back too, to check the file is the same model as ours. The weight
bytes one decode step reads are the tensors' bytes in the file (the output layer, or the tied embedding).
"""

import argparse
import ctypes
import json
import time

import llama_cpp
import numpy as np

# llama.cpp's file types (llama.h: LLAMA_FTYPE_MOSTLY_*)
FTYPES = {"q8_0": 7, "q4_k_m": 15}


def quantize(src: str, dst: str, kind: str) -> dict:
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = FTYPES[kind]
    t0 = time.perf_counter()
    rc = llama_cpp.llama_model_quantize(src.encode(), dst.encode(), ctypes.byref(params))
    if rc != 0:
        raise SystemExit(f"llama_model_quantize({src} -> {kind}) returned {rc}")
    return {"seconds": time.perf_counter() - t0}


def weight_bytes(path: str) -> int:
    """Bytes of the tensors a decode step reads: all but the embedding table (one row of it is read),
    unless the embedding is also the output layer (tied, no output.weight)."""
    from gguf import GGUFReader

    tensors = {t.name: int(t.n_bytes) for t in GGUFReader(path).tensors}
    if "output.weight" in tensors:
        tensors.pop("token_embd.weight", None)
    return sum(tensors.values())


def last_logits(llm, vocab: int) -> np.ndarray:
    """The last evaluated token's logits, read in place (without logits_all llama.cpp keeps that row only)."""
    return np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(vocab,))


def decode(path: str, prompt: list[int], n: int, threads: int) -> dict:
    llm = llama_cpp.Llama(
        model_path=path,
        n_ctx=len(prompt) + n + 16,
        n_batch=len(prompt),
        n_ubatch=len(prompt),
        n_threads=threads,
        n_threads_batch=threads,
        verbose=False,
    )
    llm.eval(prompt[:8])  # warm-up: first-call allocations
    llm.reset()
    t0 = time.perf_counter()
    llm.eval(prompt)
    prefill = len(prompt) / (time.perf_counter() - t0)
    vocab, tokens, times = llm.n_vocab(), [], []
    top5 = np.argsort(-last_logits(llm, vocab))[:5].tolist()
    for _ in range(n):
        tok = int(np.argmax(last_logits(llm, vocab)))
        times.append(time.perf_counter())
        tokens.append(tok)
        if len(tokens) < n:
            llm.eval([tok])
    return {
        "prefill": prefill,
        "decode": (n - 1) / (times[-1] - times[0]),
        "tokens": tokens,
        "top5": top5,
        "weight_bytes": weight_bytes(path),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    q = sub.add_parser("quantize")
    q.add_argument("src")
    q.add_argument("dst")
    q.add_argument("kind", choices=sorted(FTYPES))
    d = sub.add_parser("decode")
    d.add_argument("model")
    d.add_argument("--prompt", required=True, help="a JSON file with the prompt's token ids")
    d.add_argument("--tokens", type=int, required=True)
    d.add_argument("--threads", type=int, required=True)
    a = ap.parse_args()
    if a.cmd == "quantize":
        out = quantize(a.src, a.dst, a.kind)
    else:
        with open(a.prompt) as f:
            out = decode(a.model, json.load(f), a.tokens, a.threads)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
