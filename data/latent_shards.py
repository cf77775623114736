"""Latent shards: training samples with their autoencoder latents computed once, ahead of time.

A pixel sample (from shards or the procedural generator) fixes its mask and mode by
(seed, key), so encoding its target and its masked target once gives exactly the two latents
the training step would compute: the model's inputs do not change, the step just skips both
VAE encodes. Each extra pass with another seed draws fresh masks and modes (over the same
objects, for pixel shards): mask variety costs disk, not step time.

  <key>.lat.npy      float16 [C, h, w] target latent, scaled as the model sees it
  <key>.mlat.npy     float16 [C, h, w] latent of the masked target (target * (1 - mask))
  <key>.tgt.png      instead of both latents, for a pixel-space model (whose latent is the
                     target itself): the target, uint8 RGB, exact and smaller
  <key>.mask.png     target mask at image size
  <key>.ref.png      reference image, uint8 RGB (exact: the contract's reference is k / 255)
  <key>.refmask.png  reference mask
  <key>.json         {"mode", "seed", "source_key"}

``latents.json`` next to the shards records the sizes and the autoencoder that made them;
the DataModule and the LightningModule check it before training.

Reading a sample is only decoding (no rendering, mask drawing or warping), so these shards are
also the fast way to feed the tiny pixel-space model on a GPU: written ahead on any CPUs,
read at several times the generator's rate per core (benchmarks/README.md).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, Dataset, IterableDataset
from tqdm import tqdm

from data.masks import MaskConfig
from data.modes import decode_pixels
from data.shards import (
    SampleDecoder,
    ShardErrors,
    ShardPipeline,
    decode_npy,
    decode_png,
    decode_with,
    encode_npy,
    encode_png,
    expand_urls,
    split_by_rank,
    split_webdataset,
)
from data.synthetic import SyntheticPairs

MANIFEST = "latents.json"
LATENT_DTYPES = {"float16": torch.float16, "float32": torch.float32}
PIXEL_SPACE = "PixelSpace"  # the fingerprint kind of an autoencoder whose latents are pixels
PIXEL_STORAGE = "uint8"  # the manifest's dtype when targets are stored instead of latents


def read_manifest(urls: str | list[str]) -> dict[str, Any]:
    """The manifest of every folder the shards live in, checked to agree; counts summed.

    Folders come from parallel writers (``make_latent_shards.py --part``); all must have been
    written for the same sizes, storage dtype and autoencoder.
    """
    folders = sorted({Path(u).parent for u in expand_urls(urls)})
    manifests = []
    for folder in folders:
        path = folder / MANIFEST
        if not path.is_file():
            raise FileNotFoundError(
                f"no {MANIFEST} next to the shards ({path}): latent shards are written by "
                "scripts/make_latent_shards.py")
        manifests.append(json.loads(path.read_text()))
    first = manifests[0]
    for folder, other in zip(folders[1:], manifests[1:], strict=True):
        for field in ("image_size", "reference_size", "dtype", "autoencoder"):
            if other[field] != first[field]:
                raise ValueError(f"latent shards in {folder} have {field}={other[field]!r}, "
                                 f"those in {folders[0]} {first[field]!r}")
    return {**first, "count": sum(m["count"] for m in manifests), "folders": len(folders)}


# ----------------------------------------------------------------------------- sources
Triple = tuple[str, int, dict[str, torch.Tensor]]


@dataclass(frozen=True)
class _KeyedDecoder:
    """Raw pixel-shard sample -> (key, seed, decoded sample); picklable for loader workers."""

    decode: SampleDecoder

    def __call__(self, raw: dict) -> Triple:
        return raw["__key__"], self.decode.seed, self.decode(raw)


class _KeyedSynthetic(Dataset):
    """Items ``part::parts`` of ``SyntheticPairs(seed=s)`` for every seed s, as
    (key, seed, sample); keys are the global item numbers, unique across parts."""

    def __init__(self, num: int, seeds: Sequence[int], part: int = 0, parts: int = 1,
                 **kwargs: Any) -> None:
        self.items = list(range(part, num, parts))
        self.seeds = list(seeds)
        self.sets = [SyntheticPairs(length=num, seed=s, **kwargs) for s in self.seeds]

    def __len__(self) -> int:
        return len(self.items) * len(self.seeds)

    def __getitem__(self, index: int) -> Triple:
        which, j = divmod(index, len(self.items))
        i = self.items[j]
        return f"{i:08d}", self.seeds[which], self.sets[which][i]


def _iterate(dataset: Any, workers: int) -> Iterable[Triple]:
    """The dataset's items, in order, produced by ``workers`` loader processes (0: here)."""
    if workers <= 0:
        return dataset if isinstance(dataset, IterableDataset) else map(
            dataset.__getitem__, range(len(dataset)))
    return DataLoader(dataset, batch_size=None, num_workers=workers)


def shard_samples(urls: str | list[str], seeds: Iterable[int], image_size: int,
                  reference_size: int, align_ratio: float = 0.5,
                  mask_config: MaskConfig | None = None, workers: int = 0, part: int = 0,
                  parts: int = 1) -> Iterator[Triple]:
    """Every pixel-shard sample decoded as training decodes it with each seed (mask, mode);
    with ``parts`` > 1, only the shards of ``part`` (every parts-th shard)."""
    mine = list(split_by_rank(expand_urls(urls), part, parts))
    if not mine:
        return
    for seed in seeds:
        decode = SampleDecoder(seed, image_size, reference_size, align_ratio, None, mask_config)
        raw = split_webdataset(mine, rank=0, world_size=1)
        yield from _iterate(raw.map(_KeyedDecoder(decode)), workers)


def synthetic_samples(num: int, seeds: Iterable[int], image_size: int, reference_size: int,
                      align_ratio: float = 0.5, mask_config: MaskConfig | None = None,
                      workers: int = 0, part: int = 0, parts: int = 1) -> Iterable[Triple]:
    """Items 0..num-1 (those of ``part``) of ``SyntheticPairs(seed=s)`` for each seed."""
    dataset = _KeyedSynthetic(num, list(seeds), part, parts, image_size=image_size,
                              reference_size=reference_size, align_ratio=align_ratio,
                              mask_config=mask_config)
    return _iterate(dataset, workers)


# ----------------------------------------------------------------------------- writing
@torch.no_grad()
def encode_samples(
    samples: Iterable[Triple],
    autoencoder: torch.nn.Module,
    batch_size: int = 16,
    device: torch.device | str = "cpu",
    autocast_dtype: torch.dtype | None = None,
) -> Iterator[tuple[str, int, dict[str, torch.Tensor], torch.Tensor, torch.Tensor]]:
    """(source key, seed, sample, latent, masked latent) for each sample, encoded in batches.

    The two encodes are exactly those of the training step: ``target`` and
    ``target * (1 - mask)``, through the module's own ``Autoencoder.encode``.
    """
    device = torch.device(device)
    autoencoder = autoencoder.to(device).eval()

    def flush(chunk: list) -> Iterator:
        target = torch.stack([s["target"] for _, _, s in chunk]).to(device)
        mask = torch.stack([s["mask"] for _, _, s in chunk]).to(device)
        with torch.autocast(device.type, autocast_dtype, enabled=autocast_dtype is not None):
            latents = autoencoder.encode(target).float().cpu()
            masked = autoencoder.encode(target * (1 - mask)).float().cpu()
        for (key, seed, sample), lat, mlat in zip(chunk, latents, masked, strict=True):
            yield key, seed, sample, lat, mlat

    chunk: list = []
    for item in samples:
        chunk.append(item)
        if len(chunk) == batch_size:
            yield from flush(chunk)
            chunk = []
    if chunk:
        yield from flush(chunk)


def _to_uint8(pixels: torch.Tensor, low: float) -> np.ndarray:
    """Contract pixels in [low, 1] -> the uint8 values they were made from, [H, W, C]."""
    scale = 255.0 / (1.0 - low)
    values = ((pixels - low) * scale).round().clamp(0, 255).byte().permute(1, 2, 0)
    return np.ascontiguousarray(values.numpy())


def latent_record(source_key: str, seed: int, sample: dict[str, torch.Tensor],
                  latent: torch.Tensor | None, masked_latent: torch.Tensor | None,
                  dtype: torch.dtype = torch.float16) -> dict:
    """One latent-shard sample, keyed ``<source_key>_s<seed>`` (fields: module docstring);
    without latents (pixel space) the target itself is stored."""
    key = f"{source_key}_s{seed}"
    if "." in key:
        raise ValueError(f"sample keys must not contain '.': {key!r}")
    if latent is None or masked_latent is None:
        inputs = {"tgt.png": encode_png(_to_uint8(sample["target"], -1.0))}
    else:
        inputs = {"lat.npy": encode_npy(latent.to(dtype).numpy()),
                  "mlat.npy": encode_npy(masked_latent.to(dtype).numpy())}
    return {
        "__key__": key,
        **inputs,
        "mask.png": encode_png(sample["mask"][0].numpy() > 0.5),
        "ref.png": encode_png(_to_uint8(sample["reference"], 0.0)),
        "refmask.png": encode_png(sample["reference_mask"][0].numpy() > 0.5),
        "json": json.dumps({"mode": int(sample["mode"]), "seed": seed,
                            "source_key": source_key}).encode(),
    }


def write_latent_shards(
    samples: Iterable[Triple],
    autoencoder: torch.nn.Module,
    out_dir: str | Path,
    per_shard: int,
    image_size: int,
    reference_size: int,
    batch_size: int = 16,
    device: torch.device | str = "cpu",
    dtype: str = "float16",
    autocast_dtype: torch.dtype | None = None,
    total: int | None = None,
    source: dict[str, Any] | None = None,
) -> list[Path]:
    """Encode ``(source key, seed, sample)`` triples into ``<out_dir>/latent-*.tar`` + manifest.

    ``autoencoder`` is a module with ``encode`` and ``fingerprint()`` (models/autoencoder.py's
    are); its fingerprint goes into the manifest, so training can refuse mismatched latents.
    A pixel-space autoencoder encodes nothing: its targets are stored, exactly, as uint8
    (``dtype`` does not apply).
    """
    if dtype not in LATENT_DTYPES:
        raise ValueError(f"dtype must be one of {sorted(LATENT_DTYPES)}, got {dtype!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    count = 0
    fingerprint = autoencoder.fingerprint()
    pixels = fingerprint["kind"] == PIXEL_SPACE
    if pixels:
        encoded = ((key, seed, sample, None, None) for key, seed, sample in samples)
    else:
        encoded = encode_samples(samples, autoencoder, batch_size, device, autocast_dtype)
    with wds.ShardWriter(str(out / "latent-%06d.tar"), maxcount=per_shard, verbose=0,
                         mtime=0) as sink:  # no pax header per member: less to parse
        for key, seed, sample, lat, mlat in tqdm(encoded, total=total, desc="write",
                                                 unit="sample"):
            if sample["target"].shape[-1] != image_size:
                raise ValueError(f"sample {key} is {sample['target'].shape[-1]} px, "
                                 f"expected {image_size}")
            sink.write(latent_record(key, seed, sample, lat, mlat, LATENT_DTYPES[dtype]))
            count += 1
    manifest = {"count": count, "image_size": image_size, "reference_size": reference_size,
                "dtype": PIXEL_STORAGE if pixels else dtype, "autoencoder": fingerprint,
                "source": source or {}}
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return sorted(out.glob("latent-*.tar"))


# ----------------------------------------------------------------------------- reading
@dataclass(frozen=True)
class LatentDecoder:
    """Raw latent-shard sample -> the sample contract, with ``latents`` and ``masked_latents``
    in place of ``target`` (which the step only needs for encoding), or ``target`` itself
    (pixel space). ``compact``: uint8 / bool pixels, as the pixel loaders send them
    (``data.modes.decode_pixels``)."""

    compact: bool = False

    def __call__(self, sample: dict) -> dict[str, Any]:
        def image(field: str) -> torch.Tensor:
            return torch.from_numpy(np.ascontiguousarray(
                decode_png(sample[field]).transpose(2, 0, 1)))

        def mask(field: str) -> torch.Tensor:
            return torch.from_numpy(decode_png(sample[field], mask=True)[None])

        out: dict[str, Any] = {"__key__": sample["__key__"]}
        if "tgt.png" in sample:
            out["target"] = image("tgt.png")
        else:
            for name, field in (("latents", "lat.npy"), ("masked_latents", "mlat.npy")):
                out[name] = torch.from_numpy(decode_npy(sample[field]).astype(np.float32))
        out.update(mask=mask("mask.png"), reference=image("ref.png"),
                   reference_mask=mask("refmask.png"),
                   mode=torch.tensor(json.loads(sample["json"])["mode"], dtype=torch.int64))
        return out if self.compact else decode_pixels(out)


def latent_shard_dataset(
    urls: str | list[str],
    seed: int = 0,
    shuffle: int = 0,
    resampled: bool = False,
    epoch_length: int | None = None,
    rank: int | None = None,
    world_size: int | None = None,
    errors: ShardErrors | None = None,
    compact: bool = False,
) -> ShardPipeline:
    """IterableDataset over latent shards, split over ranks and workers like pixel shards;
    with `errors`, unreadable shards and samples are skipped and counted, else they raise.
    `compact`: uint8 / bool pixels, a quarter of the bytes through loader workers."""
    ds = split_webdataset(urls, seed, shuffle, resampled, rank, world_size, errors)
    ds = decode_with(ds, LatentDecoder(compact), errors)
    return ds.with_epoch(epoch_length) if epoch_length is not None else ds
