"""LightningDataModule over synthetic pairs, pixel shards or latent shards, plus an
alignment-mode validation set.

Validation is always synthetic, in alignment mode (the full reference) with its own seed in
the "validation" seed namespace (data/synthetic.py), so it shares no item with the training
set whatever the seeds, and correspondence mIoU of the cross-attention maps is measured on the
same cases every run, whatever the training source.

Every training loader sends compact samples (uint8 images, bool masks: data/modes.py)
through the worker processes, pinning and the device copy, a quarter of the float32 bytes
(latent shards: their pixels; latents stay float); the `on_after_batch_transfer` hook turns
them into the float contract on the device, to the same values. `val_set` and a synthetic
`train_set` themselves still give float samples; a shard `train_set` is the loader's stream
and gives compact ones.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import pytorch_lightning as pl
from torch.utils.data import DataLoader, Dataset, IterableDataset

from data.latent_shards import latent_shard_dataset, read_manifest
from data.masks import MaskConfig
from data.modes import ALIGNMENT, decode_pixels
from data.resumable_loader import (
    ResumableLoader,
    ResumableSampler,
    ResumableStream,
    ResumableStreamLoader,
)
from data.shards import ShardErrors, expand_urls, shard_dataset
from data.synthetic import SyntheticPairs

log = logging.getLogger(__name__)

SOURCES = ("synthetic", "shards", "latent_shards")


class PairDataModule(pl.LightningDataModule):
    """Training pairs from `source` and a fixed validation set.

    `source`: "synthetic" (generated on the fly), "shards" (scripts/make_shards.py) or
    "latent_shards" (scripts/make_latent_shards.py: latents precomputed, no VAE in the step;
    mode mix and masks were fixed when they were written).

    Shard sources skip unreadable shards and samples (warned, counted in `shard_errors`) and
    stop once more than `max_skip_fraction` of what was seen is skipped, checked from
    `skip_check_after` samples on.

    `compact_batches`: batches' pixels travel as uint8 / bool and are decoded to float32
    after the device transfer (identical values); a loader of this module used outside a
    Trainer gives compact batches, which `data.modes.decode_pixels` decodes.
    """

    def __init__(
        self,
        source: str = "synthetic",
        shard_urls: str | Sequence[str] | None = None,
        batch_size: int = 8,
        num_workers: int = 0,
        image_size: int = 64,
        reference_size: int = 224,
        align_ratio: float = 0.5,
        train_length: int = 10_000,
        train_seed: int = 0,
        val_length: int = 64,
        val_seed: int = 1_000_003,
        shuffle_buffer: int = 1000,
        resampled: bool = True,
        pin_memory: bool = False,
        mask_p_detail: float = 0.5,
        mask_p_brush: float = 0.3,
        mask_p_box: float = 0.2,
        mask_min_area: float = 0.02,
        mask_max_area: float = 0.5,
        max_skip_fraction: float = 0.01,
        skip_check_after: int = 1000,
        compact_batches: bool = True,
    ) -> None:
        super().__init__()
        if source not in SOURCES:
            raise ValueError(f"source must be one of {SOURCES}, got {source!r}")
        if source != "synthetic" and not shard_urls:
            raise ValueError(f"source={source!r} needs shard_urls, e.g. "
                             "'dir/shard-{000000..000009}.tar'")
        if shard_urls is not None and not isinstance(shard_urls, str):
            shard_urls = [str(url) for url in shard_urls]  # a checkpoint loads plain types only
        self.save_hyperparameters(logger=False)
        self.mask_config = MaskConfig(mask_p_detail, mask_p_brush, mask_p_box, mask_min_area,
                                      mask_max_area)
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self.latent_manifest: dict | None = None
        self.shard_errors: ShardErrors | None = None  # counts of skipped shard data (shards only)

    def setup(self, stage: str | None = None) -> None:
        hp = self.hparams
        if self.train_set is None:
            if hp.source == "synthetic":
                self.train_set = SyntheticPairs(
                    length=hp.train_length, seed=hp.train_seed, image_size=hp.image_size,
                    reference_size=hp.reference_size, align_ratio=hp.align_ratio,
                    mask_config=self.mask_config)
            else:
                per_worker = max(1, hp.train_length // max(1, hp.num_workers))
                rank, world = self._placement()
                urls = expand_urls(hp.shard_urls)
                self.shard_errors = ShardErrors(hp.max_skip_fraction, hp.skip_check_after)
            if hp.source == "latent_shards":
                self.latent_manifest = self._checked_manifest(urls)
                self.train_set = latent_shard_dataset(
                    urls, seed=hp.train_seed, shuffle=hp.shuffle_buffer,
                    resampled=hp.resampled, epoch_length=per_worker if hp.resampled else None,
                    rank=rank, world_size=world, errors=self.shard_errors,
                    compact=hp.compact_batches)
            elif hp.source == "shards":
                self.train_set = shard_dataset(
                    urls, seed=hp.train_seed, image_size=hp.image_size,
                    reference_size=hp.reference_size, align_ratio=hp.align_ratio,
                    mask_config=self.mask_config, shuffle=hp.shuffle_buffer,
                    resampled=hp.resampled, epoch_length=per_worker if hp.resampled else None,
                    rank=rank, world_size=world, errors=self.shard_errors,
                    compact=hp.compact_batches)
            if hp.source != "synthetic" and hp.resampled:
                if per_worker < hp.batch_size:
                    raise ValueError(
                        f"data.train_length={hp.train_length} over {max(1, hp.num_workers)} "
                        f"loader workers leaves each fewer samples than a batch "
                        f"({hp.batch_size})")
                self.train_set = ResumableStream(self.train_set, per_worker // hp.batch_size,
                                                 hp.batch_size, hp.num_workers)
        if self.val_set is None:
            self.val_set = SyntheticPairs(
                length=hp.val_length, seed=hp.val_seed, image_size=hp.image_size,
                reference_size=hp.reference_size, force_mode=ALIGNMENT,
                mask_config=self.mask_config, namespace="validation")

    def _placement(self) -> tuple[int | None, int | None]:
        """(rank, world size) of this process; (None, None) before a trainer attaches."""
        trainer = self.trainer
        return (trainer.global_rank, trainer.world_size) if trainer else (None, None)

    def _checked_manifest(self, urls: str | list[str]) -> dict:
        """The latent shards' manifest, refused if written for other image sizes."""
        hp = self.hparams
        manifest = read_manifest(urls)
        for field in ("image_size", "reference_size"):
            if manifest[field] != hp[field]:
                raise ValueError(f"latent shards were written at {field}={manifest[field]}, "
                                 f"data.{field} is {hp[field]}")
        written = manifest.get("source", {}).get("align_ratio")
        if written is not None and written != hp.align_ratio:
            log.warning("data.align_ratio=%s is ignored: these latent shards fixed the modes "
                        "with align_ratio=%s when they were written", hp.align_ratio, written)
        return manifest

    def _loader(self, ds: Dataset, train: bool) -> DataLoader:
        hp = self.hparams
        iterable = isinstance(ds, IterableDataset)
        if hp.compact_batches and isinstance(ds, SyntheticPairs):
            ds = ds.compact_view()
        common = dict(batch_size=hp.batch_size, num_workers=hp.num_workers,
                      pin_memory=hp.pin_memory, persistent_workers=hp.num_workers > 0,
                      drop_last=train)
        if train and not iterable:
            rank, world = self._placement()
            sampler = ResumableSampler(ds, seed=hp.train_seed, num_replicas=world or 1,
                                       rank=rank or 0)
            return ResumableLoader(ds, sampler=sampler, **common)
        if train and isinstance(ds, ResumableStream):
            return ResumableStreamLoader(ds, **common)
        return DataLoader(ds, **common)

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Compact pixels -> the float32 contract, on the device; then the precision's input
        conversion, which Lightning ran before the transfer, when floats were not there yet."""
        if not isinstance(batch, dict):
            return batch
        batch = decode_pixels(batch)
        trainer = self.trainer
        return trainer.precision_plugin.convert_input(batch) if trainer is not None else batch

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, train=False)
