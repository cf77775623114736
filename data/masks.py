"""Target-space artifact masks: over detail regions, free-form brush strokes, or boxes.

Artifacts of customization / compositing models sit on logos and lettering, and users draw
rough strokes or boxes over them, so the training masks mix the three. Every mask is clipped
to the object footprint (the reference can only explain object pixels) and its area is kept
within [min_area, max_area] of the footprint.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

MASK_KINDS: tuple[str, ...] = ("detail", "brush", "box")


@dataclass(frozen=True)
class MaskConfig:
    """Probabilities of each mask kind and area bounds as fractions of the footprint area."""

    p_detail: float = 0.5
    p_brush: float = 0.3
    p_box: float = 0.2
    min_area: float = 0.02
    max_area: float = 0.5
    max_tries: int = 12

    def probabilities(self) -> np.ndarray:
        p = np.array([self.p_detail, self.p_brush, self.p_box], np.float64)
        if p.sum() <= 0 or (p < 0).any():
            raise ValueError(f"mask kind probabilities must be >= 0 with a positive sum: {p}")
        return p / p.sum()


def mask_bbox(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    """Tight box (x0, y0, x1, y1), end exclusive, of a mask; None when empty."""
    if mask.size == 0:
        return None
    x, y, w, h = cv2.boundingRect(
        mask.view(np.uint8) if mask.dtype == bool else (mask != 0).view(np.uint8)
    )
    if not w:
        return None
    return x, y, x + w, y + h


def detail_mask(footprint: np.ndarray, detail: np.ndarray, rng: np.random.Generator
                ) -> np.ndarray | None:
    """A dilated connected detail element, or a box around part of it; None if no detail."""
    size = footprint.shape[0]
    if not detail.any():
        return None
    # merge glyphs of one word / cells of one pattern into a single element
    k = max(3, size // 40) | 1
    merged = cv2.dilate(detail.astype(np.uint8), np.ones((k, k), np.uint8))
    n, labels, stats, _ = cv2.connectedComponentsWithStats(merged, connectivity=8)
    if n <= 1:
        return None
    areas = stats[1:, cv2.CC_STAT_AREA].astype(np.float64)
    comp = 1 + int(rng.choice(n - 1, p=areas / areas.sum()))
    element = (labels == comp) & detail
    if rng.random() < 0.6:
        r = int(rng.integers(1, max(2, size // 24) + 1))
        out = cv2.dilate(element.astype(np.uint8), cv2.getStructuringElement(
            cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1))).astype(bool)
        if rng.random() < 0.3:  # only part of the element is broken
            out &= _random_box(out, rng, 0.4, 0.8)
        return out
    x0, y0, x1, y1 = mask_bbox(element)
    w, h = x1 - x0, y1 - y0
    frac = rng.uniform(0.4, 1.0, size=2)
    bw, bh = max(2, int(w * frac[0])), max(2, int(h * frac[1]))
    bx = x0 + int(rng.integers(0, w - bw + 1)) if w > bw else x0
    by = y0 + int(rng.integers(0, h - bh + 1)) if h > bh else y0
    pad = int(rng.integers(0, max(1, size // 32) + 1))
    out = np.zeros_like(footprint)
    out[max(0, by - pad):by + bh + pad, max(0, bx - pad):bx + bw + pad] = True
    return out


def _random_box(region: np.ndarray, rng: np.random.Generator, lo: float, hi: float) -> np.ndarray:
    """A box covering `lo`-`hi` of the region's bounding box sides, placed inside it."""
    x0, y0, x1, y1 = mask_bbox(region)
    w, h = x1 - x0, y1 - y0
    bw = max(2, int(w * rng.uniform(lo, hi)))
    bh = max(2, int(h * rng.uniform(lo, hi)))
    bx = x0 + int(rng.integers(0, max(1, w - bw + 1)))
    by = y0 + int(rng.integers(0, max(1, h - bh + 1)))
    out = np.zeros(region.shape, bool)
    out[by:by + bh, bx:bx + bw] = True
    return out


def brush_mask(footprint: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Free-form strokes: a few thick random-walk polylines starting on the object."""
    size = footprint.shape[0]
    out = np.zeros(footprint.shape, np.uint8)
    ys, xs = np.nonzero(footprint)
    x0, y0, x1, y1 = mask_bbox(footprint)
    extent = max(x1 - x0, y1 - y0)
    for _ in range(int(rng.integers(1, 4))):
        i = int(rng.integers(0, len(xs)))
        pt = np.array([xs[i], ys[i]], np.float64)
        angle = rng.uniform(0, 2 * np.pi)
        width = max(2, int(extent * rng.uniform(0.04, 0.12)))
        pts = [pt.copy()]
        for _ in range(int(rng.integers(2, 7))):
            angle += rng.uniform(-1.2, 1.2)
            pt = pt + extent * rng.uniform(0.05, 0.2) * np.array([np.cos(angle), np.sin(angle)])
            pt = np.clip(pt, 0, size - 1)
            pts.append(pt.copy())
        poly = np.rint(np.array(pts)).astype(np.int32).reshape(-1, 1, 2)
        cv2.polylines(out, [poly], False, 1, thickness=width, lineType=cv2.LINE_8)
    return out.astype(bool)


def box_mask(footprint: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A box of varied size and aspect ratio centred on an object pixel."""
    ys, xs = np.nonzero(footprint)
    x0, y0, x1, y1 = mask_bbox(footprint)
    extent = max(x1 - x0, y1 - y0)
    i = int(rng.integers(0, len(xs)))
    w = max(2, int(extent * rng.uniform(0.1, 0.6)))
    h = max(2, int(w * rng.uniform(0.5, 2.0)))
    out = np.zeros(footprint.shape, bool)
    cx, cy = xs[i], ys[i]
    out[max(0, cy - h // 2):cy + (h + 1) // 2, max(0, cx - w // 2):cx + (w + 1) // 2] = True
    return out


def make_mask(footprint: np.ndarray, detail: np.ndarray, rng: np.random.Generator,
              config: MaskConfig | None = None) -> tuple[np.ndarray, str]:
    """Draw a non-empty target mask (bool [H,W]) within the footprint; returns (mask, kind).

    Retries with fresh draws until the area fits the bounds; the last resort is a box around
    an object pixel sized to the minimum area, so a mask is always returned.
    """
    cfg = config or MaskConfig()
    if not footprint.any():
        raise ValueError("empty footprint: the object is not visible in the target")
    fp_area = float(footprint.sum())
    lo, hi = cfg.min_area * fp_area, cfg.max_area * fp_area
    probs = cfg.probabilities()
    for _ in range(cfg.max_tries):
        kind = MASK_KINDS[int(rng.choice(3, p=probs))]
        if kind == "detail":
            m = detail_mask(footprint, detail, rng)
            if m is None:
                continue
        elif kind == "brush":
            m = brush_mask(footprint, rng)
        else:
            m = box_mask(footprint, rng)
        m &= footprint
        if lo <= m.sum() <= hi and m.any():
            return m, kind
    side = max(2, int(np.ceil(np.sqrt(max(lo, 4.0)))))
    ys, xs = np.nonzero(footprint)
    i = int(rng.integers(0, len(xs)))
    m = np.zeros_like(footprint)
    m[max(0, ys[i] - side // 2):ys[i] + side, max(0, xs[i] - side // 2):xs[i] + side] = True
    return m & footprint, "box"
