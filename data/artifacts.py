"""Localized artifacts for the synthetic benchmark, mimicking what generators get wrong.

Each artifact is `fn(image uint8 [H,W,3], mask bool [H,W], rng) -> image` and changes pixels
only inside the mask (tests check it), so the artifact-free target stays valid outside.
"""

from __future__ import annotations

from collections.abc import Callable

import cv2
import numpy as np
from PIL import Image, ImageDraw

from data.masks import mask_bbox
from data.objects import draw_text_fitted, random_text

Artifact = Callable[[np.ndarray, np.ndarray, np.random.Generator], np.ndarray]


def _composite(image: np.ndarray, changed: np.ndarray, mask: np.ndarray) -> np.ndarray:
    return np.where(mask[..., None], changed, image).astype(np.uint8)


def _two_colours(pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(majority, minority) colours of the masked pixels: ground and ink of a detail."""
    luma = pixels.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
    split = np.median(luma)
    dark, light = pixels[luma <= split], pixels[luma > split]
    if len(light) == 0 or len(dark) == 0:
        c = pixels.mean(0)
        return c, 255 - c
    a, b = dark.mean(0), light.mean(0)
    return (a, b) if len(dark) >= len(light) else (b, a)


def wrong_lettering(image: np.ndarray, mask: np.ndarray, rng: np.random.Generator
                    ) -> np.ndarray:
    """Repaint the region with its ground colour and render different random glyphs on it."""
    ground, ink = _two_colours(image[mask])
    if np.abs(ground - ink).sum() < 60:  # flat region: pick a visible ink
        ink = 255 - ground
    x0, y0, x1, y1 = mask_bbox(mask)
    canvas = np.array(image)
    canvas[mask] = ground.astype(np.uint8)
    pil = Image.fromarray(canvas)
    draw_text_fitted([ImageDraw.Draw(pil)], (x0, y0, x1, y1), random_text(rng),
                     [tuple(int(v) for v in ink)], rng)
    return _composite(image, np.asarray(pil), mask)


def blur(image: np.ndarray, mask: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Strong Gaussian blur: fine detail washed out, as in low-fidelity decodes."""
    x0, y0, x1, y1 = mask_bbox(mask)
    sigma = max(1.0, rng.uniform(0.08, 0.2) * max(x1 - x0, y1 - y0))
    return _composite(image, cv2.GaussianBlur(image, (0, 0), sigma), mask)


def colour_shift(image: np.ndarray, mask: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Hue rotation and saturation change: the right shape in the wrong colours."""
    hsv = cv2.cvtColor(image, cv2.COLOR_RGB2HSV).astype(np.int16)
    hsv[..., 0] = (hsv[..., 0] + int(rng.integers(30, 150))) % 180
    hsv[..., 1] = np.clip(hsv[..., 1] * rng.uniform(0.5, 1.5) + 40, 0, 255)
    hsv[..., 2] = np.clip(hsv[..., 2] + rng.uniform(-40, 40), 0, 255)
    return _composite(image, cv2.cvtColor(hsv.astype(np.uint8), cv2.COLOR_HSV2RGB), mask)


def noise_smear(image: np.ndarray, mask: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Noise dragged along a random direction: smeared, textured garbage."""
    noisy = image.astype(np.float32) + rng.normal(0, rng.uniform(20, 50), image.shape)
    x0, y0, x1, y1 = mask_bbox(mask)
    length = max(3, int(rng.uniform(0.2, 0.5) * max(x1 - x0, y1 - y0))) | 1
    kernel = np.zeros((length, length), np.float32)
    kernel[length // 2, :] = 1.0 / length
    rot = cv2.getRotationMatrix2D((length / 2 - 0.5, length / 2 - 0.5), rng.uniform(0, 180), 1)
    kernel = cv2.warpAffine(kernel, rot, (length, length))
    kernel /= max(kernel.sum(), 1e-6)
    smeared = cv2.filter2D(np.clip(noisy, 0, 255), -1, kernel)
    return _composite(image, np.clip(smeared, 0, 255), mask)


def swapped_patch(image: np.ndarray, mask: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Content copied from elsewhere in the image: plausible texture, wrong identity."""
    h, w = mask.shape
    x0, y0, x1, y1 = mask_bbox(mask)
    bw, bh = x1 - x0, y1 - y0
    best, best_d = (0, 0), -1.0
    for _ in range(8):  # prefer a source far from the region itself
        sx = int(rng.integers(0, max(1, w - bw + 1)))
        sy = int(rng.integers(0, max(1, h - bh + 1)))
        d = float(np.hypot(sx - x0, sy - y0))
        if d > best_d:
            best, best_d = (sx, sy), d
    sx, sy = best
    shifted = np.array(image)
    shifted[y0:y1, x0:x1] = image[sy:sy + bh, sx:sx + bw]
    if best_d < 1.0 or np.array_equal(shifted[mask], image[mask]):
        shifted[y0:y1, x0:x1] = np.flip(image[y0:y1, x0:x1], axis=(0, 1))
    return _composite(image, shifted, mask)


ARTIFACTS: dict[str, Artifact] = {
    "wrong_lettering": wrong_lettering,
    "blur": blur,
    "colour_shift": colour_shift,
    "noise_smear": noise_smear,
    "swapped_patch": swapped_patch,
}


def apply_artifact(kind: str, image: np.ndarray, mask: np.ndarray, rng: np.random.Generator
                   ) -> np.ndarray:
    """Apply the named artifact inside `mask` (a non-empty bool mask)."""
    if kind not in ARTIFACTS:
        raise KeyError(f"unknown artifact {kind!r}; known: {sorted(ARTIFACTS)}")
    if not mask.any():
        raise ValueError("artifact mask is empty")
    return ARTIFACTS[kind](image, mask, rng)
