"""WebDataset shards of (reference view, target view, correspondence) pairs.

One sample holds everything except the mask and mode, which are drawn when it is read, so
one set of shards serves both training modes:

  <key>.ref.png     reference view (RGB)
  <key>.tgt.png     target view (RGB)
  <key>.t2r.npy     float16 [Ht, Wt, 2] reference (x, y) of every target pixel (NaN = none)
  <key>.fp.png      target footprint mask (object pixels)
  <key>.detail.png  target detail mask (logos, lettering, patterns)
  <key>.json        metadata; "warp" holds exact warp parameters when the warp is synthetic

Readers draw masks and modes from SeedSequence((seed, crc32(key))), so a sample decodes the
same way whatever the worker, node or shard order. Decoded samples follow the contract of
`data.modes` plus webdataset's "__key__" string (collated as a list of keys).
"""

from __future__ import annotations

import io
import json
import logging
import multiprocessing
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from functools import partial
from itertools import islice
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.distributed as dist
import webdataset as wds
from PIL import Image

from data.geometry import Warp, make_target
from data.masks import MaskConfig, make_mask
from data.modes import to_sample
from data.objects import ObjectView
from data.synthetic import SyntheticPairs, draw_mode, working_sizes

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")


# ----------------------------------------------------------------------------- encoding
def encode_png(array: np.ndarray) -> bytes:
    """PNG bytes of a uint8 RGB image or a bool mask (stored as 0/255 grayscale)."""
    if array.dtype == bool:
        array = array.astype(np.uint8) * 255
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def decode_png(data: bytes, mask: bool = False) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as im:
        if mask:
            return np.asarray(im.convert("L")) > 127
        return np.asarray(im.convert("RGB"))


def encode_npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def decode_npy(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


def _to_float16(coords: np.ndarray) -> np.ndarray:
    """float16 coordinates; far-outside points are clamped (still outside) to avoid inf."""
    return np.clip(coords, -30000.0, 30000.0).astype(np.float16)


def make_record(key: str, reference_rgb: np.ndarray, target_rgb: np.ndarray,
                target_to_reference: np.ndarray, footprint: np.ndarray, detail: np.ndarray,
                meta: dict) -> dict:
    """One webdataset sample (see module docstring for the fields)."""
    if "." in key:
        raise ValueError(f"sample keys must not contain '.': {key!r}")
    return {
        "__key__": key,
        "ref.png": encode_png(reference_rgb),
        "tgt.png": encode_png(target_rgb),
        "t2r.npy": encode_npy(_to_float16(target_to_reference)),
        "fp.png": encode_png(footprint),
        "detail.png": encode_png(detail),
        "json": json.dumps(meta).encode(),
    }


def write_shards(records: Iterable[dict], out_dir: str | Path, per_shard: int,
                 prefix: str = "shard") -> list[Path]:
    """Write records into <out_dir>/<prefix>-NNNNNN.tar, `per_shard` samples each."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pattern = str(out / f"{prefix}-%06d.tar")
    with wds.ShardWriter(pattern, maxcount=per_shard, verbose=0) as sink:
        for rec in records:
            sink.write(rec)
    return sorted(out.glob(f"{prefix}-*.tar"))


# ----------------------------------------------------------------------------- sources
def synthetic_records(num: int, seed: int, image_size: int = 64,
                      reference_size: int = 224) -> Iterator[dict]:
    """Procedural pairs identical to SyntheticPairs(seed=seed) item i, as shard records."""
    ds = SyntheticPairs(length=num, seed=seed, image_size=image_size,
                        reference_size=reference_size)
    for i in range(num):
        p = ds.pair(i)
        meta = {"source": "synthetic", "seed": seed, "index": i, "warp": p.warp.to_dict(),
                "object": p.reference.meta}
        yield make_record(f"{seed:06d}_{i:08d}", p.reference.rgb, p.target.rgb,
                          p.warp.target_to_reference, p.target.footprint, p.target.detail, meta)


def _load_rgb(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def _load_mask(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("L")) > 0


def _find(folder: Path, stem: str) -> Path | None:
    for ext in IMAGE_EXTENSIONS:
        for cand in (folder / f"{stem}{ext}", folder / f"{stem}{ext.upper()}"):
            if cand.is_file():
                return cand
    return None


def _pad_square(img: np.ndarray, value) -> np.ndarray:
    h, w = img.shape[:2]
    s = max(h, w)
    top, left = (s - h) // 2, (s - w) // 2
    return cv2.copyMakeBorder(img, top, s - h - top, left, s - w - left, cv2.BORDER_CONSTANT,
                              value=value)


def edge_detail(rgb: np.ndarray, footprint: np.ndarray) -> np.ndarray:
    """Proxy for identity-bearing detail in real photos: dense edges inside the object."""
    grey = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    edges = cv2.Canny(grey, 60, 160)
    k = max(3, rgb.shape[0] // 64) | 1
    return cv2.dilate(edges, np.ones((k, k), np.uint8)).astype(bool) & footprint


def object_view_from_image(rgb: np.ndarray, mask: np.ndarray | None, size: int) -> ObjectView:
    """A real object photo as a square reference view (padded with its border colour)."""
    border = np.concatenate([rgb[0], rgb[-1], rgb[:, 0], rgb[:, -1]])
    fill = tuple(int(v) for v in np.median(border, axis=0))
    fp = np.ones(rgb.shape[:2], np.uint8) if mask is None else mask.astype(np.uint8)
    rgb_sq = cv2.resize(_pad_square(rgb, fill), (size, size), interpolation=cv2.INTER_AREA)
    fp_sq = cv2.resize(_pad_square(fp * 255, 0), (size, size), interpolation=cv2.INTER_AREA)
    footprint = fp_sq > 127
    return ObjectView(rgb=rgb_sq, footprint=footprint, detail=edge_detail(rgb_sq, footprint),
                      meta={"source": "image"})


def _resize_flow(flow: np.ndarray, ref_hw: tuple[int, int], tgt_size: int,
                 ref_size: int) -> np.ndarray:
    """Resample a target->reference flow to square target/reference working sizes."""
    hr, wr = ref_hw
    f = cv2.resize(flow.astype(np.float32), (tgt_size, tgt_size),
                   interpolation=cv2.INTER_NEAREST)
    f[..., 0] = (f[..., 0] + 0.5) * (ref_size / wr) - 0.5
    f[..., 1] = (f[..., 1] + 0.5) * (ref_size / hr) - 0.5
    return f


def image_folder_records(folder: str | Path, seed: int, image_size: int = 64,
                         reference_size: int = 224) -> Iterator[dict]:
    """Records from real images in `folder` (sorted, deterministic given `seed`).

    - `<name>.<ext>` (+ optional `<name>_mask.png` footprint): an object photo, paired with
      a random synthetic warp of itself (self-supervised pair, exact correspondence).
    - `<name>_ref.<ext>`, `<name>_tgt.<ext>`, `<name>_flow.npy` (target->reference (x, y)
      in original pixels, NaN where unknown), optional `<name>_tgt_mask.png`: a multi-view
      pair. Pairs without a flow are skipped with a warning.
    Images are resized to square working sizes (aspect not preserved for multi-view pairs).
    """
    folder = Path(folder)
    ref_res, tgt_res = working_sizes(image_size, reference_size)
    files = sorted(p for p in folder.iterdir()
                   if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    for idx, path in enumerate(files):
        stem = path.stem
        if stem.endswith(("_mask", "_tgt", "_flow")):
            continue
        rng = np.random.default_rng(np.random.SeedSequence([seed, zlib.crc32(stem.encode())]))
        key = f"{idx:08d}_{''.join(c if c.isalnum() else '_' for c in stem)}"
        if stem.endswith("_ref"):
            name = stem[: -len("_ref")]
            tgt_path, flow_path = _find(folder, f"{name}_tgt"), folder / f"{name}_flow.npy"
            if tgt_path is None or not flow_path.is_file():
                log.warning("skipping multi-view pair %s: missing %s", name,
                            "target image" if tgt_path is None else "flow (.npy)")
                continue
            ref = _load_rgb(path)
            tgt = _load_rgb(tgt_path)
            flow = np.load(flow_path, allow_pickle=False)
            if flow.shape != (*tgt.shape[:2], 2):
                log.warning("skipping multi-view pair %s: flow shape %s != target %s", name,
                            flow.shape, tgt.shape[:2])
                continue
            t2r = _resize_flow(flow, ref.shape[:2], tgt_res, ref_res)
            valid = (np.isfinite(t2r).all(-1) & (t2r[..., 0] > -0.5) & (t2r[..., 1] > -0.5)
                     & (t2r[..., 0] < ref_res - 0.5) & (t2r[..., 1] < ref_res - 0.5))
            mask_path = _find(folder, f"{name}_tgt_mask")
            fp = valid
            if mask_path is not None:
                m = cv2.resize(_load_mask(mask_path).astype(np.uint8), (tgt_res, tgt_res),
                               interpolation=cv2.INTER_NEAREST).astype(bool)
                fp = m & valid
            t2r[~valid] = np.nan
            tgt_sq = cv2.resize(tgt, (tgt_res, tgt_res), interpolation=cv2.INTER_AREA)
            ref_sq = cv2.resize(ref, (ref_res, ref_res), interpolation=cv2.INTER_AREA)
            meta = {"source": "multiview", "name": name, "warp": {}}
            yield make_record(key, ref_sq, tgt_sq, t2r, fp, edge_detail(tgt_sq, fp), meta)
            continue
        mask_path = _find(folder, f"{stem}_mask")
        mask = _load_mask(mask_path) if mask_path is not None else None
        rgb = _load_rgb(path)
        if mask is not None and mask.shape != rgb.shape[:2]:
            log.warning("skipping %s: mask size %s != image %s", stem, mask.shape, rgb.shape[:2])
            continue
        view = object_view_from_image(rgb, mask, ref_res)
        if not view.footprint.any():
            log.warning("skipping %s: empty mask", stem)
            continue
        target, warp = make_target(view, tgt_res, rng)
        meta = {"source": "image", "name": stem, "warp": warp.to_dict()}
        yield make_record(key, view.rgb, target.rgb, warp.target_to_reference,
                          target.footprint, target.detail, meta)


# ----------------------------------------------------------------------------- reading
def sample_generators(seed: int, key: str) -> tuple[np.random.Generator, np.random.Generator]:
    """(mask, mode) generators of a shard sample, fixed by (seed, key)."""
    a, b = np.random.SeedSequence([seed, zlib.crc32(key.encode())]).spawn(2)
    return np.random.default_rng(a), np.random.default_rng(b)


def warp_from_record(t2r: np.ndarray, meta: dict, reference_shape: tuple[int, int]) -> Warp:
    """Exact warp from stored parameters when present, else the stored flow (splat inverse)."""
    params = meta.get("warp") or {}
    if params:
        return Warp.from_dict(params)
    return Warp(t2r.astype(np.float32), tuple(reference_shape))


@dataclass(frozen=True)
class SampleDecoder:
    """Raw shard sample -> sample contract of `data.modes` (mask and mode drawn here).

    A picklable class rather than a closure, so DataLoader workers can be spawned.
    """

    seed: int = 0
    image_size: int = 64
    reference_size: int = 224
    align_ratio: float = 0.5
    force_mode: int | None = None
    mask_config: MaskConfig | None = None

    def __call__(self, sample: dict) -> dict[str, torch.Tensor]:
        key = sample["__key__"]
        ref = decode_png(sample["ref.png"])
        tgt = decode_png(sample["tgt.png"])
        fp = decode_png(sample["fp.png"], mask=True)
        detail = decode_png(sample["detail.png"], mask=True)
        meta = json.loads(sample["json"])
        warp = warp_from_record(decode_npy(sample["t2r.npy"]), meta, ref.shape[:2])
        mask_rng, mode_rng = sample_generators(self.seed, key)
        mask, _ = make_mask(fp, detail, mask_rng, self.mask_config)
        mode = draw_mode(mode_rng, self.align_ratio, self.force_mode)
        return to_sample(tgt, mask, ref, warp.map_mask_to_reference(mask), mode,
                         self.image_size, self.reference_size, mode_rng)


def expand_urls(urls: str | Iterable[str]) -> list[str]:
    """Shard urls from a list, a brace pattern ('dir/shard-{000000..000009}.tar') or a local
    glob ('dir/*/latent-*.tar', sorted); refuses a glob that matches nothing."""
    import glob

    import braceexpand

    if not isinstance(urls, str):
        return [str(u) for u in urls]
    if any(c in urls for c in "*?["):
        found = sorted(glob.glob(urls, recursive=True))
        if not found:
            raise FileNotFoundError(f"no shard matches {urls!r}")
        return found
    return list(braceexpand.braceexpand(urls))


def split_by_rank(urls: Iterable[str], rank: int, world_size: int) -> Iterator[str]:
    """This rank's shards: every `world_size`-th url, starting at `rank`."""
    yield from islice(urls, rank, None, world_size)


class ShardReadError(RuntimeError):
    """Too many unreadable shards or samples: the data, not one bad file, is broken."""


class ShardErrors:
    """webdataset error handler that skips a bad shard or sample, counts it and warns with
    the shard and key, and stops once skips exceed ``max_fraction`` of what was seen (read +
    skipped), checked from ``check_after`` seen on.

    A skip is one event: a sample that fails to decode, or the rest of a shard that cannot be
    read (a truncated shard loses its remaining samples as one skip). Counts live in shared
    memory, one slot per loader worker (no lock, no lost updates), so the training process
    and every worker see the totals whatever the workers' start method.
    """

    SLOTS = 64  # the main process and loader workers 0..62 (more share slots modulo)

    def __init__(self, max_fraction: float = 0.01, check_after: int = 1000) -> None:
        if not 0 <= max_fraction <= 1:
            raise ValueError(f"max_fraction must be in [0, 1], got {max_fraction}")
        self.max_fraction = max_fraction
        self.check_after = check_after
        self._counts = multiprocessing.RawArray("q", 2 * self.SLOTS)  # (read, skipped) per slot

    @property
    def read(self) -> int:
        return sum(self._counts[0::2])

    @property
    def skipped(self) -> int:
        return sum(self._counts[1::2])

    def _slot(self) -> int:
        worker = torch.utils.data.get_worker_info()
        return 2 * (0 if worker is None else (worker.id + 1) % self.SLOTS)

    def count_read(self) -> None:
        self._counts[self._slot()] += 1

    def __call__(self, exn: Exception) -> bool:
        """The handler: warn, count, and continue (True) unless past the limit."""
        self._counts[self._slot() + 1] += 1
        read, skipped = self.read, self.skipped
        log.warning("skipping unreadable shard data (%d skipped so far): %s", skipped,
                    _describe(exn))
        seen = read + skipped
        if seen >= self.check_after and skipped > self.max_fraction * seen:
            raise ShardReadError(
                f"{skipped} of {seen} shard samples or shards were unreadable, more than "
                f"data.max_skip_fraction={self.max_fraction}; last: {_describe(exn)}") from exn
        return True


def _describe(exn: Exception) -> str:
    """The error with the shard url that webdataset appended to its args."""
    where = [a for a in exn.args[1:] if isinstance(a, str)]
    head = exn.args[0] if exn.args else ""
    return f"{type(exn).__name__}: {head}" + (f" (shard {where[-1]})" if where else "")


class SampleError(ValueError):
    """One shard sample that could not be decoded (names its shard and key)."""


@dataclass(frozen=True)
class CountedDecoder:
    """Decode a raw sample; on failure raise `SampleError` naming the shard and key (for
    `ShardErrors` to skip), on success count it as read. Picklable for loader workers."""

    decode: Callable[[dict], dict]
    errors: ShardErrors

    def __call__(self, sample: dict) -> dict:
        try:
            out = self.decode(sample)
        except Exception as err:
            raise SampleError(f"shard {sample.get('__url__')}, sample {sample.get('__key__')}: "
                              f"{type(err).__name__}: {err}") from err
        self.errors.count_read()
        return out


class ShardPipeline(wds.DataPipeline, wds.compat.FluidInterface):
    """A webdataset pipeline with the fluent interface (``.map``, ``.with_epoch``)."""


def same_stream_seed() -> int:
    """ResampledShards' per-process seed: one for every rank and worker (they then split the
    one stream, see `split_webdataset`)."""
    return 0


def split_webdataset(
    urls: str | list[str],
    seed: int = 0,
    shuffle: int = 0,
    resampled: bool = False,
    rank: int | None = None,
    world_size: int | None = None,
    errors: ShardErrors | None = None,
) -> ShardPipeline:
    """Raw samples of the shards this rank and worker own, optionally shuffled or resampled.

    Unreadable shards go to ``errors`` (skipped and counted) when given, else raise.

    Shards are split over ranks by (`rank`, `world_size`), resolved here in the main process
    (from torch.distributed when not given): DataLoader workers cannot see the process group,
    and Lightning's DDP launcher and SLURM export no RANK for webdataset to read.

    Reproducible given `seed`: `resampled` draws one seeded infinite sequence of shards in
    every process and each rank and worker keeps its own slice of it (distinct streams, the
    same on every run); `shuffle` > 0 shuffles shard order (without resampling) and a sample
    buffer of that size with seeded, per-epoch permutations.
    """
    if rank is None and dist.is_available() and dist.is_initialized():
        rank, world_size = dist.get_rank(), dist.get_world_size()
    node_split = (wds.split_by_node if rank is None or world_size is None
                  else partial(split_by_rank, rank=rank, world_size=world_size))
    urls = expand_urls(urls)
    if resampled:
        source = wds.ResampledShards(urls, seed=seed, deterministic=True,
                                     worker_seed=same_stream_seed, empty_check=False)
    else:
        source = wds.SimpleShardList(urls)
    stages = [source, node_split, wds.split_by_worker]
    if shuffle > 0 and not resampled:
        stages.append(wds.detshuffle(shuffle, seed=seed))
    stages.append(wds.tarfile_to_samples(handler=errors or wds.reraise_exception))
    if shuffle > 0:
        stages.append(wds.detshuffle(shuffle, seed=seed + 1))
    return ShardPipeline(*stages)


def shard_dataset(
    urls: str | list[str],
    seed: int = 0,
    image_size: int = 64,
    reference_size: int = 224,
    align_ratio: float = 0.5,
    force_mode: int | None = None,
    mask_config: MaskConfig | None = None,
    shuffle: int = 0,
    resampled: bool = False,
    epoch_length: int | None = None,
    rank: int | None = None,
    world_size: int | None = None,
    errors: ShardErrors | None = None,
) -> ShardPipeline:
    """IterableDataset over shards (brace pattern or list), decoded to the sample contract.

    `shuffle` > 0 shuffles shards and a sample buffer of that size (order only: contents
    stay fixed per key). `resampled` draws shards with replacement forever; give
    `epoch_length` (samples per worker) to bound an epoch. Splitting: `split_webdataset`.
    With `errors`, unreadable shards and samples are skipped and counted, else they raise.
    """
    ds = split_webdataset(urls, seed, shuffle, resampled, rank, world_size, errors)
    decode = SampleDecoder(seed, image_size, reference_size, align_ratio, force_mode,
                           mask_config)
    ds = decode_with(ds, decode, errors)
    return ds.with_epoch(epoch_length) if epoch_length is not None else ds


def decode_with(ds: ShardPipeline, decode: Callable[[dict], dict],
                errors: ShardErrors | None) -> ShardPipeline:
    """``ds.map(decode)``; with ``errors``, a sample that fails is skipped and counted."""
    if errors is None:
        return ds.map(decode)
    return ds.map(CountedDecoder(decode, errors), handler=errors)
