"""Generation speed: prefill and decode tokens/s of ours vs transformers, int8/int4, the roofline, and
the perplexity change that weight-only quantization costs.

One random Qwen2-0.5B-shaped model (ModelConfig.preset, weights ~ N(0, 0.02)), same run, same weights:
- prefill: a 512-token prompt through ours (`prefill` into a static KV cache) and transformers (forward
  with its cache on), tokens/s;
- decode: greedy, a fixed number of new tokens after that prompt, no stop token. Ours: `qwen2.generate`
  (decode step compiled with --compile); transformers: `model.generate` (its default dynamic cache), the
  per-token time taken as (T(N tokens) - T(1 token)) / (N - 1), ours as the decode loop's own (N - 1) steps;
- fp32 and bf16 for both, int8 and int4 (group 128, output layer quantized too) for ours;
- ours runs its decode-time matrix-vector products through qwen2.kernels.ops where it builds (the run
  prints which; QWEN2_CPU_KERNELS=0 measures ours on torch's kernels instead);
- roofline: weight bytes one decode step reads (`quantize.weight_bytes_per_token`) / this machine's
  memory bandwidth, measured in the same run (a sum over a tensor far larger than the caches).
Before those, the one-row products alone: GB/s of weights ours (qwen2.kernels.ops) and torch's kernels read
over a 0.5B layer stack, beside the bandwidth.
Perplexity: float bf16 vs int8 / int4 on held-out text, with a model whose outputs are not uniform: a
small Qwen2 (hidden 256) trained here for a minute or two on Python standard-library source, over the
ids that text uses (the real tokenizer's, renumbered), evaluated on other stdlib files.

With `--llama-python PY --llama-convert CONVERT` (an interpreter that imports llama_cpp, and llama.cpp's
convert_hf_to_gguf.py; an optional, documented step, never a dependency) llama.cpp decodes the same bf16
weights beside ours: the checkpoint converted by llama.cpp's converter to a bf16 GGUF, quantized by
llama.cpp to q8_0 and q4_k_m, each run by bench/llama_cpp_run.py with as many threads as torch uses, and
compared with our default path (no --compile) at bf16 / int8 / int4: decode and prefill tokens/s, the
ratio, % of the roofline for each (its bytes: the file's tensors), and how many of the five most likely
ids after the prompt the two share (the check that the file is the same model).

Each side (ours per dtype, transformers per dtype, int8, int4, llama.cpp's files) takes --rounds turns in
alternation and keeps its best, so a burst of load on a shared machine does not land on one side only.

    .venv/bin/python bench/decode.py [--tokens 64] [--prompt 512] [--rounds 3] [--threads N]
                                     [--compile] [--steps 300]
    .venv/bin/python bench/decode.py --quick     # a smoke run: 2 layers, small counts, one round
    .venv/bin/python bench/decode.py --skip-ppl --llama-python /tmp/llama-env/bin/python \
        --llama-convert /tmp/llama-src/llama_cpp_python-0.3.16/vendor/llama.cpp/convert_hf_to_gguf.py

llama.cpp in its own environment (llama-cpp-python compiled from PyPI's source for this CPU, ~15 minutes on
2 cores; its converter, which is not in the wheel, from the same source archive; the converter's imports):
    python3 -m venv /tmp/llama-env
    CMAKE_ARGS="-DGGML_NATIVE=ON" /tmp/llama-env/bin/pip install llama-cpp-python==0.3.16 torch==2.13.0 \
        "transformers<5" mistral-common sentencepiece
(transformers 5 moves rope_theta into rope_parameters, where this converter does not look: its GGUF then
has llama.cpp's default RoPE base, 1e4, and the top-5 column shows the mismatch.)
    /tmp/llama-env/bin/pip download --no-deps --no-binary :all: llama-cpp-python==0.3.16 -d /tmp/llama-src
    tar xzf /tmp/llama-src/llama_cpp_python-0.3.16.tar.gz -C /tmp/llama-src
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import hf_twin, table, timeit  # noqa: E402
from qwen2.checkpoint import save_model  # noqa: E402
from qwen2.config import ModelConfig  # noqa: E402
from qwen2.generation import KVCache, generate, prefill  # noqa: E402
from qwen2.kernels import install  # noqa: E402
from qwen2.kernels import ops as cpu_kernels  # noqa: E402
from qwen2.model import build_model  # noqa: E402
from qwen2.quantize import Int4Linear, quantize_int4, quantize_int8, quantize_model, weight_bytes_per_token  # noqa: E402
from qwen2.tokenizer.bpe import load_tokenizer  # noqa: E402
from qwen2.tokenizer.save import save_tokenizer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def bandwidth(gib: float = 1.0, repeat: int = 5) -> float:
    """Read bandwidth in bytes/s: the best of `repeat` sums over a tensor of `gib` GiB (read once each)."""
    x = torch.ones(int(gib * 2**30) // 4, dtype=torch.float32)
    x.sum()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        x.sum()
        times.append(time.perf_counter() - t0)
    return x.numel() * 4 / min(times)


def ours_decode(model, prompt: list[int], n: int, compile: bool) -> float:
    """Decode tokens/s of qwen2.generate, greedy, n new tokens: the (n - 1) steps after the first token."""
    list(generate(model, prompt[:8], 4, temperature=0, compile=compile))  # warm-up (and compile)
    gen = generate(model, prompt, n, temperature=0, compile=compile)
    assert len(list(gen)) == n
    return (n - 1) / gen.decode_seconds


@torch.no_grad()
def first_top5(model, prompt: list[int]) -> list[int]:
    """The five most likely next ids after the prompt: the check that llama.cpp's file is the same model
    (a random model's logits are near ties, so greedy paths part early even between equal models)."""
    return model(torch.tensor([prompt]))[0, -1].topk(5).indices.tolist()


def ours_prefill(model, prompt: list[int], repeat: int) -> float:
    x = torch.tensor([prompt])
    cache = KVCache(model.config, 1, len(prompt), dtype=model.model.embed_tokens.weight.dtype)
    return len(prompt) / timeit(lambda: prefill(model, x, cache), repeat=repeat)


class LlamaCpp:
    """llama.cpp through --llama-python: our bf16 model saved as a checkpoint (save_model, the tokenizer
    beside it), written to a bf16 GGUF by llama.cpp's own converter (--llama-convert), quantized by
    llama.cpp to q8_0 and q4_k_m, and each file decoded by bench/llama_cpp_run.py in that interpreter."""

    KINDS = {"bfloat16": "bf16", "int8 (bf16 act.)": "q8_0", "int4 (bf16 act.)": "q4_k_m"}
    FIELDS = ("prefill", "decode", "top5", "weight_bytes")  # of llama_cpp_run.py's decode

    def __init__(self, args, model, prompt: list[int], workdir: Path):
        self.python, self.threads, self.n = args.llama_python, torch.get_num_threads(), args.tokens
        ckpt = save_model(model, workdir / "checkpoint")
        save_tokenizer(load_tokenizer("Qwen2"), ckpt)
        self.files = {kind: workdir / f"model-{kind}.gguf" for kind in self.KINDS.values()}
        print("llama.cpp: converting the checkpoint to GGUF (its convert_hf_to_gguf.py) ...", flush=True)
        self.run(args.llama_convert, str(ckpt), "--outtype", "bf16", "--outfile", str(self.files["bf16"]))
        for kind in ("q8_0", "q4_k_m"):
            self.runner("quantize", str(self.files["bf16"]), str(self.files[kind]), kind)
        self.prompt = workdir / "prompt.json"
        self.prompt.write_text(json.dumps(prompt))

    def run(self, script: str, *argv: str) -> str:
        """`script argv` in llama.cpp's interpreter; its stdout, or its stderr's tail in the error."""
        out = subprocess.run([self.python, script, *argv], capture_output=True, text=True)
        if out.returncode:
            raise RuntimeError(f"{Path(script).name} {' '.join(argv)} failed:\n{out.stderr[-3000:]}")
        return out.stdout

    def runner(self, *argv: str) -> dict:
        out = self.run(str(Path(__file__).parent / "llama_cpp_run.py"), *argv)
        return json.loads(out.strip().splitlines()[-1])

    def decode(self, kind: str) -> dict:
        argv = ["--prompt", str(self.prompt), "--tokens", str(self.n), "--threads", str(self.threads)]
        return self.runner("decode", str(self.files[kind]), *argv)


def hf_speed(hf, prompt: list[int], n: int, repeat: int) -> tuple[float, float]:
    """(prefill tokens/s, decode tokens/s) of transformers: its forward over the prompt (cache on), and
    `generate`'s (N - 1) steps between the first and the last token, timed by a logits processor that
    notes when each token is chosen (the span ours measures too)."""
    from transformers import LogitsProcessor, LogitsProcessorList

    class Clock(LogitsProcessor):
        def __init__(self):
            self.times = []

        def __call__(self, input_ids, scores):
            self.times.append(time.perf_counter())
            return scores

    x = torch.tensor([prompt])
    kw = dict(attention_mask=torch.ones_like(x), do_sample=False, eos_token_id=None, pad_token_id=0)
    clock = Clock()
    with torch.inference_mode():
        hf.generate(x[:, :8], max_new_tokens=4, min_new_tokens=4, **kw)  # warm-up
        pre = timeit(lambda: hf(x, use_cache=True).logits, repeat=repeat)
        out = hf.generate(
            x, max_new_tokens=n, min_new_tokens=n, logits_processor=LogitsProcessorList([clock]), **kw
        )
    assert out.shape[1] == len(prompt) + n and len(clock.times) == n
    return len(prompt) / pre, (n - 1) / (clock.times[-1] - clock.times[0])


def speed_rows(args) -> tuple[list[dict], list[dict]]:
    """(ours vs transformers per dtype, ours vs llama.cpp per weight format: empty without --llama-python)"""
    config = ModelConfig.preset("Qwen2-0.5B")
    if args.quick:  # the real widths (and output layer), fewer layers: a smoke run of the code paths
        config = config.replace(num_hidden_layers=2)
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, config.vocab_size, (args.prompt,), generator=g).tolist()
    gib = 0.25 if args.quick else 1.0
    found, vs_llama, bw = [], [], 0.0
    for dtype in (torch.float32, torch.bfloat16):
        name = str(dtype).removeprefix("torch.")
        model = install(build_model(config, dtype=dtype).eval())  # the kernels, as load_model gives them
        sides = {name: model, f"{name} transformers": hf_twin(model)}
        if dtype == torch.bfloat16:
            for bits in (8, 4):
                sides[f"int{bits} (bf16 act.)"] = install(quantize_model(copy.deepcopy(model), bits=bits))
        with tempfile.TemporaryDirectory(prefix="bench-decode-") as tmp:
            llama = None
            if dtype == torch.bfloat16 and args.llama_python:
                llama = LlamaCpp(args, model, prompt, Path(tmp))
                sides.update({f"llama.cpp {kind}": None for kind in llama.KINDS.values()})
            best, top5, llama_bytes = {k: (0.0, 0.0) for k in sides}, {}, {}
            # the sides take turns, and each keeps its best round: noise hits all alike
            for r in range(args.rounds):
                bw = max(bw, bandwidth(gib))
                for k, m in sides.items():
                    print(f"round {r + 1}/{args.rounds}: {k} ...", flush=True)
                    if k.startswith("llama.cpp"):
                        out = llama.decode(k.removeprefix("llama.cpp "))
                        pre, dec, top5[k], llama_bytes[k] = (out[f] for f in LlamaCpp.FIELDS)
                    elif k.endswith("transformers"):
                        pre, dec = hf_speed(m, prompt, args.tokens, args.repeat)
                    else:
                        pre = ours_prefill(m, prompt, args.repeat)
                        dec = ours_decode(m, prompt, args.tokens, args.compile)
                        if llama and k not in top5:
                            top5[k] = first_top5(m, prompt)
                    best[k] = (max(best[k][0], pre), max(best[k][1], dec))
        (pre, dec), (hf_pre, hf_dec) = best[name], best[f"{name} transformers"]
        found.append((name, pre, hf_pre, dec, hf_dec, weight_bytes_per_token(model), None))
        if dtype == torch.bfloat16:
            for k in ("int8 (bf16 act.)", "int4 (bf16 act.)"):
                (q_pre, q_dec), nbytes = best[k], weight_bytes_per_token(sides[k])
                found.append((k, q_pre, None, q_dec, None, nbytes, q_dec / dec))
            for ours, kind in LlamaCpp.KINDS.items() if llama else ():
                k, nbytes = f"llama.cpp {kind}", weight_bytes_per_token(sides[ours])
                pair = (best[ours], best[k]), (nbytes, llama_bytes[k]), (top5[ours], top5[k])
                vs_llama.append(llama_row(ours, kind, *pair, bw))
        del model, sides
    print(f"memory read bandwidth (best sum over a {gib:g} GiB tensor): {bw / 1e9:.1f} GB/s")
    rows = [
        row(name, pre, hf_pre, dec, hf_dec, bw / nbytes, vs)
        for name, pre, hf_pre, dec, hf_dec, nbytes, vs in found
    ]
    return rows, vs_llama


def llama_row(ours, kind, speeds, nbytes, top5, bw) -> dict:
    """One row of ours vs llama.cpp: each pair is (ours, llama.cpp)."""
    ((pre, dec), (lpre, ldec)), (nbytes, llama_nbytes), (top5, llama_top5) = speeds, nbytes, top5
    return {
        "ours": ours,
        "llama.cpp": kind,
        "decode ours": f"{dec:.2f}",
        "decode llama.cpp": f"{ldec:.2f}",
        "decode ratio": f"{dec / ldec:.2f}x",
        "ours % of roofline": f"{100 * dec * nbytes / bw:.0f}%",
        "llama.cpp % of roofline": f"{100 * ldec * llama_nbytes / bw:.0f}%",
        "prefill ours": f"{pre:.0f}",
        "prefill llama.cpp": f"{lpre:.0f}",
        "prefill ratio": f"{pre / lpre:.2f}x",
        "top-5 after the prompt shared": f"{len(set(top5) & set(llama_top5))}/5",
    }


def row(name, pre, hf_pre, dec, hf_dec, roof, vs_bf16=None) -> dict:
    return {
        "weights": name,
        "prefill ours": f"{pre:.0f}",
        "prefill hf": f"{hf_pre:.0f}" if hf_pre else "-",
        "prefill ratio": f"{pre / hf_pre:.2f}x" if hf_pre else "-",
        "decode ours": f"{dec:.2f}",
        "decode hf": f"{hf_dec:.2f}" if hf_dec else "-",
        "decode ratio": f"{dec / hf_dec:.2f}x" if hf_dec else "-",
        "roofline tok/s": f"{roof:.2f}",
        "% of roofline": f"{100 * dec / roof:.0f}%",
        "vs our bf16": f"{vs_bf16:.2f}x" if vs_bf16 else "-",
    }


# ---- the matrix-vector products alone ----------------------------------------------------------------
def gemv_rows(args) -> list[dict]:
    """GB/s of weights read by one-row products over a Qwen2-0.5B layer stack (24 x q, k, v, o, gate, up,
    down: far larger than the caches), ours (cpu_kernels) vs torch's (torch.mv for bf16, its int8 / int4
    weight-only kernels), same run, best of --rounds alternating passes."""
    config = ModelConfig.preset("Qwen2-0.5B")
    h, f, kv = config.hidden_size, config.intermediate_size, config.num_key_value_heads * config.head_dim
    layers = 2 if args.quick else config.num_hidden_layers
    shapes = [(h, h), (kv, h), (kv, h), (h, h), (f, h), (f, h), (h, f)] * layers
    g = torch.Generator().manual_seed(0)
    weights = [torch.randn(n, k, generator=g).mul_(0.02).bfloat16() for n, k in shapes]
    xs = {k: torch.randn(1, k, generator=g).bfloat16() for k in (h, f)}
    q8 = [quantize_int8(w, torch.bfloat16) for w in weights]
    q4 = []
    for w in weights:
        layer = Int4Linear(w.shape[1], w.shape[0], group_size=128)
        layer.weight, layer.scales, layer.zeros = quantize_int4(w, 128, torch.bfloat16)
        layer.prepare()
        q4.append(layer)
    on = cpu_kernels.usable(xs[h])
    sides = {
        "bf16": (
            sum(w.numel() * 2 for w in weights),
            lambda: [cpu_kernels.gemv_bf16(xs[w.shape[1]], w) for w in weights],
            lambda: [torch.mv(w, xs[w.shape[1]][0]) for w in weights],
        ),
        "int8": (
            sum(q.numel() for q, _ in q8),
            lambda: [cpu_kernels.gemv_int8(xs[q.shape[1]], q, s) for q, s in q8],
            lambda: [torch._weight_int8pack_mm(xs[q.shape[1]], q, s) for q, s in q8],
        ),
        "int4 g128": (
            sum(m.weight.numel() for m in q4),
            lambda: [cpu_kernels.gemv_int4(xs[m.in_features], m.weight, m.scales, m.zeros, 128) for m in q4],
            lambda: [
                torch.ops.aten._weight_int4pack_mm_for_cpu(
                    xs[m.in_features], m.packed, 128, m.scales_and_zeros
                )
                for m in q4
            ],
        ),
    }
    best = {}
    with torch.no_grad():
        for _ in range(args.rounds):
            for name, (nbytes, ours, ref) in sides.items():
                for who, fn in (("ours", ours), ("torch", ref)):
                    if who == "ours" and not on:
                        continue
                    fn()
                    t0 = time.perf_counter()
                    fn()
                    best[name, who] = max(best.get((name, who), 0.0), nbytes / (time.perf_counter() - t0))
    bw = bandwidth(0.25 if args.quick else 1.0)
    print(f"one-row products over {layers} layers' weights; memory read bandwidth {bw / 1e9:.1f} GB/s")
    return [
        {
            "weights": name,
            "ours GB/s": f"{best[name, 'ours'] / 1e9:.1f}" if on else "-",
            "torch GB/s": f"{best[name, 'torch'] / 1e9:.1f}",
            "ratio": f"{best[name, 'ours'] / best[name, 'torch']:.2f}x" if on else "-",
            "ours % of bandwidth": f"{100 * best[name, 'ours'] / bw:.0f}%" if on else "-",
        }
        for name in sides
    ]


# ---- perplexity -------------------------------------------------------------------------------------
def stdlib_ids(tokenizer_dir: Path, chars: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(train ids, held-out ids) of stdlib source text, renumbered to the ids the text uses."""
    from qwen2.data.corpus import stdlib_dir

    tok = load_tokenizer(tokenizer_dir)
    files = sorted(stdlib_dir().glob("*.py"))
    train, held = [], []
    for i, f in enumerate(files):
        (held if i % 10 == 0 else train).append(f.read_text(errors="replace"))
    train_text, held_text = "\n".join(train)[:chars], "\n".join(held)[: chars // 8]
    a, b = torch.tensor(tok.encode(train_text)), torch.tensor(tok.encode(held_text))
    vocab, inverse = torch.unique(torch.cat([a, b]), return_inverse=True)
    return inverse[: len(a)], inverse[len(a) :], len(vocab)


def trained_model(train: torch.Tensor, vocab: int, steps: int, seq: int = 128, batch: int = 16):
    config = ModelConfig(
        vocab_size=vocab,
        hidden_size=256,
        intermediate_size=768,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        torch_dtype="float32",
    )
    model = build_model(config, seed=0).train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    g = torch.Generator().manual_seed(0)
    t0 = time.perf_counter()
    for step in range(steps):
        starts = torch.randint(0, len(train) - seq - 1, (batch,), generator=g)
        x = torch.stack([train[s : s + seq + 1] for s in starts])
        for group in opt.param_groups:  # linear warm-up, then cosine to 10%
            w = min(1.0, (step + 1) / max(1, steps // 10))
            group["lr"] = 3e-3 * w * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / steps)))
        loss = torch.nn.functional.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 50 == 0 or step == steps - 1:
            print(
                f"  train step {step}: loss {loss.item():.3f} ({time.perf_counter() - t0:.0f}s)", flush=True
            )
    return model.eval()


@torch.no_grad()
def perplexity(model, ids: torch.Tensor, seq: int = 256, batch: int = 8) -> float:
    n = (len(ids) - 1) // seq
    inputs, targets = ids[: n * seq].view(n, seq), ids[1 : n * seq + 1].view(n, seq)
    total = 0.0
    for i in range(0, n, batch):
        logits = model(inputs[i : i + batch]).float()
        total += torch.nn.functional.cross_entropy(
            logits.flatten(0, 1), targets[i : i + batch].flatten(), reduction="sum"
        ).item()
    return math.exp(total / targets.numel())


def ppl_rows(args) -> list[dict]:
    train, held, vocab = stdlib_ids("Qwen2", 300_000 if args.quick else 2_000_000)
    print(
        f"perplexity: training a small Qwen2 on {len(train)} stdlib tokens ({vocab} distinct ids), "
        f"{len(held)} held out",
        flush=True,
    )
    model = trained_model(train, vocab, args.steps)
    base = model.to(torch.bfloat16)
    ref = perplexity(base, held)
    rows = [{"weights": "bf16", "held-out perplexity": f"{ref:.3f}", "change": "-"}]
    for bits, group in ((8, None), (4, 128), (4, 32)):
        q = quantize_model(copy.deepcopy(base), bits=bits, group_size=group or 128)
        p = perplexity(q, held)
        rows.append(
            {
                "weights": f"int{bits}" + (f" g{group}" if group else ""),
                "held-out perplexity": f"{p:.3f}",
                "change": f"{100 * (p / ref - 1):+.2f}%",
            }
        )
    print(f"(a uniform model's perplexity would be {vocab})")
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=64, help="new tokens per decode measurement")
    ap.add_argument("--prompt", type=int, default=512, help="prompt (prefill) tokens")
    ap.add_argument("--repeat", type=int, default=3, help="prefill timings (median)")
    ap.add_argument("--rounds", type=int, default=3, help="turns each side takes (its best is kept)")
    ap.add_argument("--steps", type=int, default=300, help="training steps of the perplexity model")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--compile", action="store_true", help="our decode step compiled with torch.compile")
    ap.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: 2 layers of 0.5B, 8 tokens, 64-token prompt, 20 training steps",
    )
    ap.add_argument("--skip-ppl", action="store_true")
    ap.add_argument(
        "--llama-python", default=None, help="an interpreter with llama_cpp: measure llama.cpp too"
    )
    ap.add_argument(
        "--llama-convert", default=None, help="llama.cpp's convert_hf_to_gguf.py (needed with --llama-python)"
    )
    args = ap.parse_args()
    if args.llama_python and not (args.llama_convert and Path(args.llama_convert).is_file()):
        ap.error("--llama-python needs --llama-convert PATH/convert_hf_to_gguf.py (llama.cpp's converter)")
    if args.quick:
        args.tokens, args.prompt, args.repeat, args.rounds, args.steps = 8, 64, 1, 1, 20
    if args.threads:
        torch.set_num_threads(args.threads)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; "
        f"decode of {args.tokens} tokens after a "
        f"{args.prompt}-token prompt; tokens/s" + (" (our decode step compiled)" if args.compile else "")
    )
    print(cpu_kernels.status())
    rows = gemv_rows(args)
    print(table(rows, list(rows[0])))
    rows, vs_llama = speed_rows(args)
    print(table(rows, list(rows[0])))
    if vs_llama:
        print("our default decode path vs llama.cpp's, same weights, same run (tokens/s):")
        print(table(vs_llama, list(vs_llama[0])))
    if not args.skip_ppl:
        rows = ppl_rows(args)
        print(table(rows, list(rows[0])))


if __name__ == "__main__":
    main()
