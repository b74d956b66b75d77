"""Encode throughput (MB/s) of load_tokenizer vs raw tiktoken vs transformers' fast tokenizer.

Same run, same ~10 MB of mixed text, same ids (checked): English prose (pydoc_data's help topics), code
(the Python standard library's .py files) and Chinese (sentences of Chinese words sampled from the Qwen2
vocabulary itself, with Zipf-like frequencies), split into documents. Single thread, then batched over
all cores. Targets (issue 4): batched, >= 2x transformers and within 10% of tiktoken.
    python bench/tokenizer.py [--mb 10] [--repeat 3] [--tokenizer DIR]
"""

from __future__ import annotations

import argparse
import base64
import glob
import os
import random
import statistics
import sys
import sysconfig
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import table, timeit  # noqa: E402
from qwen2.tokenizer.bpe import QWEN2_PATTERN, load_tokenizer  # noqa: E402
from qwen2.tokenizer.save import save_tokenizer  # noqa: E402


def english(mb: float) -> list[str]:
    from pydoc_data.topics import topics

    paragraphs = [p for k in sorted(topics) for p in topics[k].split("\n\n") if p.strip()]
    docs, size, rng = [], 0, random.Random(0)
    while size < mb * 1e6:
        doc = "\n\n".join(rng.sample(paragraphs, 12))
        docs.append(doc)
        size += len(doc.encode())
    return docs


def code(mb: float) -> list[str]:
    docs, size = [], 0
    for f in sorted(glob.glob(sysconfig.get_paths()["stdlib"] + "/**/*.py", recursive=True)):
        if "site-packages" in f:
            continue
        try:
            doc = open(f, encoding="utf-8").read()
        except (UnicodeDecodeError, OSError):
            continue
        docs.append(doc)
        size += len(doc.encode())
        if size >= mb * 1e6:
            break
    return docs


def chinese(tok, mb: float) -> list[str]:
    # Words = vocabulary entries made only of CJK ideographs; a lower rank (more frequent merge) is likelier.
    words = []
    for i in range(tok.n_regular):
        s = tok.decode([i])
        if s and all("\u4e00" <= c <= "\u9fff" for c in s):
            words.append(s)
    weights = [1 / (k + 10) for k in range(len(words))]
    rng, docs, size = random.Random(0), [], 0
    while size < mb * 1e6:
        sentences = [
            "".join(rng.choices(words, weights, k=rng.randint(4, 14))) + rng.choice("。，；！？")
            for _ in range(60)
        ]
        doc = "".join(sentences)
        docs.append(doc)
        size += len(doc.encode())
    return docs


def tiktoken_reference(path: Path):
    import tiktoken

    ranks = {}
    for line in (path / "qwen.tiktoken").read_bytes().splitlines():
        token, rank = line.split()
        ranks[base64.b64decode(token)] = int(rank)
    return tiktoken.Encoding("qwen2-raw", pat_str=QWEN2_PATTERN, mergeable_ranks=ranks, special_tokens={})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--mb", type=float, default=10.0, help="total text size (split 40%% code, 30%% English, 30%% Chinese)"
    )
    ap.add_argument("--repeat", type=int, default=3, help="timed runs (median) per measurement")
    ap.add_argument(
        "--tokenizer",
        type=Path,
        default=None,
        help="a Qwen2 tokenizer directory with qwen.tiktoken "
        "(default: the built-in one, saved to a temp dir)",
    )
    a = ap.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    import transformers

    transformers.logging.set_verbosity_error()  # long documents are fine here: no model sees these ids
    threads = os.cpu_count() or 1
    if a.tokenizer is None:  # transformers and raw tiktoken need files: the built-in tokenizer's
        a.tokenizer = Path(tempfile.mkdtemp()) / "qwen2-tokenizer"
        save_tokenizer(load_tokenizer("Qwen2"), a.tokenizer)
    ours = load_tokenizer(a.tokenizer)
    raw = tiktoken_reference(a.tokenizer)
    hf = transformers.AutoTokenizer.from_pretrained(str(a.tokenizer))
    docs = code(0.4 * a.mb) + english(0.3 * a.mb) + chinese(ours, 0.3 * a.mb)
    random.Random(1).shuffle(docs)
    mb = sum(len(d.encode()) for d in docs) / 1e6
    print(f"{mb:.1f} MB in {len(docs)} documents, {threads} threads for batched runs")

    runs = {
        ("load_tokenizer", "single"): lambda: [ours.encode(d) for d in docs],
        ("tiktoken", "single"): lambda: [raw.encode_ordinary(d) for d in docs],
        ("transformers fast", "single"): lambda: [hf.encode(d, add_special_tokens=False) for d in docs],
        ("load_tokenizer", "batched"): lambda: ours.encode_batch(docs, num_threads=threads),
        ("tiktoken", "batched"): lambda: raw.encode_ordinary_batch(docs, num_threads=threads),
        ("transformers fast", "batched"): lambda: hf(docs, add_special_tokens=False)["input_ids"],
    }
    first = {key: fn() for key, fn in runs.items()}  # warm-up, and the ids must agree
    assert all(ids == first[("load_tokenizer", "single")] for ids in first.values()), (
        "implementations disagree"
    )
    # Rounds interleave the implementations, so a change in machine load hits all of them alike.
    times = {key: [] for key in runs}
    for _ in range(a.repeat):
        for key, fn in runs.items():
            times[key].append(timeit(fn, warmup=0, repeat=1))
    speed = {key: mb / statistics.median(t) for key, t in times.items()}
    rows = []
    for (name, mode), v in speed.items():
        rows.append(
            {
                "tokenizer": name,
                "mode": mode,
                "MB/s": f"{v:.2f}",
                "load_tokenizer / this": f"{speed[('load_tokenizer', mode)] / v:.2f}x",
            }
        )
    print(table(rows, ["tokenizer", "mode", "MB/s", "load_tokenizer / this"]))
    b = {name: speed[(name, "batched")] for name in ("load_tokenizer", "tiktoken", "transformers fast")}
    print(
        f"batched: {b['load_tokenizer'] / b['transformers fast']:.2f}x transformers (target >= 2x), "
        f"{b['load_tokenizer'] / b['tiktoken']:.2f}x tiktoken (target >= 0.90x)"
    )


if __name__ == "__main__":
    main()
