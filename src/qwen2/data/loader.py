"""Packing documents into fixed-length rows: a deterministic, resumable, rank-aware loader.

Pre-training packs documents back to back with `<|endoftext|>` after each one and cuts the stream
into rows of a fixed length (the paper trains on 4,096-token sequences, then 32,768 in the
long-context stage). The stream is

    doc, EOT, doc, EOT, ...   documents in the order of mixture.py (epoch-wise reshuffled from `seed`)

and global row i is stream[i*T : i*T + T + 1]: T + 1 ids, so that inputs = row[:-1] and labels =
row[1:]; consecutive rows overlap by one id, and every id of the stream is a label exactly once (no
token is lost at a row boundary, and none is padding).

Batches. With G = batch_size * world_size and `spread` S, the stream is read in windows of S*G rows:
step j of a window (j = 0..S-1) takes the window's rows j, j + S, j + 2S, ... (G of them), and rank r
gets the r-th run of B of those. Every row of a window is read exactly once, and the rows of one step
lie S rows apart, so one long document does not fill many steps in a row (with S = 1, step k simply
takes global rows [k*G, (k+1)*G)). The ranks' rows are disjoint, and stacking the ranks' batches in
rank order gives exactly the batch a single process with batch_size G reads: the same global batch
gives the same data however many processes share it.

Each batch is `{"input_ids": LongTensor[B, T + 1]}`; an objective takes `x[:, :-1]` as inputs and
`x[:, 1:]` as labels. Attention is not masked at document boundaries (as in the paper's packing).

Resuming. The position is the number of stream ids before the current window, plus the step within
it. `state_dict()` holds them (with a hint to find the block without replaying earlier ones) and is the
same on every rank: saving rank 0's is enough. `load_state_dict()` puts the loader exactly there, so a
resumed run reads the batches the uninterrupted one would have read; it refuses another seed, spread
or other data. A resumed run may change the batch size or world size at a window's start (always, with
S = 1): it goes on from the same id of the stream.
"""

from __future__ import annotations

import bisect
import os

import numpy as np
import torch

from qwen2.data.mixture import Mixture
from qwen2.data.shards import ShardSet


class PackedLoader:
    """Endless iterator of packed batches over a ShardSet or a Mixture (see the module docstring).

        loader = PackedLoader(shards, seq_len=512, batch_size=8, rank=rank, world_size=world, seed=0)
        batch = next(loader)              # {"input_ids": LongTensor[8, 513]}
        state = loader.state_dict()       # into the checkpoint
        loader.load_state_dict(state)     # on resume

    `eot_id` defaults to the shards' recorded `endoftext_id`. `shuffle=False` reads documents in stored
    order (evaluation on held-out data: every call from a fresh loader gives the same batches).
    `spread`: steps per window (see the module docstring); 1 reads consecutive rows.
    """

    def __init__(
        self,
        data: ShardSet | Mixture | str | os.PathLike,
        seq_len: int,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        *,
        eot_id: int | None = None,
        shuffle: bool = True,
        spread: int = 1,
    ):
        if isinstance(data, (str, os.PathLike)):
            from qwen2.data.prepare import open_corpus

            data = open_corpus(data)
        self.mixture = data if isinstance(data, Mixture) else Mixture([data])
        if seq_len < 1 or batch_size < 1 or spread < 1:
            raise ValueError(
                f"PackedLoader: seq_len, batch_size and spread must be >= 1, got {seq_len}, {batch_size} "
                f"and {spread}"
            )
        if not 0 <= rank < world_size:
            raise ValueError(f"PackedLoader: rank {rank} is not in [0, world_size={world_size})")
        if eot_id is None:
            eot_id = self.mixture.meta.get("endoftext_id")
            if eot_id is None:
                raise ValueError(
                    "PackedLoader: the shards record no endoftext_id; pass eot_id=tok.endoftext_id"
                )
        self.seq_len, self.batch_size, self.rank, self.world_size = seq_len, batch_size, rank, world_size
        self.seed, self.eot_id, self.shuffle, self.spread = seed, int(eot_id), shuffle, spread
        self.position = 0  # stream ids before the current window
        self.in_window = 0  # steps of the current window already taken
        self.step = 0
        # Start offsets in the stream of blocks first_block, first_block + 1, ... as far as read.
        self._first_block, self._starts = 0, [0]
        self._blocks: dict[int, tuple] = {}  # e -> (src, doc, cum): a small cache of loaded blocks

    # ---- the stream ----------------------------------------------------------------------------
    def _block(self, e: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Block e's documents and cum, where document j spans stream[cum[j] : cum[j+1]] (its EOT last)."""
        if e not in self._blocks:
            if len(self._blocks) >= 3:
                self._blocks.pop(min(self._blocks))
            src, doc = self.mixture.block(e, self.seed, self.shuffle)
            cum = np.zeros(len(doc) + 1, np.int64)
            np.cumsum(self.mixture.lengths(src, doc) + 1, out=cum[1:])
            self._blocks[e] = (src, doc, cum)
        return self._blocks[e]

    def _locate(self, offset: int) -> tuple[int, int]:
        """(block e, its start in the stream) for the block that holds stream id `offset`."""
        if offset < self._starts[0]:
            raise ValueError(f"PackedLoader: stream offset {offset} precedes the resumed position")
        while offset >= self._starts[-1]:  # extend the known block starts up to `offset`
            e = self._first_block + len(self._starts) - 1
            self._starts.append(self._starts[-1] + int(self._block(e)[2][-1]))
        i = bisect.bisect_right(self._starts, offset) - 1
        return self._first_block + i, self._starts[i]

    def read(self, offset: int, n: int) -> np.ndarray:
        """stream[offset : offset + n] as int64."""
        out = np.empty(n, np.int64)
        e, start = self._locate(offset)
        filled = 0
        while filled < n:
            src, doc, cum = self._block(e)
            local = offset - start
            if local >= cum[-1]:
                start += int(cum[-1])
                e += 1
                if e - self._first_block >= len(self._starts):
                    self._starts.append(start)
                continue
            j = int(np.searchsorted(cum, local, side="right")) - 1
            within, doc_len = local - int(cum[j]), int(cum[j + 1] - cum[j]) - 1
            if within < doc_len:
                take = min(doc_len - within, n - filled)
                out[filled : filled + take] = self.mixture.tokens(int(src[j]), int(doc[j]))[
                    within : within + take
                ]
            else:
                take = 1
                out[filled] = self.eot_id
            filled += take
            offset += take
        return out

    # ---- batches -------------------------------------------------------------------------------
    @property
    def global_batch_size(self) -> int:
        return self.batch_size * self.world_size

    @property
    def tokens_per_step(self) -> int:
        """New stream ids per step over all ranks (each row adds seq_len: its last id starts the next row)."""
        return self.global_batch_size * self.seq_len

    @property
    def epoch(self) -> float:
        """Blocks read so far, fractional (with one source: epochs over its documents)."""
        e, start = self._locate(self.position)
        return e + (self.position - start) / int(self._block(e)[2][-1])

    def __iter__(self) -> PackedLoader:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        T, B, S = self.seq_len, self.batch_size, self.spread
        rows = [self.in_window + S * (self.rank * B + i) for i in range(B)]  # row numbers within the window
        batch = np.stack([self.read(self.position + r * T, T + 1) for r in rows])
        self.step += 1
        self.in_window += 1
        if self.in_window == S:
            self.position += S * self.tokens_per_step
            self.in_window = 0
            self._forget_before(self.position)
        return {"input_ids": torch.from_numpy(batch)}

    def _forget_before(self, offset: int) -> None:
        """Drop block starts before the block of `offset`: the list stays a few entries long."""
        e, start = self._locate(offset)
        drop = e - self._first_block
        if drop > 0:
            self._first_block, self._starts = e, self._starts[drop:]

    # ---- resuming ------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """The exact position, identical on every rank (plain ints and lists: JSON- and torch.save-able)."""
        e, start = self._locate(self.position)
        return {
            "version": 1,
            "position": self.position,
            "in_window": self.in_window,
            "spread": self.spread,
            "step": self.step,
            "block": e,
            "block_start": start,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "seq_len": self.seq_len,
            "global_batch_size": self.global_batch_size,
            "data": self.mixture.fingerprint(),
        }

    def load_state_dict(self, state: dict) -> None:
        if state.get("version") != 1:
            raise ValueError(f"PackedLoader: loader state version {state.get('version')!r} is not 1")
        if state["seed"] != self.seed or state.get("shuffle", True) != self.shuffle:
            raise ValueError(
                f"PackedLoader: the state is for seed {state['seed']} (shuffle {state.get('shuffle')}), "
                f"this loader has seed {self.seed} (shuffle {self.shuffle}); resume with the same ones"
            )
        if state["data"] != self.mixture.fingerprint():
            raise ValueError(
                "PackedLoader: the state was saved over other data (sources, sizes or weights differ): "
                f"{state['data']} vs {self.mixture.fingerprint()}"
            )
        if state.get("spread", 1) != self.spread:
            raise ValueError(
                f"PackedLoader: the state is for spread {state.get('spread', 1)}, this loader has "
                f"spread {self.spread}; resume with the same one"
            )
        in_window = int(state.get("in_window", 0))
        if in_window and (state["global_batch_size"], state["seq_len"]) != (
            self.global_batch_size,
            self.seq_len,
        ):
            raise ValueError(
                f"PackedLoader: the state is {in_window} steps into a window of global batch "
                f"{state['global_batch_size']} x {state['seq_len']}; resume with that global batch and "
                f"sequence length (they may change only at a window's start)"
            )
        if not 0 <= state["block_start"] <= state["position"]:
            raise ValueError(f"PackedLoader: inconsistent state {state}")
        self.position, self.step, self.in_window = int(state["position"]), int(state["step"]), in_window
        self._first_block, self._starts = int(state["block"]), [int(state["block_start"])]
        self._blocks.clear()
