"""User images <-> model tensors, as diffusers' ``VaeImageProcessor`` does for its pipelines.

A user gives uint8 HxWx3 images and bool HxW masks of any size; the model sees
[1,3,S,S] images in [-1,1] and [1,1,S,S] masks at its own size S. Generated content goes
back at the image's own resolution, blended inside the mask only, so every other pixel is the
input's integer exactly. ``crops_coords`` (x0, y0, x1, y1) restricts both directions to a
region of the image: the padded crop around the mask of ``padding_mask_crop``, which lets a
small artifact in a large image be regenerated at the model's full resolution.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from data.masks import mask_bbox
from data.modes import Box
from models.refinement import blend, resize_mask_tensor


def chw(image: np.ndarray) -> torch.Tensor:
    """uint8 HxWx3 (possibly a read-only view) -> float [3,H,W], values kept as 0..255."""
    return torch.from_numpy(np.array(image, dtype=np.float32)).permute(2, 0, 1)


def reference_tensor(reference: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 HxWx3 -> [3,H,W] in [0,1] (the layout of ``Alignment.crop``); a tensor is taken
    as already in that layout."""
    if isinstance(reference, torch.Tensor):
        return reference
    return chw(reference) / 255.0


def to_uint8(image: torch.Tensor) -> np.ndarray:
    """[3,H,W] in [-1,1] -> uint8 HxWx3."""
    return ((image.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()


def _crop(array: np.ndarray, crops_coords: Box | None) -> np.ndarray:
    if crops_coords is None:
        return array
    x0, y0, x1, y1 = crops_coords
    return array[y0:y1, x0:x1]


class ImageProcessor:
    """Images: uint8 HxWx3 <-> [1,3,S,S] in [-1,1], and pasting results back."""

    def preprocess(self, image: np.ndarray, size: int, crops_coords: Box | None = None
                   ) -> torch.Tensor:
        """The image (or its ``crops_coords`` region) at the model's size, in [-1,1]."""
        img = chw(_crop(image, crops_coords))[None] / 255.0
        if img.shape[-2:] != (size, size):
            img = F.interpolate(img, size=(size, size), mode="bilinear", antialias=True,
                                align_corners=False).clamp(0, 1)
        return img * 2 - 1

    def postprocess(self, image: torch.Tensor) -> np.ndarray:
        """[3,S,S] in [-1,1] -> uint8 SxSx3."""
        return to_uint8(image)

    def apply_overlay(self, mask: np.ndarray, init_image: np.ndarray, image: np.ndarray,
                      crops_coords: Box | None = None, dilate: int = 0, feather: int = 0
                      ) -> np.ndarray:
        """``image`` (any size) upsampled onto ``init_image`` (or its ``crops_coords``
        region) and blended inside the (dilated, feathered) mask only.

        Done at the image's own resolution with :func:`models.refinement.blend` on 0..255
        floats, so zero-weight pixels are the input's integers exactly.
        """
        if crops_coords is not None:
            x0, y0, x1, y1 = crops_coords
            out = init_image.copy()
            out[y0:y1, x0:x1] = self.apply_overlay(mask[y0:y1, x0:x1],
                                                   init_image[y0:y1, x0:x1], image, None,
                                                   dilate, feather)
            return out
        height, width = mask.shape
        gen = chw(image)[None]
        if gen.shape[-2:] != (height, width):
            gen = F.interpolate(gen, size=(height, width), mode="bicubic", align_corners=False)
        orig = chw(init_image)[None]
        msk = torch.from_numpy(np.asarray(mask).astype(np.float32))[None, None]
        out = blend(orig, gen.clamp(0, 255), msk, dilate, feather)
        return out[0].round().clamp(0, 255).byte().permute(1, 2, 0).numpy()


class MaskProcessor:
    """Masks: bool HxW -> [1,1,S,S] in {0,1}, and the padded crop around them."""

    def preprocess(self, mask: np.ndarray, size: int, crops_coords: Box | None = None
                   ) -> torch.Tensor:
        """Every cell that any masked pixel touches is masked, so generated content spans
        the whole mask (the sweep scores the mask's faithful shape instead)."""
        msk = torch.from_numpy(np.asarray(_crop(mask, crops_coords)).astype(np.float32))
        return resize_mask_tensor(msk[None, None], (size, size), cover=True)

    @staticmethod
    def get_crop_region(mask: np.ndarray, pad: int, min_size: int) -> Box:
        """Square box (x0, y0, x1, y1) around the mask grown by ``pad`` px on each side and
        at least ``min_size`` px, kept inside the image (a side longer than the image's is cut
        to it, so a crop of a very wide mask is not square)."""
        box = mask_bbox(np.asarray(mask, dtype=bool))
        if box is None:
            raise ValueError("mask is empty: no region to crop around")
        height, width = mask.shape[:2]
        x0, y0, x1, y1 = box
        x0, y0, x1, y1 = max(x0 - pad, 0), max(y0 - pad, 0), min(x1 + pad, width), min(
            y1 + pad, height)
        side = max(x1 - x0, y1 - y0, min_size)

        def span(lo: int, hi: int, extent: int) -> tuple[int, int]:
            length = min(side, extent)
            start = int(round((lo + hi) / 2 - length / 2))
            start = min(max(start, hi - length, 0), lo, extent - length)
            return start, start + length

        (cx0, cx1), (cy0, cy1) = span(x0, x1, width), span(y0, y1, height)
        return cx0, cy0, cx1, cy1
