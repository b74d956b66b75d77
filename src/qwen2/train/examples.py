"""ExampleLoader: epoch-exact, rank-split micro-batches of records for post-training (train.posttrain,
train.online_dpo)."""

from __future__ import annotations

import torch


class ExampleLoader:
    """Micro-batches of records for one rank: `collate(micro_indices, step_indices)` builds each.

    The stream is epoch after epoch of seeded permutations of range(n) (no record dropped, none
    repeated within an epoch); its position is the only state, so a checkpoint restores it exactly.
    """

    def __init__(
        self,
        n: int,
        collate,
        batch_size: int,
        grad_accum: int = 1,
        rank: int = 0,
        world: int = 1,
        seed: int = 0,
        shuffle: bool = True,
    ):
        if n < 1:
            raise ValueError("ExampleLoader: no records to train on")
        self.n, self.collate, self.bs, self.accum = n, collate, batch_size, grad_accum
        self.rank, self.world, self.seed, self.shuffle = rank, world, seed, shuffle
        self.micro = 0  # micro-batches this rank has produced
        self._perms: dict[int, list[int]] = {}

    @classmethod
    def for_run(cls, cfg, n: int, collate, rank: int, world: int) -> ExampleLoader:
        """The loader a post-training config asks for (its batch size, accumulation and seed)."""
        return cls(n, collate, cfg.batch_size, cfg.grad_accum, rank, world, cfg.seed)

    @property
    def step_size(self) -> int:
        """Records per optimizer step, all ranks."""
        return self.bs * self.accum * self.world

    def _record(self, pos: int) -> int:
        epoch, i = divmod(pos, self.n)
        if epoch not in self._perms:
            if len(self._perms) > 2:
                self._perms.pop(min(self._perms))
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            perm = torch.randperm(self.n, generator=g) if self.shuffle else torch.arange(self.n)
            self._perms[epoch] = perm.tolist()
        return self._perms[epoch][i]

    def __iter__(self):
        return self

    def __next__(self):
        step, i = divmod(self.micro, self.accum)
        start = step * self.step_size
        mine = start + (i * self.world + self.rank) * self.bs
        micro = [self._record(p) for p in range(mine, mine + self.bs)]
        whole = [self._record(p) for p in range(start, start + self.step_size)]
        self.micro += 1
        return self.collate(micro, whole)

    def state_dict(self) -> dict:
        return {"micro": self.micro}

    def load_state_dict(self, state: dict) -> None:
        self.micro = int(state["micro"])
