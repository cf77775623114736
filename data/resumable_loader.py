"""A training loader that resumes mid-epoch where it stopped instead of replaying the epoch.

Lightning saves and restores a train loader's `state_dict` / `load_state_dict` with the loops.
A plain shuffled DataLoader has none, so a run resumed from a mid-epoch checkpoint drew the
epoch's first batches again: the synthetic generator is deterministic per (seed, index), so
those were the very items already trained on. Here the order is a seeded permutation per
epoch, dealt to the ranks in turn (a `DistributedSampler`, which Lightning leaves alone), and
the loader records how many of the epoch's items all ranks have drawn, so a resume, in any
number of processes, starts after them. Resampled shard streams resume the same way, per
process and loader worker (`ResumableStream`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from itertools import islice
from typing import Any

import torch
import torch.distributed as dist
import webdataset as wds
from torch.utils.data import (
    DataLoader,
    Dataset,
    DistributedSampler,
    IterableDataset,
    get_worker_info,
)

from data.shards import SkipRaw, WorkerSplit

log = logging.getLogger(__name__)


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


class ResumableStream(IterableDataset):
    """A resampled shard stream (webdataset) whose epoch can start after its first batches.

    The pipeline's seeded stages (shard resampling, shuffle buffer) count epochs from the
    process start, so a resumed run played epoch 0's stream again from its first sample.
    Here each pass plays the epoch it is told, and each loader worker drops, undecoded, as
    many samples as its share gave before the checkpoint (where samples of that share failed
    to decode, it resumes that many samples early). A DataLoader deals batches to its workers
    in turn, from worker 0 every epoch, and every worker of a resampled stream gives the same
    number, so the resumed epoch hands worker i the share whose batch came next
    (`WorkerSplit.shift`).
    The length (whole batches per worker) tells Lightning the epoch, so it does not prefetch.
    """

    def __init__(self, pipeline: wds.DataPipeline, batches_per_worker: int, batch_size: int,
                 workers: int) -> None:
        super().__init__()
        if pipeline.nsamples <= 0:
            raise ValueError("a resumable stream needs an epoch length (`with_epoch`)")
        self.pipeline, self.batch_size = pipeline, batch_size
        self.length = batches_per_worker * batch_size * max(1, workers)
        self.epoch = 0  # the epoch the next pass plays
        self.skip = 0  # batches this process drew of it before a resume

    def __len__(self) -> int:
        return self.length

    def __iter__(self) -> Iterator[Any]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        epoch, skip = self.epoch, self.skip
        self.epoch, self.skip = epoch + 1, 0  # persistent workers count on by themselves
        share = (worker + skip) % workers
        given = len(range(share, skip, workers)) * self.batch_size
        for stage in self.pipeline.pipeline:
            if isinstance(stage, wds.ResampledShards | wds.detshuffle):
                stage.epoch = epoch - 1  # each adds one when it starts a pass
            elif isinstance(stage, WorkerSplit):
                stage.shift = skip % workers
            elif isinstance(stage, SkipRaw):
                stage.count = given
        return islice(iter(self.pipeline), self.pipeline.nsamples - given)


class ResumableStreamLoader(DataLoader):
    """A DataLoader over a `ResumableStream` whose state is the epoch and its batches drawn.

    A resume in another number of processes or loader workers cannot find where each stream
    stopped: it warns and plays the recorded epoch from its start.
    """

    _epoch = -1
    _drawn = 0  # batches this process drew in the current epoch
    _resume: dict[str, int] | None = None

    def _placement(self) -> dict[str, int]:
        return {"processes": max(1, dist.get_world_size()) if dist.is_initialized() else 1,
                "workers": max(1, self.num_workers)}

    def __iter__(self) -> Iterator[Any]:
        stream, state, self._resume = self.dataset, self._resume, None
        self._epoch, self._drawn = self._epoch + 1, 0
        if state is not None:
            self._epoch, self._drawn = state["epoch"], state["batches"]
            if self._drawn >= len(self):
                self._epoch, self._drawn = self._epoch + 1, 0
            elif any(state.get(k, v) != v for k, v in self._placement().items()):
                log.warning("resumed with %s, saved with %s: the shard stream plays epoch %d "
                            "from its start", self._placement(), state, self._epoch)
                self._drawn = 0
        stream.epoch, stream.skip = self._epoch, self._drawn
        for batch in super().__iter__():
            self._drawn += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": max(0, self._epoch), "batches": self._drawn, **self._placement()}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._resume = {k: int(v) for k, v in state.items()}
