"""Shared helpers for the benchmarks: timing with warm-up, and random models at real shapes."""

from __future__ import annotations

import statistics
import time

import torch


def timeit(fn, *, warmup: int = 1, repeat: int = 3) -> float:
    """Median wall time of fn() in seconds, after warm-up calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def table(rows: list[dict], columns: list[str]) -> str:
    widths = {c: max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in columns}
    line = " | ".join(c.ljust(widths[c]) for c in columns)
    out = [line, "-|-".join("-" * widths[c] for c in columns)]
    out += [" | ".join(str(r.get(c, "")).ljust(widths[c]) for c in columns) for r in rows]
    return "\n".join(out)


def hf_twin(model, attn="sdpa"):
    """transformers' model with exactly our weights (the reference in the same run)."""
    import transformers

    config = model.config
    cls = transformers.Qwen2MoeForCausalLM if config.is_moe else transformers.Qwen2ForCausalLM
    hc = (transformers.Qwen2MoeConfig if config.is_moe else transformers.Qwen2Config)(**config.to_dict())
    hc._attn_implementation = attn
    dtype = next(model.parameters()).dtype
    hf = cls(hc).to(dtype)
    hf.load_state_dict(model.state_dict(), strict=not config.tie_word_embeddings)
    return hf.eval()
