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
from data.masks import MaskConfig, make_mask, mask_bbox
from data.modes import resize_image, resize_mask, to_sample
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
    """uint8 RGB [H, W, 3], or bool [H, W] for a mask (OpenCV decodes a third faster than PIL)."""
    image = cv2.imdecode(np.frombuffer(data, np.uint8),
                         cv2.IMREAD_GRAYSCALE if mask else cv2.IMREAD_COLOR_RGB)
    if image is None:
        raise ValueError(f"not a decodable image ({len(data)} bytes)")
    return image > 127 if mask else image


def encode_npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def decode_npy(data: bytes) -> np.ndarray:
    """The array of an .npy file, read once more where CPython 3.11's shared AST state failed
    numpy's header parse (`SystemError: AST constructor recursion depth mismatch`, seen once
    in a forked loader worker; CPython gh-106905)."""
    try:
        return np.load(io.BytesIO(data), allow_pickle=False)
    except SystemError:
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
    # an integer mtime needs no pax header per member: a third less tar parsing per sample
    # when read, and the same records give the same bytes
    with wds.ShardWriter(pattern, maxcount=per_shard, verbose=0, mtime=0) as sink:
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


def load_rgb(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def load_mask(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("L")) > 0


def find_image(folder: Path, stem: str) -> Path | None:
    for ext in IMAGE_EXTENSIONS:
        for cand in (folder / f"{stem}{ext}", folder / f"{stem}{ext.upper()}"):
            if cand.is_file():
                return cand
    return None


def _border_fill(rgb: np.ndarray) -> tuple[int, ...]:
    """Median colour of the image border (what padding is filled with)."""
    border = np.concatenate([rgb[0], rgb[-1], rgb[:, 0], rgb[:, -1]])
    return tuple(int(v) for v in np.median(border, axis=0))


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
    fill = _border_fill(rgb)
    fp = np.ones(rgb.shape[:2], np.uint8) if mask is None else mask.astype(np.uint8)
    rgb_sq = cv2.resize(_pad_square(rgb, fill), (size, size), interpolation=cv2.INTER_AREA)
    fp_sq = cv2.resize(_pad_square(fp * 255, 0), (size, size), interpolation=cv2.INTER_AREA)
    footprint = fp_sq > 127
    return ObjectView(rgb=rgb_sq, footprint=footprint, detail=edge_detail(rgb_sq, footprint),
                      meta={"source": "image"})


FITS = ("squash", "pad", "crop")
FLOW_KINK_PX = 0.5  # second difference (reference px) up to which a flow is interpolated


@dataclass(frozen=True)
class Window:
    """The part of an original image that becomes a working square: top-left (x0, y0) and
    size (w, h) in original pixels; it may extend past the image (padding).

    Output pixel x covers original [x0 + x w / size, x0 + (x + 1) w / size), so pixel centres
    map by `to_output` / `from_output` (a coordinate x is the centre of pixel column x).
    """

    x0: int
    y0: int
    w: int
    h: int

    def _scale(self, size: int) -> np.ndarray:
        return np.array([size / self.w, size / self.h])

    def to_output(self, pts: np.ndarray, size: int) -> np.ndarray:
        """Original (x, y) -> working-square (x, y)."""
        return (pts - np.array([self.x0, self.y0]) + 0.5) * self._scale(size) - 0.5

    def from_output(self, pts: np.ndarray, size: int) -> np.ndarray:
        """Working-square (x, y) -> original (x, y)."""
        return (pts + 0.5) / self._scale(size) - 0.5 + np.array([self.x0, self.y0])

    def cut(self, img: np.ndarray, fill) -> np.ndarray:
        """The window's pixels (padded with `fill` where it leaves the image), not resized."""
        h, w = img.shape[:2]
        top, left = max(0, -self.y0), max(0, -self.x0)
        bottom, right = max(0, self.y0 + self.h - h), max(0, self.x0 + self.w - w)
        if top or left or bottom or right:
            img = cv2.copyMakeBorder(img, top, bottom, left, right, cv2.BORDER_CONSTANT,
                                     value=fill)
        y0, x0 = self.y0 + top, self.x0 + left
        return img[y0:y0 + self.h, x0:x0 + self.w]

    def to_list(self) -> list[int]:
        return [self.x0, self.y0, self.w, self.h]


def fit_window(hw: tuple[int, int], fit: str, focus: np.ndarray | None = None) -> Window:
    """Window of an (h, w) image for `fit`: "squash" the whole image (aspect ratio lost),
    "pad" to the longer side (centred), or "crop" to the shorter side, centred on the box of
    `focus` (bool [h, w], e.g. the object) when given, else on the image, inside the image."""
    h, w = hw
    if fit == "squash":
        return Window(0, 0, w, h)
    if fit == "pad":
        s = max(h, w)
        return Window(-((s - w) // 2), -((s - h) // 2), s, s)
    if fit != "crop":
        raise ValueError(f"fit must be one of {FITS}, got {fit!r}")
    s = min(h, w)
    box = mask_bbox(focus) if focus is not None else None
    cx, cy = ((box[0] + box[2]) / 2, (box[1] + box[3]) / 2) if box else (w / 2, h / 2)
    x0 = min(max(int(round(cx - s / 2)), 0), w - s)
    y0 = min(max(int(round(cy - s / 2)), 0), h - s)
    return Window(x0, y0, s, s)


def sample_nearest_and_linear(img: np.ndarray, coords: np.ndarray
                              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`img` [H, W, ...] float at (x, y) `coords` [..., 2]: (nearest, bilinear, corners).

    NaN outside the image; bilinear is NaN where any of the four corners is NaN or outside;
    corners holds the four corner values [4, ..., C] (NaN outside) for consistency checks.
    """
    h, w = img.shape[:2]
    x, y = coords[..., 0], coords[..., 1]
    chans = img.shape[2:]
    flat = img.reshape(h, w, -1).astype(np.float64)

    def gather(xi: np.ndarray, yi: np.ndarray) -> np.ndarray:
        ok = (xi >= 0) & (xi < w) & (yi >= 0) & (yi < h)
        out = np.full((*xi.shape, flat.shape[2]), np.nan)
        out[ok] = flat[yi[ok], xi[ok]]
        return out

    finite = np.isfinite(x) & np.isfinite(y)
    x = np.where(finite, x, -10.0)
    y = np.where(finite, y, -10.0)
    nearest = gather(np.rint(x).astype(np.int64), np.rint(y).astype(np.int64))
    x0, y0 = np.floor(x).astype(np.int64), np.floor(y).astype(np.int64)
    fx, fy = (x - x0)[..., None], (y - y0)[..., None]
    corners = np.stack([gather(x0, y0), gather(x0 + 1, y0), gather(x0, y0 + 1),
                        gather(x0 + 1, y0 + 1)])
    with np.errstate(invalid="ignore"):  # inf corners: NaN, i.e. not interpolable
        linear = ((1 - fx) * (1 - fy) * corners[0] + fx * (1 - fy) * corners[1]
                  + (1 - fx) * fy * corners[2] + fx * fy * corners[3])
    shape = coords.shape[:-1] + chans
    return (nearest.reshape(shape), linear.reshape(shape),
            corners.reshape((4, *shape)))


def flow_kinks(flow: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Second differences |f(x-1) - 2 f(x) + f(x+1)| of a flow along x and along y (the larger
    of its two components), NaN where a neighbour is unknown, border pixels taking their inner
    neighbour's: ~0 on a smooth surface, the size of the jump beside a depth edge."""
    f = flow.astype(np.float64)
    out = []
    for axis in (1, 0):
        g = np.moveaxis(f, axis, 0)
        d2 = np.full(g.shape[:2], np.nan)
        if len(g) >= 3:
            d2[1:-1] = np.abs(g[:-2] - 2 * g[1:-1] + g[2:]).max(-1)
            d2[0], d2[-1] = d2[1], d2[-2]
        out.append(np.moveaxis(d2, 0, axis))
    return out[0], out[1]


def sample_flow(flow: np.ndarray, coords: np.ndarray) -> np.ndarray:
    """A target->reference flow at target (x, y) `coords`: bilinear where the four neighbours
    lie on one smooth piece (no second difference over FLOW_KINK_PX along either axis, with
    at least one known per row and column of the cell), else the nearest pixel's value, so
    values are never blended across a depth edge; NaN outside or where unknown."""
    nearest, linear, _ = sample_nearest_and_linear(flow, coords)
    kx, ky = flow_kinks(flow)
    _, _, cx = sample_nearest_and_linear(kx, coords)  # corners (x0,y0) (x1,y0) (x0,y1) (x1,y1)
    _, _, cy = sample_nearest_and_linear(ky, coords)
    smooth = (np.isfinite(linear).all(-1)
              & (np.fmax(cx[0], cx[1]) <= FLOW_KINK_PX) & (np.fmax(cx[2], cx[3]) <= FLOW_KINK_PX)
              & (np.fmax(cy[0], cy[2]) <= FLOW_KINK_PX) & (np.fmax(cy[1], cy[3]) <= FLOW_KINK_PX))
    return np.where(smooth[..., None], linear, nearest).astype(np.float32)


def flow_pair_record(key: str, reference_rgb: np.ndarray, target_rgb: np.ndarray,
                     target_to_reference: np.ndarray, meta: dict, reference_size: int,
                     target_size: int, fit: str = "squash",
                     target_mask: np.ndarray | None = None,
                     reference_mask: np.ndarray | None = None) -> dict | None:
    """A multi-view pair given by a dense flow, as a shard record at working sizes.

    `target_to_reference` [Ht, Wt, 2]: reference (x, y) of each target pixel in original
    pixels, NaN where unknown (occluded, no depth, outside). Both views are brought to
    squares by `fit` (see `fit_window`; "pad" and "crop" keep the aspect ratio) and the flow
    is resampled and re-expressed in the same way, so it stays exact up to sampling. The
    footprint is the target mask (or every pixel) where the flow lands in the reference
    square. Returns None when no target pixel keeps a correspondence.
    """
    ht, wt = target_rgb.shape[:2]
    if target_to_reference.shape != (ht, wt, 2):
        raise ValueError(f"flow shape {target_to_reference.shape} != target {(ht, wt, 2)}")
    known = np.isfinite(target_to_reference).all(-1)
    focus = known if target_mask is None else known & target_mask
    t_win = fit_window((ht, wt), fit, focus)
    if reference_mask is None and fit == "crop" and focus.any():
        reference_mask = np.zeros(reference_rgb.shape[:2], bool)
        q = np.rint(target_to_reference[focus]).astype(np.int64)
        hr, wr = reference_mask.shape
        q = q[(q[:, 0] >= 0) & (q[:, 0] < wr) & (q[:, 1] >= 0) & (q[:, 1] < hr)]
        reference_mask[q[:, 1], q[:, 0]] = True
    r_win = fit_window(reference_rgb.shape[:2], fit, reference_mask)

    ys, xs = np.mgrid[0:target_size, 0:target_size].astype(np.float64)
    src = t_win.from_output(np.stack([xs, ys], -1), target_size)
    t2r = r_win.to_output(sample_flow(target_to_reference, src).astype(np.float64),
                          reference_size).astype(np.float32)
    with np.errstate(invalid="ignore"):
        valid = (np.isfinite(t2r).all(-1) & (t2r[..., 0] > -0.5) & (t2r[..., 1] > -0.5)
                 & (t2r[..., 0] < reference_size - 0.5) & (t2r[..., 1] < reference_size - 0.5))
    fp = valid
    if target_mask is not None:
        cut = t_win.cut(target_mask.astype(np.uint8), 0).astype(bool)
        fp = valid & resize_mask(cut, target_size, keep_nonempty=False)
    if not fp.any():
        return None
    t2r[~valid] = np.nan
    tgt_sq = resize_image(t_win.cut(target_rgb, _border_fill(target_rgb)), target_size)
    ref_sq = resize_image(r_win.cut(reference_rgb, _border_fill(reference_rgb)), reference_size)
    meta = {**meta, "warp": {}, "fit": fit, "target_window": t_win.to_list(),
            "reference_window": r_win.to_list()}
    return make_record(key, ref_sq, tgt_sq, t2r, fp, edge_detail(tgt_sq, fp), meta)


def image_folder_records(folder: str | Path, seed: int, image_size: int = 64,
                         reference_size: int = 224, fit: str = "squash") -> Iterator[dict]:
    """Records from real images in `folder` (sorted, deterministic given `seed`).

    - `<name>.<ext>` (+ optional `<name>_mask.png` footprint): an object photo, paired with
      a random synthetic warp of itself (self-supervised pair, exact correspondence).
    - `<name>_ref.<ext>`, `<name>_tgt.<ext>`, `<name>_flow.npy` (target->reference (x, y)
      in original pixels, NaN where unknown), optional `<name>_tgt_mask.png`: a multi-view
      pair, brought to squares by `fit` (`flow_pair_record`; "squash" loses the aspect
      ratio). Pairs without a flow are skipped with a warning.
    """
    folder = Path(folder)
    if fit not in FITS:
        raise ValueError(f"fit must be one of {FITS}, got {fit!r}")
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
            tgt_path, flow_path = find_image(folder, f"{name}_tgt"), folder / f"{name}_flow.npy"
            if tgt_path is None or not flow_path.is_file():
                log.warning("skipping multi-view pair %s: missing %s", name,
                            "target image" if tgt_path is None else "flow (.npy)")
                continue
            tgt = load_rgb(tgt_path)
            flow = np.load(flow_path, allow_pickle=False)
            if flow.shape != (*tgt.shape[:2], 2):
                log.warning("skipping multi-view pair %s: flow shape %s != target %s", name,
                            flow.shape, tgt.shape[:2])
                continue
            mask_path = find_image(folder, f"{name}_tgt_mask")
            mask = load_mask(mask_path) if mask_path is not None else None
            if mask is not None and mask.shape != tgt.shape[:2]:
                log.warning("skipping multi-view pair %s: target mask size %s != target %s",
                            name, mask.shape, tgt.shape[:2])
                continue
            rec = flow_pair_record(key, load_rgb(path), tgt, flow,
                                   {"source": "multiview", "name": name}, ref_res, tgt_res,
                                   fit, target_mask=mask)
            if rec is None:
                log.warning("skipping multi-view pair %s: no target pixel lands in the "
                            "reference", name)
                continue
            yield rec
            continue
        mask_path = find_image(folder, f"{stem}_mask")
        mask = load_mask(mask_path) if mask_path is not None else None
        rgb = load_rgb(path)
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
    """The stored flow, with the exact inverse from stored parameters when present (else
    the splat inverse). Reading needs the flow only to bound a mask's region, with a 2-3 px
    margin that its float16 rounding (at most 1/16 px below 256 px) stays well inside
    (`tests/test_shards.py` compares the mapped masks); recomputing the flow from the
    parameters cost a sixth of a sample's decoding."""
    params = meta.get("warp") or {}
    t2r = t2r.astype(np.float32)
    if params:
        return Warp.from_dict(params, target_to_reference=t2r)
    return Warp(t2r, tuple(reference_shape))


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
    compact: bool = False  # uint8 / bool pixels (data.modes.decode_pixels)

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
                         self.image_size, self.reference_size, mode_rng, self.compact)


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


class WorkerSplit(wds.PipelineStage):
    """This loader worker's share of the shard sequence, as `wds.split_by_worker` deals it.

    `shift` hands worker i the share of worker i + shift for one pass: a resumed epoch whose
    next batch is worker k's starts its loader at worker 0 (`data.resumable_loader`).
    """

    shift = 0

    def run(self, src: Iterable) -> Iterator:
        _, _, worker, workers = wds.utils.pytorch_worker_info()
        return islice(src, (worker + self.shift) % workers, None, workers)


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
    stages = [source, node_split, WorkerSplit()]
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
    compact: bool = False,
) -> ShardPipeline:
    """IterableDataset over shards (brace pattern or list), decoded to the sample contract.

    `shuffle` > 0 shuffles shards and a sample buffer of that size (order only: contents
    stay fixed per key). `resampled` draws shards with replacement forever; give
    `epoch_length` (samples per worker) to bound an epoch. Splitting: `split_webdataset`.
    With `errors`, unreadable shards and samples are skipped and counted, else they raise.
    `compact`: uint8 / bool pixels, a quarter of the bytes through loader workers.
    """
    ds = split_webdataset(urls, seed, shuffle, resampled, rank, world_size, errors)
    decode = SampleDecoder(seed, image_size, reference_size, align_ratio, force_mode,
                           mask_config, compact)
    ds = decode_with(ds, decode, errors)
    return ds.with_epoch(epoch_length) if epoch_length is not None else ds


class SkipRaw(wds.PipelineStage):
    """Drops the first `count` raw samples of a pass before they are decoded (a resumed
    epoch's, `data.resumable_loader`): reading a tar entry costs little, decoding it more."""

    count = 0

    def run(self, src: Iterable) -> Iterator:
        return islice(src, self.count, None)


def decode_with(ds: ShardPipeline, decode: Callable[[dict], dict],
                errors: ShardErrors | None) -> ShardPipeline:
    """``ds.map(decode)``; with ``errors``, a sample that fails is skipped and counted."""
    ds.append(SkipRaw())
    if errors is None:
        return ds.map(decode)
    return ds.map(CountedDecoder(decode, errors), handler=errors)
