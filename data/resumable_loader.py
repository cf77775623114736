"""A training loader that resumes mid-epoch where it stopped instead of replaying the epoch.

Lightning saves and restores a train loader's `state_dict` / `load_state_dict` with the loops.
A plain shuffled DataLoader has none, so a run resumed from a mid-epoch checkpoint drew the
epoch's first batches again: the synthetic generator is deterministic per (seed, index), so
those were the very items already trained on. Here the order is a seeded permutation per
epoch, dealt to the ranks in turn (a `DistributedSampler`, which Lightning leaves alone), and
the loader records how many of the epoch's items all ranks have drawn, so a resume, in any
number of processes, starts after them.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler


class ResumableSampler(DistributedSampler):
    """This rank's share of a seeded permutation per epoch, from global position `start` on."""

    def __init__(self, dataset: Dataset, seed: int, num_replicas: int = 1, rank: int = 0) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed,
                         drop_last=True)
        self.start = 0

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(len(self.dataset), generator=generator)
        start, self.start = self.start, 0  # only the resumed epoch starts late
        order = order[start:]
        order = order[: len(order) - len(order) % self.num_replicas]
        return iter(order[self.rank::self.num_replicas].tolist())


class ResumableLoader(DataLoader):
    """A DataLoader over a `ResumableSampler` whose state is the epoch's items drawn so far.

    Lightning does not prefetch from a loader with a length, so at a checkpoint the count is
    the items trained on.
    """

    _drawn = 0  # items of all ranks drawn in the current epoch
    _resume: tuple[int, int] | None = None

    def __iter__(self) -> Iterator[Any]:
        sampler, self._drawn = self.sampler, 0
        if self._resume is not None and isinstance(sampler, ResumableSampler):
            epoch, items = self._resume
            if epoch == sampler.epoch and items < len(self.dataset):
                sampler.start = self._drawn = items
        self._resume = None
        per_batch = self.batch_size * getattr(sampler, "num_replicas", 1)
        for batch in super().__iter__():
            self._drawn += per_batch
            yield batch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": int(getattr(self.sampler, "epoch", 0)), "items": self._drawn}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._resume = (int(state["epoch"]), int(state["items"]))
