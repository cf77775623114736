"""Procedural objects whose identity lives in fine detail (logos, lettering, emblems, patterns).

The reference view is a clean "product photo": one object body (bag, can, label, shirt, ...)
carrying 1-3 detail elements, on a plain or lightly textured background. The `detail` mask
marks exactly the pixels that a generator tends to get wrong, so masks and artifacts can be
placed there.
"""

from __future__ import annotations

import math
import string
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, ImageDraw, ImageFont

# DejaVu faces shipped with matplotlib (its mathtext-only "Display" faces lack most glyphs)
FONT_FILES: tuple[str, ...] = (
    "DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSans-Oblique.ttf",
    "DejaVuSans-BoldOblique.ttf", "DejaVuSansMono.ttf", "DejaVuSansMono-Bold.ttf",
    "DejaVuSansMono-Oblique.ttf", "DejaVuSansMono-BoldOblique.ttf", "DejaVuSerif.ttf",
    "DejaVuSerif-Bold.ttf", "DejaVuSerif-Italic.ttf", "DejaVuSerif-BoldItalic.ttf",
)
BODY_SHAPES: tuple[str, ...] = ("label", "ellipse", "bag", "can", "shirt", "polygon")
DETAIL_KINDS: tuple[str, ...] = ("text", "emblem", "stripes", "checker", "dots", "chevrons")
TEXT_ALPHABET = string.ascii_uppercase + string.digits + "&#@"

Box = tuple[int, int, int, int]  # x0, y0, x1, y1 (exclusive)


@dataclass
class ObjectView:
    """A rendered view: RGB image with the object's pixels and its identity-bearing pixels."""

    rgb: np.ndarray  # uint8 [H, W, 3]
    footprint: np.ndarray  # bool [H, W], object pixels
    detail: np.ndarray  # bool [H, W], logo / text / emblem / pattern pixels (subset of footprint)
    meta: dict = field(default_factory=dict)


def font_dir() -> Path:
    """matplotlib's bundled TrueType fonts: a pinned dependency, so every machine has the
    same font files (system fonts differ between machines and would change the pixels)."""
    import matplotlib

    return Path(matplotlib.get_data_path()) / "fonts" / "ttf"


@lru_cache(maxsize=1)
def font_paths() -> tuple[str, ...]:
    """The lettering fonts, in a fixed order; refuses a matplotlib that lacks one."""
    paths = tuple(font_dir() / name for name in FONT_FILES)
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"lettering fonts missing from matplotlib's data: {missing} "
                                "(install the matplotlib version pinned in requirements.txt)")
    return tuple(map(str, paths))


@lru_cache(maxsize=512)
def load_font(index: int, size: int) -> ImageFont.FreeTypeFont:
    """Font `index` of `font_paths()` at pixel `size` (cached: loading is slow)."""
    return ImageFont.truetype(font_paths()[index], size=size)


def random_colour(rng: np.random.Generator, lo: int = 0, hi: int = 256) -> tuple[int, int, int]:
    return tuple(int(v) for v in rng.integers(lo, hi, size=3))


def contrasting_colour(
    rng: np.random.Generator, base: tuple[int, int, int], min_dist: float = 120.0
) -> tuple[int, int, int]:
    """A colour far enough from `base` that details stay visible (and masks stay meaningful)."""
    best, best_d = base, -1.0
    for _ in range(12):
        c = random_colour(rng)
        d = math.sqrt(sum((a - b) ** 2 for a, b in zip(c, base, strict=True)))  # exact
        if d >= min_dist:
            return c
        if d > best_d:
            best, best_d = c, d
    return best if best_d > 60 else tuple(255 - v for v in base)


def make_background(size: int, rng: np.random.Generator,
                    textured: bool | None = None) -> np.ndarray:
    """Plain studio background, optionally with a faint gradient and grain (uint8 [S,S,3])."""
    base = np.array(random_colour(rng, 150, 256), np.float32)
    if not (textured if textured is not None else rng.random() < 0.5):
        return cv2.merge([np.full((size, size), v, np.uint8) for v in base.astype(np.uint8)])
    ramp = np.linspace(-1.0, 1.0, size, dtype=np.float32)
    angle = rng.uniform(0, 2 * np.pi)
    grad = np.cos(angle) * ramp[None, :] + np.sin(angle) * ramp[:, None]  # float64
    grad *= rng.uniform(5, 20)
    # float32 planes: the roundings of adding the float64 gradient to a float32 image
    planes = [(grad + float(v)).astype(np.float32) for v in base]
    grain = rng.standard_normal((size, size), dtype=np.float32) * rng.uniform(1, 4)
    return merge_planes(planes, grain)


def merge_planes(planes: Sequence[np.ndarray], grain: np.ndarray | None = None) -> np.ndarray:
    """uint8 [S,S,3] from 3 float planes [S,S] (+ grain [S,S]), clipped and truncated.

    Channel-last float images cost numpy several times more per pixel than planes (its
    inner loops run over 3 values), and give the same values: every step is per pixel.
    """
    out = []
    for plane in planes:
        if grain is not None:
            plane = plane + grain
        out.append(np.clip(plane, 0, 255, out=plane if grain is not None else None)
                   .astype(np.uint8))
    return cv2.merge(out)


def _draw_body(draw: ImageDraw.ImageDraw, shape: str, box: Box, fill, rng) -> Box:
    """Draw the body silhouette into `box`; return an inner box that stays inside it."""
    x0, y0, x1, y1 = box
    w, h = x1 - x0, y1 - y0
    if shape == "label":
        r = int(min(w, h) * rng.uniform(0.05, 0.25))
        draw.rounded_rectangle((x0, y0, x1 - 1, y1 - 1), radius=r, fill=fill)
        return (x0 + r // 2 + w // 12, y0 + r // 2 + h // 12, x1 - r // 2 - w // 12,
                y1 - r // 2 - h // 12)
    if shape == "ellipse":
        draw.ellipse((x0, y0, x1 - 1, y1 - 1), fill=fill)
        k = (1 - 1 / np.sqrt(2)) / 2 + 0.03  # inscribed rectangle of an ellipse
        return (x0 + int(w * k), y0 + int(h * k), x1 - int(w * k), y1 - int(h * k))
    if shape == "can":
        cap = max(2, int(h * rng.uniform(0.06, 0.12)))
        draw.rectangle((x0, y0 + cap, x1 - 1, y1 - 1 - cap), fill=fill)
        draw.ellipse((x0, y0, x1 - 1, y0 + 2 * cap), fill=fill)
        draw.ellipse((x0, y1 - 1 - 2 * cap, x1 - 1, y1 - 1), fill=fill)
        return (x0 + w // 10, y0 + 2 * cap + h // 20, x1 - w // 10, y1 - 2 * cap - h // 20)
    if shape == "bag":
        handle = int(h * rng.uniform(0.15, 0.25))
        lw = max(2, int(min(w, h) * 0.05))
        draw.arc((x0 + w // 4, y0, x1 - w // 4, y0 + 2 * handle), 180, 360, fill=fill, width=lw)
        taper = int(w * rng.uniform(0.0, 0.12))
        top = y0 + handle
        draw.polygon([(x0 + taper, top), (x1 - 1 - taper, top), (x1 - 1, y1 - 1), (x0, y1 - 1)],
                     fill=fill)
        return (x0 + taper + w // 10, top + h // 12, x1 - taper - w // 10, y1 - h // 12)
    if shape == "shirt":
        sl = int(w * rng.uniform(0.18, 0.26))  # sleeve width
        arm = int(h * rng.uniform(0.25, 0.35))
        neck = int(w * 0.12)
        cx = (x0 + x1) // 2
        pts = [(x0, y0 + arm // 3), (x0 + sl, y0), (cx - neck, y0), (cx, y0 + neck),
               (cx + neck, y0), (x1 - 1 - sl, y0), (x1 - 1, y0 + arm // 3), (x1 - 1, y0 + arm),
               (x1 - 1 - sl, y0 + arm), (x1 - 1 - sl, y1 - 1), (x0 + sl, y1 - 1),
               (x0 + sl, y0 + arm), (x0, y0 + arm)]
        draw.polygon(pts, fill=fill)
        return (x0 + sl + w // 20, y0 + neck + h // 10, x1 - sl - w // 20, y1 - h // 12)
    # generic convex polygon (hexagon-ish badge / box front)
    n = int(rng.integers(5, 9))
    ang = np.sort(rng.uniform(0, 2 * np.pi, n)) if rng.random() < 0.3 else np.linspace(
        0, 2 * np.pi, n, endpoint=False) + rng.uniform(0, np.pi)
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    pts = [(cx + 0.5 * w * np.cos(a), cy + 0.5 * h * np.sin(a)) for a in ang]
    draw.polygon(pts, fill=fill)
    k = 0.2
    return (x0 + int(w * k), y0 + int(h * k), x1 - int(w * k), y1 - int(h * k))


def _star(cx: float, cy: float, r: float, n: int, inner: float, rot: float):
    pts = []
    for i in range(2 * n):
        rr = r if i % 2 == 0 else r * inner
        a = rot + np.pi * i / n
        pts.append((cx + rr * np.cos(a), cy + rr * np.sin(a)))
    return pts


def random_text(rng: np.random.Generator) -> str:
    n = int(rng.integers(2, 7))
    return "".join(TEXT_ALPHABET[i] for i in rng.integers(0, len(TEXT_ALPHABET), n))


def draw_text_fitted(
    draws: Sequence[ImageDraw.ImageDraw], box: Box, text: str, fills: Sequence, rng,
) -> None:
    """Draw `text` as large as fits in `box` with a random font (on each draw with its fill)."""
    x0, y0, x1, y1 = box
    w, h = max(1, x1 - x0), max(1, y1 - y0)
    font_idx = int(rng.integers(0, len(font_paths())))
    size = max(6, int(h * rng.uniform(0.55, 0.95)))
    font = load_font(font_idx, size)
    measured = None  # the font that (l, t, r, b) measure
    for _ in range(8):  # shrink until it fits the box width
        l, t, r, b = font.getbbox(text)
        measured = font
        if r - l <= w and b - t <= h or size <= 6:
            break
        size = max(6, int(size * min(0.9, w / max(1, r - l))))
        font = load_font(font_idx, size)
    if font is not measured:
        l, t, r, b = font.getbbox(text)
    px = x0 + (w - (r - l)) // 2 - l
    py = y0 + (h - (b - t)) // 2 - t
    for d, f in zip(draws, fills, strict=True):
        d.text((px, py), text, font=font, fill=f)


def _draw_detail(draws, kind: str, box: Box, colours, rng) -> dict:
    """Draw one detail element into `box` on the colour and mask canvases."""
    x0, y0, x1, y1 = box
    w, h = x1 - x0, y1 - y0
    ink, ink2 = colours
    col, msk = draws
    if kind == "text":
        text = random_text(rng)
        draw_text_fitted(draws, box, text, (ink, 255), rng)
        return {"kind": kind, "text": text}
    if kind == "emblem":
        r = min(w, h) / 2
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        outer = rng.choice(["circle", "star", "polygon"])
        if outer == "circle":
            shape = [(cx - r, cy - r, cx + r, cy + r)]
            for d, f in ((col, ink), (msk, 255)):
                d.ellipse(shape[0], fill=f)
        else:
            n = int(rng.integers(5, 9))
            pts = (_star(cx, cy, r, n, rng.uniform(0.4, 0.6), rng.uniform(0, np.pi))
                   if outer == "star" else
                   [(cx + r * np.cos(a), cy + r * np.sin(a))
                    for a in np.linspace(0, 2 * np.pi, n, endpoint=False) + rng.uniform(0, 1)])
            for d, f in ((col, ink), (msk, 255)):
                d.polygon(pts, fill=f)
        inner_r = r * rng.uniform(0.3, 0.5)
        ib = (int(cx - inner_r), int(cy - inner_r), int(cx + inner_r), int(cy + inner_r))
        mark = rng.choice(["glyph", "ring", "cross"])
        if mark == "glyph":
            draw_text_fitted([col], ib, TEXT_ALPHABET[int(rng.integers(0, 26))], [ink2], rng)
        elif mark == "ring":
            col.ellipse(ib, outline=ink2, width=max(1, int(inner_r * 0.3)))
        else:
            lw = max(1, int(inner_r * 0.35))
            col.line((ib[0], cy, ib[2], cy), fill=ink2, width=lw)
            col.line((cx, ib[1], cx, ib[3]), fill=ink2, width=lw)
        return {"kind": kind, "outer": str(outer), "mark": str(mark)}
    if kind == "stripes":
        n = int(rng.integers(2, 6))
        horizontal = rng.random() < 0.5
        span = h if horizontal else w
        period = span / n
        lw = max(1, int(period * rng.uniform(0.3, 0.6)))
        for i in range(n):
            o = int((y0 if horizontal else x0) + i * period)
            rect = (x0, o, x1 - 1, o + lw - 1) if horizontal else (o, y0, o + lw - 1, y1 - 1)
            fill = ink if i % 2 == 0 or rng.random() < 0.5 else ink2
            for d, f in ((col, fill), (msk, 255)):
                d.rectangle(rect, fill=f)
        return {"kind": kind, "n": n}
    # area patterns: the whole patch counts as detail (its layout is identity-bearing)
    msk.rectangle((x0, y0, x1 - 1, y1 - 1), fill=255)
    col.rectangle((x0, y0, x1 - 1, y1 - 1), fill=ink2)
    cell = max(3, int(min(w, h) / rng.uniform(3, 7)))
    if kind == "checker":
        for j, yy in enumerate(range(y0, y1, cell)):
            for i, xx in enumerate(range(x0, x1, cell)):
                if (i + j) % 2 == 0:
                    col.rectangle((xx, yy, min(xx + cell, x1) - 1, min(yy + cell, y1) - 1),
                                  fill=ink)
    elif kind == "dots":
        rr = max(1, cell // 3)
        for yy in range(y0 + cell // 2, y1, cell):
            for xx in range(x0 + cell // 2, x1, cell):
                col.ellipse((xx - rr, yy - rr, xx + rr, yy + rr), fill=ink)
    else:  # chevrons
        lw = max(1, cell // 3)
        for yy in range(y0, y1 + cell, cell):
            pts = []
            for k, xx in enumerate(range(x0, x1 + cell, cell)):
                pts.append((xx, yy + (cell // 2 if k % 2 else 0)))
            col.line(pts, fill=ink, width=lw)
    return {"kind": kind, "cell": cell}


def _layout(inner: Box, n: int, rng: np.random.Generator) -> list[Box]:
    """Split the inner box into n non-overlapping slots (stacked vertically or side by side)."""
    x0, y0, x1, y1 = inner
    w, h = x1 - x0, y1 - y0
    vertical = h >= w if rng.random() < 0.8 else h < w
    cuts = np.sort(rng.uniform(0.3, 0.7, n - 1)) if n > 1 else np.array([])
    edges = np.concatenate([[0.0], cuts, [1.0]])
    if n == 3:
        edges = np.array([0.0, 1 / 3, 2 / 3, 1.0]) + np.r_[0, rng.uniform(-0.05, 0.05, 2), 0]
    slots = []
    for a, b in zip(edges[:-1], edges[1:], strict=True):
        if vertical:
            s = (x0, y0 + int(a * h), x1, y0 + int(b * h))
        else:
            s = (x0 + int(a * w), y0, x0 + int(b * w), y1)
        pad = max(1, int(0.08 * min(s[2] - s[0], s[3] - s[1])))
        slots.append((s[0] + pad, s[1] + pad, s[2] - pad, s[3] - pad))
    return slots


def render_object(size: int, rng: np.random.Generator) -> ObjectView:
    """Render a random object as a clean square reference view of `size` pixels."""
    bg = make_background(size, rng)
    body_colour = random_colour(rng)
    shape = str(rng.choice(BODY_SHAPES))
    extent = rng.uniform(0.6, 0.85) * size
    aspect = rng.uniform(0.6, 1.4)
    bw, bh = (extent, extent / aspect) if aspect > 1 else (extent * aspect, extent)
    cx = size / 2 + rng.uniform(-0.05, 0.05) * size
    cy = size / 2 + rng.uniform(-0.05, 0.05) * size
    box = (int(cx - bw / 2), int(cy - bh / 2), int(cx + bw / 2), int(cy + bh / 2))

    body = Image.new("RGB", (size, size), body_colour)
    fp_img = Image.new("L", (size, size), 0)
    inner = _draw_body(ImageDraw.Draw(fp_img), shape, box, 255, rng)

    n_detail = int(rng.integers(1, 4))
    det_img = Image.new("L", (size, size), 0)
    draws = (ImageDraw.Draw(body), ImageDraw.Draw(det_img))
    elements = []
    for slot in _layout(inner, n_detail, rng):
        if slot[2] - slot[0] < 4 or slot[3] - slot[1] < 4:
            continue
        kind = str(rng.choice(DETAIL_KINDS, p=[0.35, 0.25, 0.1, 0.1, 0.1, 0.1]))
        ink = contrasting_colour(rng, body_colour)
        ink2 = contrasting_colour(rng, ink, 90.0)
        elements.append(_draw_detail(draws, kind, slot, (ink, ink2), rng))

    footprint = np.asarray(fp_img) > 127
    detail = (np.asarray(det_img) > 127) & footprint
    # gentle shading across the body so it does not look like a flat sticker; only the body's
    # box is shaded (float64, as the pixels outside the footprint are the background's)
    ramp = np.linspace(-1.0, 1.0, size, dtype=np.float32)
    shade = 1.0 + rng.uniform(0.0, 0.12) * (ramp[None, :] * rng.choice([-1, 1]))
    rgb = bg
    fp8 = footprint.view(np.uint8)
    x, y, w, h = cv2.boundingRect(fp8)
    if w and h:
        shaded = np.asarray(body)[y:y + h, x:x + w].astype(np.float64)
        shaded *= shade[0, x:x + w, None]
        np.clip(shaded, 0, 255, out=shaded)
        cv2.copyTo(shaded.astype(np.uint8), fp8[y:y + h, x:x + w], rgb[y:y + h, x:x + w])
    meta = {"shape": shape, "body_colour": list(body_colour), "elements": elements}
    return ObjectView(rgb=rgb, footprint=footprint, detail=detail, meta=meta)
