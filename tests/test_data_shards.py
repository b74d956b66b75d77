"""Shard sets: round trip, atomic writes, views (select / split)."""

import json

import numpy as np
import pytest

from qwen2.data import ShardSet, ShardWriter, write_shards
from qwen2.data.shards import MANIFEST
from qwen2.files import atomic_open


def random_docs(n=50, seed=0):
    rng = np.random.default_rng(seed)
    # Ids above 2^16 (Qwen2's 151,646 need 32 bits) and up to the top of uint32.
    return [rng.integers(0, 2**32, size=int(rng.integers(1, 400)), dtype=np.uint64) for _ in range(n)]


def test_round_trip_over_several_shards(tmp_path):
    docs = random_docs()
    s = write_shards(docs, tmp_path / "s", shard_tokens=1000, meta={"endoftext_id": 5, "note": "x"})
    assert len(s.manifest["shards"]) > 3
    assert len(s) == len(docs) and s.n_tokens == sum(len(d) for d in docs)
    assert s.lengths.tolist() == [len(d) for d in docs]
    for d, got in zip(docs, s):
        assert got.dtype == np.uint32 and np.array_equal(got, d)
    assert np.array_equal(s[-1], docs[-1])
    assert s.meta == {"endoftext_id": 5, "note": "x"}
    # Shards are memory-mapped, and each holds whole documents.
    assert isinstance(s._tokens[0], np.memmap)
    assert sum(x["n_docs"] for x in s.manifest["shards"]) == len(docs)
    with pytest.raises(IndexError):
        s[len(docs)]


def test_files_are_plain_npy(tmp_path):
    write_shards([[1, 2, 3], [4]], tmp_path / "s")
    assert np.load(tmp_path / "s" / "shard_00000.tokens.npy").tolist() == [1, 2, 3, 4]
    assert np.load(tmp_path / "s" / "shard_00000.offsets.npy").tolist() == [0, 3, 4]
    assert json.loads((tmp_path / "s" / MANIFEST).read_text())["n_docs"] == 2


def test_empty_docs_are_skipped_and_bad_ids_refused(tmp_path):
    w = ShardWriter(tmp_path / "s")
    w.add([])
    w.add([1])
    with pytest.raises(ValueError, match="2\\^32"):
        w.add([2**32])
    with pytest.raises(ValueError, match="2\\^32"):
        w.add([-1])
    with pytest.raises(ValueError, match="integer"):
        w.add([1.5])
    w.close()
    assert len(ShardSet(tmp_path / "s")) == 1


def test_unfinished_write_is_refused_not_read(tmp_path):
    with pytest.raises(RuntimeError):
        with ShardWriter(tmp_path / "s", shard_tokens=10) as w:
            for d in random_docs(20):
                w.add(d)
            raise RuntimeError("killed")
    assert list((tmp_path / "s").glob("shard_*.npy"))  # full shards were written...
    with pytest.raises(FileNotFoundError, match="not a finished shard set"):
        ShardSet(tmp_path / "s")  # ...but without a manifest the set is refused


def test_rewrite_removes_the_old_manifest_first_and_stale_shards_at_close(tmp_path):
    write_shards(random_docs(30), tmp_path / "s", shard_tokens=500)
    n_old = len(list((tmp_path / "s").glob("shard_*.tokens.npy")))
    w = ShardWriter(tmp_path / "s", shard_tokens=10**9)
    assert not (tmp_path / "s" / MANIFEST).exists()
    w.add([1, 2])
    w.close()
    assert n_old > 1 and len(list((tmp_path / "s").glob("shard_*.npy"))) == 2
    assert ShardSet(tmp_path / "s")[0].tolist() == [1, 2]


def test_mismatched_files_are_detected(tmp_path):
    write_shards([[1, 2, 3]], tmp_path / "s")
    np.save(tmp_path / "s" / "shard_00000.tokens.npy", np.array([1, 2], np.uint32))
    with pytest.raises(ValueError, match="disagree"):
        ShardSet(tmp_path / "s")


def test_atomic_open_leaves_no_partial_file(tmp_path):
    target = tmp_path / "f.bin"
    target.write_bytes(b"old")
    with pytest.raises(OSError):
        with atomic_open(target) as f:
            f.write(b"new, half")
            raise OSError("disk full")
    assert target.read_bytes() == b"old"
    assert list(tmp_path.iterdir()) == [target]
    with atomic_open(target) as f:
        f.write(b"new")
    assert target.read_bytes() == b"new"


def test_select_and_split_are_views(tmp_path):
    docs = random_docs(60, seed=1)
    s = write_shards(docs, tmp_path / "s", shard_tokens=700)
    long_ = s.select(min_tokens=200)
    assert len(long_) == sum(len(d) >= 200 for d in docs) and (long_.lengths >= 200).all()
    expected = [d for d in docs if len(d) >= 200]
    assert all(np.array_equal(a, b) for a, b in zip(long_, expected))
    mid = long_.select(max_tokens=300)  # views compose
    assert mid.lengths.tolist() == [len(d) for d in docs if 200 <= len(d) <= 300]
    train, val = s.split(val_fraction=0.1, seed=0)
    assert len(val) == 6 and len(train) == 54
    as_set = lambda v: {tuple(x.tolist()) for x in v}  # noqa: E731
    assert not as_set(train) & as_set(val)
    assert as_set(train) | as_set(val) == as_set(docs)
    assert as_set(s.split(0.1, seed=0)[1]) == as_set(val) and as_set(s.split(0.1, seed=1)[1]) != as_set(val)
