"""Shared helpers for the benchmarks: timing with warm-up, a table printer, and transformers twins of
our models (hf_twin, from tests/hf_reference.py: the one transformers-reference helper of tests and
benchmarks)."""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from hf_reference import hf_twin  # noqa: E402, F401 (bench scripts import it from here)


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
