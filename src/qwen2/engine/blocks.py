"""BlockManager: which KV-cache blocks each sequence holds, with reference counts and prefix reuse.

Reference: vLLM's automatic prefix caching (Kwon et al., SOSP 2023): a full block is named by a hash
of its tokens chained to the hash of the block before it, so two prompts that share a prefix share
its blocks and the second one computes only what follows. Freed blocks keep their contents and their
name until they are reused, least recently freed first, so a system prompt stays cached between
requests. The blocks' storage is paged_cache.py's KVPool; this file only does the bookkeeping.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict

import numpy as np


def block_hashes(
    tokens: list[int], block_size: int, n_blocks: int, prefix: list[bytes] | None = None
) -> list[bytes]:
    """Chained digests of the first `n_blocks` full blocks of `tokens`; `prefix` holds ones already known."""
    out = list(prefix or [])[:n_blocks]
    parent = out[-1] if out else b""
    for i in range(len(out), n_blocks):
        chunk = np.asarray(tokens[i * block_size : (i + 1) * block_size], dtype=np.int64)
        parent = hashlib.sha256(parent + chunk.tobytes()).digest()
        out.append(parent)
    return out


class BlockManager:
    """Allocation, reference counts and prefix reuse over `num_blocks` blocks of `block_size` tokens.

    A block is in use (ref > 0) or free. Free blocks sit in `free`, least recently freed first; a free
    block that still holds a named (hashed) full block can be claimed back by a prefix match until it
    is handed out as a fresh block, which erases its name.
    """

    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need num_blocks >= 1 and block_size >= 1, got {num_blocks}, {block_size}")
        self.num_blocks, self.block_size = num_blocks, block_size
        self.ref = [0] * num_blocks
        self.free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self.by_hash: dict[bytes, int] = {}
        self.hash_of: dict[int, bytes] = {}

    @property
    def num_free(self) -> int:
        return len(self.free)

    def blocks_for(self, n_tokens: int) -> int:
        return -(-n_tokens // self.block_size)

    def match_prefix(self, hashes: list[bytes]) -> list[int]:
        """The blocks holding the longest cached run of `hashes` from the start (no references taken)."""
        out = []
        for h in hashes:
            b = self.by_hash.get(h)
            if b is None:
                break
            out.append(b)
        return out

    def can_admit(self, cached: list[int], n_tokens: int) -> bool:
        """Whether a sequence reusing `cached` blocks can hold `n_tokens` tokens in all."""
        revived = sum(1 for b in cached if self.ref[b] == 0)  # cached but free: they leave the free list
        return self.blocks_for(n_tokens) - len(cached) + revived <= self.num_free

    def take(self, cached: list[int]) -> list[int]:
        """Reference the cached blocks of a prefix match; returns them as the start of a block table."""
        for b in cached:
            if self.ref[b] == 0:
                del self.free[b]
            self.ref[b] += 1
        return list(cached)

    def grow(self, table: list[int], n_tokens: int) -> bool:
        """Append fresh blocks to `table` until it holds `n_tokens`; False (nothing taken) if too few free."""
        need = self.blocks_for(n_tokens) - len(table)
        if need > self.num_free:
            return False
        for _ in range(need):
            b, _ = self.free.popitem(last=False)
            h = self.hash_of.pop(b, None)
            if h is not None:
                del self.by_hash[h]
            self.ref[b] = 1
            table.append(b)
        return True

    def release(self, table: list[int]) -> None:
        """Drop a sequence's references. Its last blocks are freed first, so they are reused first and
        the shared prefix blocks stay cached longest."""
        for b in reversed(table):
            self.ref[b] -= 1
            if self.ref[b] == 0:
                self.free[b] = None
        table.clear()

    def forget_prefixes(self) -> None:
        """Drop every block's name: cached prefixes no longer match (their KV came from old weights)."""
        self.by_hash.clear()
        self.hash_of.clear()

    def name(self, block: int, h: bytes) -> None:
        """Record that `block` now holds the full block named `h` (first holder wins)."""
        if h not in self.by_hash and block not in self.hash_of:
            self.by_hash[h] = block
            self.hash_of[block] = h
