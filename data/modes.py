"""The paper's two training modes and the tensor contract every data source produces.

Alignment mode: the reference is the complete object, so the model must find the relevant
region itself (this is what makes cross-attention maps usable for correspondence).
Refinement mode: the reference is a crop around the corresponding region, as supplied at
inference after the alignment stage.

Sample contract (what models/ and train.py rely on):
  target          float32 [3,H,W] in [-1,1]
  mask            float32 [1,H,W] in {0,1}, 1 = regenerate
  reference       float32 [3,R,R] in [0,1] (the encoder normalises)
  reference_mask  float32 [1,R,R] in {0,1}, region of `reference` matching `mask`
  mode            int64 scalar, 0 = alignment, 1 = refinement
Compact samples (`to_sample(..., compact=True)`, what the DataModule's pixel loaders
send through worker processes) hold the same pixels in a quarter of the bytes: `target` and
`reference` uint8 [3,*,*], `mask` and `reference_mask` bool; `decode_pixels` turns them (or a
batch of them, on any device) into exactly the float32 values above.
Latent shards (data/latent_shards.py) carry `latents` and `masked_latents` [C,h,w] instead
of `target`. Samples say where they came from, so a failing batch can be named: shard
samples carry webdataset's `__key__` (str), synthetic pairs `index` (int64 scalar: the item
number, which with the dataset's seed regenerates the sample).
"""

from __future__ import annotations

from typing import Any

import cv2
import numpy as np
import torch

from data.masks import mask_bbox

ALIGNMENT = 0
REFINEMENT = 1
MODE_NAMES = {ALIGNMENT: "alignment", REFINEMENT: "refinement"}

Box = tuple[int, int, int, int]  # x0, y0, x1, y1 (exclusive)


def batch_size(batch: dict[str, torch.Tensor]) -> int:
    """Samples in a collated batch, whichever source (pixels or latents) it came from."""
    return len(batch["mode"])


TRAINING_CROP_MARGIN = (0.1, 0.4)
INFERENCE_CROP_MARGIN = sum(TRAINING_CROP_MARGIN) / 2


def crop_box(
    mask: np.ndarray,
    rng: np.random.Generator | None = None,
    margin: float | tuple[float, float] = TRAINING_CROP_MARGIN,
    jitter: float = 0.1,
    min_size: int = 16,
) -> Box:
    """Square crop box around the mask's region (refinement-mode references), see
    :func:`square_crop`. ``margin`` is drawn from the range when ``rng`` is given, else its
    midpoint is used. An empty mask gives the whole image."""
    h_img, w_img = mask.shape[:2]
    box = mask_bbox(mask)
    if box is None:
        return 0, 0, w_img, h_img
    if isinstance(margin, tuple):
        m = rng.uniform(*margin) if rng is not None else sum(margin) / 2
    else:
        m = margin
    return square_crop(box, (h_img, w_img), m, min_size, jitter, rng)


def square_crop(
    box: Box,
    image_hw: tuple[int, int],
    margin: float = INFERENCE_CROP_MARGIN,
    min_size: int = 16,
    jitter: float = 0.0,
    rng: np.random.Generator | None = None,
) -> Box:
    """Square box around ``box``, grown by ``margin`` of its longer side on each side.

    The one crop of the method: training's refinement-mode references, the alignment stage's
    crop and the oracle crop all come from here, so the reference encoder never sees an aspect
    ratio or margin at inference that training did not show it. The centre is jittered (with
    ``rng``) by up to ``jitter`` of the side, never so far that the region leaves the box,
    and the box is kept inside the image.
    """
    h_img, w_img = image_hw
    x0, y0, x1, y1 = box
    w, h = x1 - x0, y1 - y0
    side = int(round(max(w, h) * (1 + 2 * margin)))
    side = min(max(side, min_size, w, h), w_img, h_img)
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    if rng is not None and jitter > 0:
        sx = min(jitter * side, (side - w) / 2)
        sy = min(jitter * side, (side - h) / 2)
        cx += rng.uniform(-sx, sx) if sx > 0 else 0.0
        cy += rng.uniform(-sy, sy) if sy > 0 else 0.0
    bx = int(round(cx - side / 2))
    by = int(round(cy - side / 2))
    # keep the region inside (rounding) and the box inside the image
    bx = min(max(bx, x1 - side), x0)
    by = min(max(by, y1 - side), y0)
    bx = min(max(bx, 0), w_img - side)
    by = min(max(by, 0), h_img - side)
    return bx, by, bx + side, by + side


def resize_image(img: np.ndarray, size: int) -> np.ndarray:
    """Resize to size x size with area averaging when shrinking (anti-aliased)."""
    if img.shape[0] == size and img.shape[1] == size:
        return img
    interp = cv2.INTER_AREA if img.shape[0] > size else cv2.INTER_CUBIC
    out = cv2.resize(img, (size, size), interpolation=interp)
    if img.dtype == np.uint8:  # saturated by OpenCV already
        return out
    return np.clip(out, 0, 255).astype(img.dtype)


def resize_mask(mask: np.ndarray, size: int, keep_nonempty: bool = True) -> np.ndarray:
    """Resize a bool mask by coverage >= 0.5; falls back to any coverage rather than vanish."""
    if mask.shape[0] == size and mask.shape[1] == size:
        return mask.astype(bool)
    interp = cv2.INTER_AREA if mask.shape[0] > size else cv2.INTER_LINEAR
    cov = cv2.resize(mask.astype(np.float32), (size, size), interpolation=interp)
    out = cov >= 0.5
    if keep_nonempty and mask.any() and not out.any():
        out = cov >= cov.max() * 0.5
    return out


def make_reference(
    reference_rgb: np.ndarray,
    reference_region: np.ndarray,
    mode: int,
    reference_size: int,
    rng: np.random.Generator | None = None,
) -> tuple[np.ndarray, np.ndarray, Box]:
    """Reference image and its mask for `mode`: (uint8 [R,R,3], bool [R,R], box used).

    `reference_region` is the target mask mapped into the full reference view.
    """
    if mode == ALIGNMENT:
        h, w = reference_region.shape
        box = (0, 0, w, h)
    elif mode == REFINEMENT:
        box = crop_box(reference_region, rng)
    else:
        raise ValueError(f"unknown mode {mode}")
    x0, y0, x1, y1 = box
    ref = resize_image(reference_rgb[y0:y1, x0:x1], reference_size)
    ref_mask = resize_mask(reference_region[y0:y1, x0:x1], reference_size)
    return ref, ref_mask, box


def to_sample(
    target_rgb: np.ndarray,
    target_mask: np.ndarray,
    reference_rgb: np.ndarray,
    reference_region: np.ndarray,
    mode: int,
    image_size: int,
    reference_size: int,
    rng: np.random.Generator | None = None,
    compact: bool = False,
) -> dict[str, torch.Tensor]:
    """Build the tensor contract from working-resolution arrays (see module docstring);
    `compact`: uint8 / bool pixels, for `decode_pixels` to turn into the contract later."""
    tgt = resize_image(target_rgb, image_size)
    msk = resize_mask(target_mask, image_size)
    ref, ref_mask, _ = make_reference(reference_rgb, reference_region, mode, reference_size, rng)
    sample = {
        "target": torch.from_numpy(np.ascontiguousarray(tgt.transpose(2, 0, 1))),
        "mask": torch.from_numpy(msk[None]),
        "reference": torch.from_numpy(np.ascontiguousarray(ref.transpose(2, 0, 1))),
        "reference_mask": torch.from_numpy(ref_mask[None]),
        "mode": torch.tensor(mode, dtype=torch.int64),
    }
    return sample if compact else decode_pixels(sample)


# uint8 value -> float32 model input, computed as the per-pixel float arithmetic would be;
# a table lookup gives those exact values on any device (a GPU may divide by multiplying
# with a reciprocal, one rounding away)
PIXEL_VALUES = {
    "target": np.arange(256, dtype=np.float32) / 127.5 - 1.0,  # [-1, 1]
    "reference": np.arange(256, dtype=np.float32) / 255.0,  # [0, 1]
}
MASK_KEYS = ("mask", "reference_mask")
_MASK_VALUES = (np.arange(256) > 0).astype(np.float32)  # a bool viewed as uint8 is 0 or 1
_tables: dict[tuple[str, torch.device], torch.Tensor] = {}


def _lookup_on_cpu(values: np.ndarray, x: torch.Tensor) -> torch.Tensor:
    """OpenCV's table lookup: one single-threaded pass, faster than a gather or float
    arithmetic in numpy or torch (whose threads cost more than the work on small tensors)."""
    a = np.ascontiguousarray(x.numpy()).view(np.uint8)
    if a.size == 0:
        return torch.zeros(x.shape, dtype=torch.float32)
    return torch.from_numpy(
        cv2.LUT(a.reshape(-1, a.shape[-1] if a.ndim else 1), values).reshape(a.shape)
    )


def _lookup(key: str, values: np.ndarray, x: torch.Tensor) -> torch.Tensor:
    if x.device.type == "cpu":
        return _lookup_on_cpu(values, x)
    table = _tables.get((key, x.device))
    if table is None:
        table = _tables[key, x.device] = torch.from_numpy(values).to(x.device)
    return table[x.int()]


def decode_pixels(batch: dict[str, Any]) -> dict[str, Any]:
    """Compact pixels (uint8 images, bool masks) of a sample or batch -> the float32 contract.

    Anything else, float pixels included, is passed through unchanged, so decoding twice is
    harmless. Runs where the tensors are (the training process, after the device transfer).
    """
    out = dict(batch)
    for key, values in PIXEL_VALUES.items():
        x = out.get(key)
        if isinstance(x, torch.Tensor) and x.dtype == torch.uint8:
            out[key] = _lookup(key, values, x)
    for key in MASK_KEYS:
        x = out.get(key)
        if isinstance(x, torch.Tensor) and x.dtype == torch.bool:
            out[key] = _lookup_on_cpu(_MASK_VALUES, x) if x.device.type == "cpu" else x.float()
    return out
