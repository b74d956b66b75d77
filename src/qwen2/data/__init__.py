"""Pre-training data: corpora -> filters -> dedup -> tokenized shards -> mixtures -> packed batches.

    from qwen2.data import default_source, prepare_corpus, open_corpus, PackedLoader

    report = prepare_corpus(default_source(), tok, "runs/data")       # report.json beside the shards
    train, val = open_corpus("runs/data").split(val_fraction=0.01)
    loader = PackedLoader(train, seq_len=512, batch_size=8, rank=rank, world_size=world, seed=0)
    batch = next(loader)["input_ids"]                                   # LongTensor[8, 513]

Modules: corpus (reading), filters (heuristic quality filters), dedup (exact + MinHash), shards
(uint32 shards, memory-mapped), mixture (weighted sources), loader (packing, resumable, rank-aware),
prepare (the one-call pipeline). Names are imported lazily, so `import qwen2.data` does not import torch.
"""

from importlib import import_module

_EXPORTS = {
    "Doc": "corpus",
    "Source": "corpus",
    "default_corpus_files": "corpus",
    "default_source": "corpus",
    "long_source": "corpus",
    "list_files": "corpus",
    "python_docstrings": "corpus",
    "package_documents": "corpus",
    "stdlib_dir": "corpus",
    "Length": "filters",
    "SymbolRatio": "filters",
    "DigitRatio": "filters",
    "LineRepetition": "filters",
    "NGramRepetition": "filters",
    "default_filters": "filters",
    "apply_filters": "filters",
    "FilterStats": "filters",
    "ExactDedup": "dedup",
    "MinHash": "dedup",
    "MinHashDedup": "dedup",
    "default_dedup": "dedup",
    "normalize": "dedup",
    "ShardWriter": "shards",
    "ShardSet": "shards",
    "write_shards": "shards",
    "Mixture": "mixture",
    "PackedLoader": "loader",
    "prepare_corpus": "prepare",
    "open_corpus": "prepare",
}

__all__ = list(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(import_module(f"qwen2.data.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'qwen2.data' has no attribute {name!r}")
