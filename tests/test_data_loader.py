"""PackedLoader: packing, determinism, resume, rank-awareness, epochs; Mixture weights."""

import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qwen2.data import Mixture, PackedLoader, write_shards

EOT = 7  # ids below 1000 are free: documents use 1000 * (doc + 1) + position


def make_docs(n=37, seed=0, lo=1, hi=90, base=0):
    rng = np.random.default_rng(seed)
    return [np.arange(n_tok) + 1000 * (base + i + 1) for i, n_tok in enumerate(rng.integers(lo, hi, n))]


@pytest.fixture
def docs():
    return make_docs()


@pytest.fixture
def shards(tmp_path, docs):
    return write_shards(docs, tmp_path / "s", shard_tokens=300, meta={"endoftext_id": EOT})


def batches(loader, n):
    return [next(loader)["input_ids"] for _ in range(n)]


def split_on_eot(stream):
    out, cur = [], []
    for t in stream:
        if t == EOT:
            out.append(tuple(cur))
            cur = []
        else:
            cur.append(t)
    return out, cur


def test_batch_shape_and_dtype(shards):
    b = next(PackedLoader(shards, seq_len=16, batch_size=3))
    assert set(b) == {"input_ids"}
    assert b["input_ids"].shape == (3, 17) and b["input_ids"].dtype == torch.long


def test_packing_eot_between_docs_and_no_token_lost(shards, docs):
    T, B = 16, 4
    loader = PackedLoader(shards, seq_len=T, batch_size=B, shuffle=False)
    n_stream = sum(len(d) + 1 for d in docs)
    steps = n_stream // (T * B) + 2
    rows = torch.cat(batches(loader, steps)).numpy()
    # Consecutive rows overlap by one id: row[:-1] pieces tile the stream, and row[1:] are its labels.
    stream = rows[:, :-1].reshape(-1)
    assert (rows[1:, 0] == rows[:-1, -1]).all()
    expected = np.concatenate([np.append(d, EOT) for d in docs])
    assert np.array_equal(stream[: len(expected)], expected)
    assert np.array_equal(
        stream[len(expected) : 2 * len(expected)][: len(stream) - len(expected)],
        expected[: len(stream) - len(expected)],
    )  # the next epoch follows, same order unshuffled


def test_shuffled_epoch_holds_every_document_once(shards, docs):
    T, B = 8, 2
    n_stream = sum(len(d) + 1 for d in docs)
    loader = PackedLoader(shards, seq_len=T, batch_size=B, seed=3)
    rows = torch.cat(batches(loader, n_stream // (T * B) + 1)).numpy()
    stream = rows[:, :-1].reshape(-1)[:n_stream]
    pieces, rest = split_on_eot(stream)
    assert rest == []
    assert sorted(pieces) == sorted(tuple(d.tolist()) for d in docs)
    assert pieces != [tuple(d.tolist()) for d in docs]  # shuffled


def test_epochs_reshuffle_and_seed_matters(shards, docs):
    n_stream = sum(len(d) + 1 for d in docs)

    def epoch_orders(seed, epochs=2):
        loader = PackedLoader(shards, seq_len=n_stream, batch_size=1, seed=seed)
        stream = np.concatenate([next(loader)["input_ids"][0, :-1].numpy() for _ in range(epochs)])
        return [split_on_eot(stream[e * n_stream : (e + 1) * n_stream])[0] for e in range(epochs)]

    e0, e1 = epoch_orders(0)
    assert sorted(e0) == sorted(e1) and e0 != e1
    assert epoch_orders(0) == [e0, e1]
    assert epoch_orders(1)[0] != e0


def test_same_seed_same_batches(shards):
    a = batches(PackedLoader(shards, 16, 4, seed=5), 30)
    b = batches(PackedLoader(shards, 16, 4, seed=5), 30)
    c = batches(PackedLoader(shards, 16, 4, seed=6), 30)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))


@pytest.mark.parametrize("k", [0, 1, 7, 23])
def test_resume_equals_uninterrupted(shards, k):
    full = batches(PackedLoader(shards, 16, 4, seed=2), 40)
    first = PackedLoader(shards, 16, 4, seed=2)
    batches(first, k)
    state = json.loads(json.dumps(first.state_dict()))  # survives a JSON round trip (checkpoint metadata)
    resumed = PackedLoader(shards, 16, 4, seed=2)
    resumed.load_state_dict(state)
    assert all(torch.equal(x, y) for x, y in zip(full[k:], batches(resumed, 40 - k)))
    assert resumed.step == 40


def test_two_ranks_are_disjoint_and_stack_to_one_rank(shards):
    steps, T, B = 25, 12, 3  # several epochs of the 37 documents
    one = batches(PackedLoader(shards, T, 2 * B, seed=4), steps)
    r0 = batches(PackedLoader(shards, T, B, rank=0, world_size=2, seed=4), steps)
    r1 = batches(PackedLoader(shards, T, B, rank=1, world_size=2, seed=4), steps)
    for g, a, b in zip(one, r0, r1):
        assert torch.equal(torch.cat([a, b]), g)
    rows0 = {tuple(r.tolist()) for x in r0 for r in x}
    rows1 = {tuple(r.tolist()) for x in r1 for r in x}
    assert not rows0 & rows1
    assert len(rows0) == len(rows1) == steps * B  # every row is a distinct window of the stream


def test_rank_states_agree_and_resume_across_world_sizes(shards):
    l0 = PackedLoader(shards, 12, 3, rank=0, world_size=2, seed=4)
    l1 = PackedLoader(shards, 12, 3, rank=1, world_size=2, seed=4)
    batches(l0, 9), batches(l1, 9)
    assert l0.state_dict() == l1.state_dict()
    single = PackedLoader(shards, 12, 6, seed=4)
    single.load_state_dict(l0.state_dict())
    expected = torch.cat([next(l0)["input_ids"], next(l1)["input_ids"]])
    assert torch.equal(next(single)["input_ids"], expected)


def test_state_for_other_data_or_seed_is_refused(shards, tmp_path):
    state = PackedLoader(shards, 8, 2, seed=0).state_dict()
    with pytest.raises(ValueError, match="seed"):
        PackedLoader(shards, 8, 2, seed=1).load_state_dict(state)
    other = write_shards(make_docs(5), tmp_path / "o", meta={"endoftext_id": EOT})
    with pytest.raises(ValueError, match="other data"):
        PackedLoader(other, 8, 2, seed=0).load_state_dict(state)


def test_bad_arguments(shards, tmp_path):
    with pytest.raises(ValueError, match="rank"):
        PackedLoader(shards, 8, 2, rank=2, world_size=2)
    bare = write_shards(make_docs(3), tmp_path / "bare")
    with pytest.raises(ValueError, match="eot_id"):
        PackedLoader(bare, 8, 2)
    assert next(PackedLoader(bare, 8, 2, eot_id=EOT))["input_ids"].shape == (2, 9)


def test_long_rows_span_many_blocks(tmp_path):
    tiny = write_shards([[1001, 1002], [2001]], tmp_path / "t", meta={"endoftext_id": EOT})
    rows = batches(PackedLoader(tiny, 20, 1, shuffle=False), 2)
    assert rows[0][0].tolist()[:10] == [1001, 1002, EOT, 2001, EOT, 1001, 1002, EOT, 2001, EOT]


def test_eval_loader_without_shuffle_is_repeatable(shards):
    train, val = shards.split(val_fraction=0.2, seed=0)
    a = batches(PackedLoader(val, 8, 2, shuffle=False), 3)
    b = batches(PackedLoader(val, 8, 2, shuffle=False), 3)
    assert all(torch.equal(x, y) for x, y in zip(a, b))


# ---- mixtures ------------------------------------------------------------------------------------
def source_of(ids):
    return np.where(ids == EOT, -1, np.where(ids >= 10**6, 1, 0))


def test_mixture_token_shares_follow_weights(tmp_path):
    short = write_shards(make_docs(50, seed=1, lo=5, hi=15), tmp_path / "short", meta={"endoftext_id": EOT})
    long_ = write_shards(
        make_docs(20, seed=2, lo=60, hi=200, base=1000), tmp_path / "long", meta={"endoftext_id": EOT}
    )
    mix = Mixture({"short": short, "long": long_}, weights={"short": 0.7, "long": 0.3})
    loader = PackedLoader(mix, seq_len=64, batch_size=8, seed=0)
    ids = torch.cat([x[:, :-1] for x in batches(loader, 60)]).numpy().reshape(-1)
    # Attribute each EOT to the document it closes, so shares count separators too.
    src = source_of(ids)
    for i in np.flatnonzero(src == -1):
        src[i] = src[i - 1] if i else src[i + 1]
    share_short = (src == 0).mean()
    assert abs(share_short - 0.7) < 0.03, share_short
    # The short source is upweighted (it has far fewer tokens) so it repeats: a new epoch reshuffles it.
    assert short.n_tokens < long_.n_tokens


def test_mixture_weights_forms_and_checks(tmp_path):
    a = write_shards(make_docs(4), tmp_path / "a", meta={"endoftext_id": EOT})
    b = write_shards(make_docs(4, seed=1, base=1000), tmp_path / "b", meta={"endoftext_id": EOT})
    assert Mixture([(a, 3), (b, 1)]).weights.tolist() == [0.75, 0.25]
    assert Mixture([a, b]).names == ["a", "b"]
    assert Mixture({"a": a, "b": b}, weights={"a": 1}).names == ["a"]  # weight 0 leaves a source out
    with pytest.raises(ValueError, match="unknown"):
        Mixture({"a": a}, weights={"z": 1})
    with pytest.raises(ValueError, match=">= 0"):
        Mixture([(a, -1), (b, 1)])
    assert Mixture([a, b]).meta == {"endoftext_id": EOT}


def test_mixture_resume_and_ranks(tmp_path):
    a = write_shards(make_docs(9, seed=3), tmp_path / "a", meta={"endoftext_id": EOT})
    b = write_shards(make_docs(5, seed=4, base=1000), tmp_path / "b", meta={"endoftext_id": EOT})
    mix = Mixture([(a, 0.5), (b, 0.5)])
    full = batches(PackedLoader(mix, 10, 4, seed=1), 30)
    part = PackedLoader(mix, 10, 4, seed=1)
    batches(part, 11)
    resumed = PackedLoader(Mixture([(a, 0.5), (b, 0.5)]), 10, 4, seed=1)
    resumed.load_state_dict(part.state_dict())
    assert all(torch.equal(x, y) for x, y in zip(full[11:], batches(resumed, 19)))
    r1 = batches(PackedLoader(mix, 10, 2, rank=1, world_size=2, seed=1), 30)
    assert all(torch.equal(x[2:], y) for x, y in zip(full, r1))


# ---- properties over random shapes ---------------------------------------------------------------


@settings(max_examples=25, deadline=None)
@given(
    lengths=st.lists(st.integers(1, 40), min_size=1, max_size=12),
    T=st.integers(1, 24),
    B=st.integers(1, 3),
    W=st.integers(1, 3),
    k=st.integers(0, 6),
    mixed=st.booleans(),
    seed=st.integers(0, 2**31),
)
def test_properties(tmp_path_factory, lengths, T, B, W, k, mixed, seed):
    root = tmp_path_factory.mktemp("p")
    docs = [np.arange(n) + 1000 * (i + 1) for i, n in enumerate(lengths)]
    data = write_shards(docs, root / "a", shard_tokens=17, meta={"endoftext_id": EOT})
    if mixed:
        data = Mixture(
            [(data, 0.6), (write_shards([[5, 6, 5]], root / "b", meta={"endoftext_id": EOT}), 0.4)]
        )
    steps = 8
    one = batches(PackedLoader(data, T, B * W, seed=seed), steps)
    ranks = [batches(PackedLoader(data, T, B, r, W, seed=seed), steps) for r in range(W)]
    for s in range(steps):
        assert torch.equal(torch.cat([r[s] for r in ranks]), one[s])
    # Rows chain: each row's last id is the next row's first, so nothing is lost between rows.
    rows = torch.cat(one)
    assert torch.equal(rows[1:, 0], rows[:-1, -1])
    # Every document is followed by EOT, and ids of one document stay in order.
    stream = rows[:, :-1].reshape(-1).numpy()
    pieces, _ = split_on_eot(stream)
    known = {tuple(d.tolist()) for d in docs} | {(5, 6, 5)}
    assert all(p in known for p in pieces[1:])
    resumed = PackedLoader(data, T, B * W, seed=seed)
    batches(resumed, k)
    again = PackedLoader(data, T, B * W, seed=seed)
    again.load_state_dict(resumed.state_dict())
    assert all(torch.equal(x, y) for x, y in zip(one[k:], batches(again, steps - k)))


# ---- spread: each step's rows far apart in the stream ------------------------------------------
def test_spread_reads_each_window_row_once_with_rows_spread_apart(shards):
    T, G, S = 10, 4, 5
    plain = torch.cat(batches(PackedLoader(shards, T, G, seed=3), 2 * S))  # the first two windows, in order
    spread = batches(PackedLoader(shards, T, G, seed=3, spread=S), 2 * S)
    for w in range(2):  # a window's steps read exactly its rows, each once
        window = plain[w * S * G : (w + 1) * S * G]
        got = torch.cat(spread[w * S : (w + 1) * S])
        assert sorted(map(tuple, got.tolist())) == sorted(map(tuple, window.tolist()))
        for j in range(S):  # step j of the window: rows j, j + S, j + 2S, ...
            assert torch.equal(spread[w * S + j], window[j::S])


def test_spread_ranks_stack_and_resume_mid_window(shards):
    T, B, S = 8, 3, 4
    one = batches(PackedLoader(shards, T, 2 * B, seed=1, spread=S), 11)
    r0 = PackedLoader(shards, T, B, rank=0, world_size=2, seed=1, spread=S)
    r1 = PackedLoader(shards, T, B, rank=1, world_size=2, seed=1, spread=S)
    for g in one[:6]:
        assert torch.equal(torch.cat([next(r0)["input_ids"], next(r1)["input_ids"]]), g)
    state = json.loads(json.dumps(r0.state_dict()))  # 6 steps: 2 into the second window
    assert state == r1.state_dict() and state["in_window"] == 2
    resumed = PackedLoader(shards, T, 2 * B, seed=1, spread=S)
    resumed.load_state_dict(state)
    assert all(torch.equal(x, y) for x, y in zip(one[6:], batches(resumed, 5)))
    with pytest.raises(ValueError, match="spread"):
        PackedLoader(shards, T, 2 * B, seed=1, spread=2).load_state_dict(state)
    with pytest.raises(ValueError, match="window"):  # another global batch only at a window's start
        PackedLoader(shards, T, B, seed=1, spread=S).load_state_dict(state)
