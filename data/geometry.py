"""Known geometry between the reference view and the target view, with exact dense ground truth.

target -> reference:  q = H^-1(p + d(p)),  H a homography (reference px -> target px) and d a
smooth low-frequency displacement field (sum of a few sinusoids) in target pixels.
reference -> target:  solve p + d(p) = H(q) by fixed-point iteration p <- H(q) - d(p); it
converges because d is a contraction (its Lipschitz constant is kept well below 1).

Pixel convention: a coordinate x refers to the centre of pixel column x (OpenCV's remap).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import cv2
import numpy as np

from data.masks import mask_bbox
from data.objects import Box, ObjectView, merge_planes, random_colour

FIXED_POINT_ITERS = 20
FIXED_POINT_TOL = 1e-2  # pixels; cv2.remap quantises lookups to 1/32 px anyway


@dataclass(frozen=True)
class SmoothField:
    """d(x, y)[c] = sum_k amp[k, c] * sin(freq[k, c, 0] x + freq[k, c, 1] y + phase[k, c])."""

    amp: np.ndarray  # [K, 2] pixels
    freq: np.ndarray  # [K, 2, 2] radians / pixel
    phase: np.ndarray  # [K, 2]

    @staticmethod
    def zero() -> SmoothField:
        return SmoothField(np.zeros((0, 2)), np.zeros((0, 2, 2)), np.zeros((0, 2)))

    @staticmethod
    def random(size: int, rng: np.random.Generator, max_amp: float = 0.015,
               terms: int = 3) -> SmoothField:
        """Random field with total amplitude <= max_amp * size and wavelengths 0.6-1.5 * size."""
        amp = rng.dirichlet(np.ones(terms), size=2).T * rng.uniform(0.3, 1.0) * max_amp * size
        wavelength = rng.uniform(0.6, 1.5, size=(terms, 2)) * size
        direction = rng.uniform(0, 2 * np.pi, size=(terms, 2))
        k = 2 * np.pi / wavelength
        freq = np.stack([k * np.cos(direction), k * np.sin(direction)], axis=-1)
        phase = rng.uniform(0, 2 * np.pi, size=(terms, 2))
        return SmoothField(amp * rng.choice([-1, 1], size=amp.shape), freq, phase)

    def on_grid(self, height: int, width: int) -> np.ndarray:
        """Field sampled at every pixel centre, float32 [H, W, 2] (separable, so it is cheap)."""
        dx, dy = self.planes(height, width)
        return cv2.merge([dx, dy])

    def planes(self, height: int, width: int, window: Box | None = None
               ) -> tuple[np.ndarray, np.ndarray]:
        """`on_grid` as its x and y planes, float32 [H, W] each (the same values); only the
        pixels in `window` (x0, y0, x1, y1) when given, each computed as on the whole grid."""
        x0, y0, x1, y1 = window or (0, 0, width, height)
        xs = np.arange(x0, x1, dtype=np.float64)
        ys = np.arange(y0, y1, dtype=np.float64)
        # every (term, channel) at once; sin(a + b) = sin a cos b + cos a sin b
        ax = self.freq[..., 0, None] * xs + self.phase[..., None]  # [K, 2, W]
        by = self.freq[..., 1, None] * ys  # [K, 2, H]
        terms = np.cos(by)[..., :, None] * np.sin(ax)[..., None, :]
        terms += np.sin(by)[..., :, None] * np.cos(ax)[..., None, :]
        terms *= self.amp[..., None, None]
        out = np.zeros((2, y1 - y0, x1 - x0), np.float64)
        for term in terms:  # summed in term order, as on_grid always has
            out += term
        return out[0].astype(np.float32), out[1].astype(np.float32)

    def to_dict(self) -> dict:
        return {"amp": self.amp.tolist(), "freq": self.freq.tolist(), "phase": self.phase.tolist()}

    @staticmethod
    def from_dict(d: dict) -> SmoothField:
        return SmoothField(np.asarray(d["amp"], np.float64).reshape(-1, 2),
                           np.asarray(d["freq"], np.float64).reshape(-1, 2, 2),
                           np.asarray(d["phase"], np.float64).reshape(-1, 2))


def _apply_h(h: np.ndarray, pts: np.ndarray) -> np.ndarray:
    """Apply homography to [..., 2] points."""
    x, y = pts[..., 0], pts[..., 1]
    w = h[2, 0] * x + h[2, 1] * y + h[2, 2]
    w = np.where(np.abs(w) < 1e-9, 1e-9, w)
    return np.stack([(h[0, 0] * x + h[0, 1] * y + h[0, 2]) / w,
                     (h[1, 0] * x + h[1, 1] * y + h[1, 2]) / w], axis=-1)


def _apply_h_planes(h: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """`_apply_h` on float64 coordinate planes, float32 [..., 2] (the same roundings)."""
    w = h[2, 0] * x + h[2, 1] * y + h[2, 2]
    w[np.abs(w) < 1e-9] = 1e-9
    return cv2.merge([((h[0, 0] * x + h[0, 1] * y + h[0, 2]) / w).astype(np.float32),
                      ((h[1, 0] * x + h[1, 1] * y + h[1, 2]) / w).astype(np.float32)])


def _pull(src: np.ndarray, coords: np.ndarray, interp: int = cv2.INTER_LINEAR,
          border: int = cv2.BORDER_CONSTANT) -> np.ndarray:
    """Sample `src` at float coordinates [H, W, 2] (x, y); outside -> 0 (or replicated)."""
    return cv2.remap(src, coords, None, interp, borderMode=border, borderValue=0)


@dataclass
class Warp:
    """Dense correspondence between a target view and a reference view.

    `target_to_reference[y, x]` = reference (x, y) of target pixel (x, y). The inverse map is
    exact (analytic / fixed point) when the warp has parameters, else estimated by splatting.
    """

    target_to_reference: np.ndarray  # float32 [Ht, Wt, 2]
    reference_shape: tuple[int, int]  # (Hr, Wr)
    homography: np.ndarray | None = None  # 3x3, reference px -> target px
    displacement: SmoothField | None = None
    _ref_to_tgt: np.ndarray | None = field(default=None, repr=False)
    _disp_grid: np.ndarray | None = field(default=None, repr=False)

    @property
    def target_shape(self) -> tuple[int, int]:
        return self.target_to_reference.shape[:2]

    @staticmethod
    def from_params(homography: np.ndarray, smooth: SmoothField, target_shape: tuple[int, int],
                    reference_shape: tuple[int, int]) -> Warp:
        h = np.asarray(homography, np.float64)
        height, width = target_shape
        dx, dy = smooth.planes(height, width)
        # p + d(p) in float32, as the [H, W, 2] pixel grid plus the field
        x = (np.arange(width, dtype=np.float32)[None, :] + dx).astype(np.float64)
        y = (np.arange(height, dtype=np.float32)[:, None] + dy).astype(np.float64)
        t2r = _apply_h_planes(np.linalg.inv(h), x, y)
        return Warp(t2r, tuple(reference_shape), h, smooth)

    @property
    def reference_to_target(self) -> np.ndarray:
        """float32 [Hr, Wr, 2]: target (x, y) of each reference pixel (may fall outside)."""
        if self._ref_to_tgt is None:
            hr, wr = self.reference_shape
            self._ref_to_tgt = self.inverse_on((0, 0, wr, hr))
        return self._ref_to_tgt

    def inverse_on(self, box: tuple[int, int, int, int]) -> np.ndarray:
        """Target (x, y) of the reference pixels in box (x0, y0, x1, y1): float32 [h, w, 2]."""
        if self.homography is None:
            raise ValueError("warp has no parameters; use map_mask_to_reference")
        x0, y0, x1, y1 = box
        if x1 <= x0 or y1 <= y0:
            return np.zeros((max(0, y1 - y0), max(0, x1 - x0), 2), np.float32)
        xs = np.broadcast_to(np.arange(x0, x1, dtype=np.float64)[None, :], (y1 - y0, x1 - x0))
        ys = np.broadcast_to(np.arange(y0, y1, dtype=np.float64)[:, None], (y1 - y0, x1 - x0))
        hq = _apply_h_planes(self.homography, xs, ys)
        smooth = self.displacement
        if smooth is None or smooth.amp.shape[0] == 0:
            return hq
        ht, wt = self.target_shape
        # the field is smooth, so bilinear lookup on a grid is exact to ~1e-2 px; the grid is
        # padded by more than |d| so points landing just outside the frame converge as well
        pad = int(np.ceil(np.abs(smooth.amp).sum(0).max())) + 4
        grid = self._disp_grid
        if grid is None:
            window = _lookup_window(hq, pad, float(np.abs(smooth.amp).sum(0).max()),
                                    (ht + 2 * pad, wt + 2 * pad))
            grid = _shifted_field(smooth, ht, wt, pad, window)
            if window is None:
                self._disp_grid = grid
        # convergence is judged near the frame: far-away points are large numbers whose
        # float32 rounding exceeds the tolerance
        near = ((hq[..., 0] > -pad) & (hq[..., 0] < wt + pad)
                & (hq[..., 1] > -pad) & (hq[..., 1] < ht + pad))
        far = ~np.repeat(near[..., None], 2, axis=-1)
        p = hq
        for _ in range(FIXED_POINT_ITERS):
            # replicating the border keeps the lookup a contraction far outside too
            p_next = hq - _pull(grid, p + pad, cv2.INTER_LINEAR, cv2.BORDER_REPLICATE)
            moved = cv2.absdiff(p_next, p)
            moved[far] = 0.0
            step = float(moved.max(initial=0.0))
            p = p_next
            if step < FIXED_POINT_TOL:
                break
        return p

    def map_mask_to_reference(self, mask: np.ndarray) -> np.ndarray:
        """Target-space bool mask -> reference-space bool mask (the region it depicts)."""
        if self.homography is None:
            return _splat(mask, self.target_to_reference, self.reference_shape)
        hr, wr = self.reference_shape
        out = np.zeros((hr, wr), bool)
        pts = self.target_to_reference[mask]
        pts = pts[np.isfinite(pts[:, 0]) & np.isfinite(pts[:, 1])]
        if len(pts) == 0:
            return out
        # the forward map bounds the region, so the inverse is only needed on that box
        lo, hi = _column_range(pts)
        x0, y0 = np.floor(lo).astype(int) - 2
        x1, y1 = np.ceil(hi).astype(int) + 3
        x0, y0, x1, y1 = max(x0, 0), max(y0, 0), min(x1, wr), min(y1, hr)
        if x1 <= x0 or y1 <= y0:
            return out
        coords = (self._ref_to_tgt[y0:y1, x0:x1] if self._ref_to_tgt is not None
                  else self.inverse_on((x0, y0, x1, y1)))
        out[y0:y1, x0:x1] = _pull(mask.astype(np.float32), coords) >= 0.5
        return out

    def map_mask_to_target(self, mask: np.ndarray) -> np.ndarray:
        """Reference-space bool mask -> target-space bool mask."""
        return _pull(mask.astype(np.float32), self.target_to_reference) >= 0.5

    def warp_image(self, image: np.ndarray, interp: int = cv2.INTER_LINEAR) -> np.ndarray:
        """Render a reference-space image in target space (outside the reference -> 0)."""
        return _pull(image, self.target_to_reference, interp)

    def to_dict(self) -> dict:
        """JSON-able parameters from which `from_params` rebuilds the identical warp."""
        if self.homography is None:
            return {}
        return {"homography": self.homography.tolist(),
                "field": (self.displacement or SmoothField.zero()).to_dict(),
                "target_shape": list(self.target_shape),
                "reference_shape": list(self.reference_shape)}

    @staticmethod
    def from_dict(d: dict, target_to_reference: np.ndarray | None = None) -> Warp:
        """The warp of `to_dict`; with `target_to_reference` (e.g. a stored flow) that forward
        map is kept instead of being recomputed from the parameters (the inverse stays exact)."""
        homography, smooth = np.asarray(d["homography"]), SmoothField.from_dict(d["field"])
        if target_to_reference is not None:
            return Warp(target_to_reference, tuple(d["reference_shape"]),
                        homography.astype(np.float64), smooth)
        return Warp.from_params(homography, smooth, tuple(d["target_shape"]),
                                tuple(d["reference_shape"]))


def _shifted_field(smooth: SmoothField, ht: int, wt: int, pad: int,
                   window: Box | None = None) -> np.ndarray:
    """Field on the grid of pixels (-pad .. W+pad-1, -pad .. H+pad-1), origin moved by phase;
    with a `window` of that grid, zero outside it (for lookups known to stay inside)."""
    phase = smooth.phase - pad * (smooth.freq[..., 0] + smooth.freq[..., 1])
    shifted = SmoothField(smooth.amp, smooth.freq, phase)
    height, width = ht + 2 * pad, wt + 2 * pad
    if window is None:
        return shifted.on_grid(height, width)
    x0, y0, x1, y1 = window
    out = np.zeros((height, width, 2), np.float32)
    out[y0:y1, x0:x1] = cv2.merge(shifted.planes(height, width, window))
    return out


def _column_range(pts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(min, max) of each column of [N, 2] points (numpy reduces a column at a time many
    times faster than along axis 0 of the two)."""
    return (np.array([pts[:, 0].min(), pts[:, 1].min()]),
            np.array([pts[:, 0].max(), pts[:, 1].max()]))


def _lookup_window(hq: np.ndarray, pad: int, reach: float, shape: tuple[int, int]
                   ) -> Box | None:
    """The part of the padded field grid that the fixed point's lookups can read, or None
    for all of it.

    Lookups sit at p + pad with |p - H(q)| <= `reach` (the field's largest magnitude); a
    bilinear read (OpenCV rounds coordinates to 1/32 px) touches the two pixels around,
    replicated ones included when it falls outside. A pixel of margin covers rounding.
    """
    height, width = shape
    lo, hi = _column_range(hq.reshape(-1, 2))
    if not (np.isfinite(lo).all() and np.isfinite(hi).all()):
        return None
    x0, y0 = (np.floor(lo + pad - reach) - 2).astype(int)
    x1, y1 = (np.ceil(hi + pad + reach) + 3).astype(int)
    x0, x1 = min(max(x0, 0), width - 1), min(max(x1, 1), width)
    y0, y1 = min(max(y0, 0), height - 1), min(max(y1, 1), height)
    if (x0, y0, x1, y1) == (0, 0, width, height):
        return None
    return int(x0), int(y0), int(x1), int(y1)


def _splat(mask: np.ndarray, t2r: np.ndarray, reference_shape: tuple[int, int]) -> np.ndarray:
    """Forward-splat target mask pixels into the reference (for warps given only as a flow)."""
    hr, wr = reference_shape
    out = np.zeros((hr, wr), np.uint8)
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return out.astype(bool)
    base = t2r[ys, xs].astype(np.float32)
    ok = np.isfinite(base).all(-1)
    base = base[ok]
    for dx, dy in ((0, 0), (0.5, 0), (0, 0.5), (0.5, 0.5)):  # sub-pixel samples fill gaps
        q = base + np.array([dx, dy], np.float32) - 0.25
        qi = np.rint(q).astype(np.int64)
        inside = (qi[:, 0] >= 0) & (qi[:, 0] < wr) & (qi[:, 1] >= 0) & (qi[:, 1] < hr)
        out[qi[inside, 1], qi[inside, 0]] = 1
    out = cv2.morphologyEx(out, cv2.MORPH_CLOSE, np.ones((3, 3), np.uint8))
    return out.astype(bool)


def _pixel_centre_box(mask: np.ndarray) -> tuple[float, float, float, float]:
    """(x0, y0, x1, y1) of the first and last covered pixel centres."""
    box = mask_bbox(mask)
    if box is None:
        raise ValueError("empty mask has no box")
    x0, y0, x1, y1 = box
    return float(x0), float(y0), float(x1 - 1), float(y1 - 1)


def random_homography(
    reference_footprint: np.ndarray, target_size: int, rng: np.random.Generator,
    scale_range: tuple[float, float] = (0.45, 1.0), max_rotation: float = 30.0,
    perspective: float = 0.06, tries: int = 6,
) -> np.ndarray:
    """Homography placing the reference object at a new scale, angle and position in the target.

    The object's extent in the target is `scale_range` of the frame; among a few random
    placements the one whose box overlaps the reference box least is kept, so the position
    of a region in the target says little about its position in the reference.
    """
    x0, y0, x1, y1 = _pixel_centre_box(reference_footprint)
    rs = reference_footprint.shape[0]
    corners = np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]], np.float64)
    centre = corners.mean(0)
    theta = np.deg2rad(rng.uniform(-max_rotation, max_rotation))
    rot = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
    moved = (corners - centre) @ rot.T
    extent = (moved.max(0) - moved.min(0)).max()
    moved *= rng.uniform(*scale_range) * (target_size - 1) / extent
    moved += rng.uniform(-perspective, perspective, size=moved.shape) * target_size
    lo, hi = moved.min(0), moved.max(0)
    ref_box = np.array([x0, y0, x1, y1]) * (target_size / rs)
    best, best_iou = None, np.inf
    for _ in range(tries):
        shift = np.empty(2)
        for a in range(2):
            a_lo, a_hi = -lo[a], target_size - 1 - hi[a]
            shift[a] = rng.uniform(a_lo, a_hi) if a_hi > a_lo else (a_lo + a_hi) / 2
        box = np.concatenate([lo + shift, hi + shift])
        iou = _box_iou(box, ref_box)
        if iou < best_iou:
            best, best_iou = shift, iou
    dst = (moved + best).astype(np.float32)
    return cv2.getPerspectiveTransform(corners.astype(np.float32), dst).astype(np.float64)


def _box_iou(a: np.ndarray, b: np.ndarray) -> float:
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / max(union, 1e-9)


def random_warp(reference_footprint: np.ndarray, target_size: int, rng: np.random.Generator,
                max_field_amp: float = 0.015) -> Warp:
    """Random homography + smooth non-rigid field from the reference to a square target."""
    h = random_homography(reference_footprint, target_size, rng)
    smooth = SmoothField.random(target_size, rng, max_amp=max_field_amp)
    return Warp.from_params(h, smooth, (target_size, target_size), reference_footprint.shape)


def target_background(size: int, rng: np.random.Generator) -> np.ndarray:
    """Cluttered scene background: noise, gradient or random shapes (uint8 [S,S,3])."""
    kind = rng.integers(0, 3)
    c0 = np.array(random_colour(rng), np.float32)
    c1 = np.array(random_colour(rng), np.float32)
    dc = c1 - c0
    # per channel plane (see objects.merge_planes), with the dtypes of the [S,S,3] arithmetic
    if kind == 0:  # low-frequency coloured noise
        small = rng.random((max(2, size // 16), max(2, size // 16), 3)).astype(np.float32)
        t = cv2.split(cv2.resize(small, (size, size), interpolation=cv2.INTER_CUBIC))
        planes = [c0[c] + dc[c] * t[c] for c in range(3)]  # float32
    elif kind == 1:  # gradient
        ramp = np.linspace(0.0, 1.0, size, dtype=np.float32)
        a = rng.uniform(0, 2 * np.pi)
        t = np.clip(np.cos(a) * ramp[None, :] + np.sin(a) * ramp[:, None], 0, 1)  # float64
        top = max(1e-6, float(t.max()))
        planes = [c0[c] + dc[c] * t / top for c in range(3)]  # float64
    else:  # random shapes
        img = cv2.merge([np.full((size, size), v, np.float32) for v in c0])
        for _ in range(int(rng.integers(3, 9))):
            col = tuple(float(v) for v in rng.integers(0, 256, 3))
            cx, cy = rng.integers(0, size, 2)
            r = int(rng.integers(size // 16 + 1, size // 3 + 2))
            if rng.random() < 0.5:
                cv2.circle(img, (int(cx), int(cy)), r, col, -1)
            else:
                cv2.rectangle(img, (int(cx - r), int(cy - r // 2)), (int(cx + r), int(cy + r)),
                              col, -1)
        planes = cv2.split(img)
    grain = rng.standard_normal((size, size), dtype=np.float32) * rng.uniform(0, 6)
    return merge_planes(planes, grain)


@dataclass
class TargetView:
    """The object seen under `warp`, composited on a new background."""

    rgb: np.ndarray  # uint8 [S,S,3], after photometric change
    geometric_rgb: np.ndarray  # uint8 [S,S,3], before photometric change (for tests / GT)
    footprint: np.ndarray  # bool [S,S]
    detail: np.ndarray  # bool [S,S]
    photometric: dict = field(default_factory=dict)


def render_target(reference: ObjectView, warp: Warp, background: np.ndarray) -> TargetView:
    """Warp the reference object into the target frame and composite over `background`."""
    alpha = warp.warp_image(reference.footprint.astype(np.float32))
    obj = warp.warp_image(reference.rgb).astype(np.float32)
    alpha3 = cv2.merge([alpha] * 3)  # same-shape operands: numpy's fast loops, same values
    out = background.astype(np.float32) * (1 - alpha3) + obj * alpha3
    footprint = alpha >= 0.5
    detail = warp.map_mask_to_target(reference.detail) & footprint
    out += 0.5
    rgb = np.clip(out, 0, 255, out=out).astype(np.uint8)
    return TargetView(rgb=rgb, geometric_rgb=rgb, footprint=footprint, detail=detail)


def photometric_jitter(rgb: np.ndarray, rng: np.random.Generator, brightness: float = 0.15,
                       contrast: float = 0.2, hue: float = 8.0) -> tuple[np.ndarray, dict]:
    """Brightness / contrast / hue change between views (hue in OpenCV units of 2 degrees)."""
    b = rng.uniform(-brightness, brightness) * 255
    c = rng.uniform(1 - contrast, 1 + contrast)
    dh = rng.uniform(-hue, hue)
    # per-value maps: the float32 arithmetic applied to the 256 possible values, not each pixel
    v = np.arange(256, dtype=np.float32)
    x = cv2.LUT(rgb, np.clip((v - 128.0) * c + 128.0 + b, 0, 255).astype(np.uint8))
    if abs(dh) >= 0.5:
        hue, sat, val = cv2.split(cv2.cvtColor(x, cv2.COLOR_RGB2HSV))
        turn = ((np.arange(256, dtype=np.int16) + int(round(dh))) % 180).astype(np.uint8)
        x = cv2.cvtColor(cv2.merge([cv2.LUT(hue, turn), sat, val]), cv2.COLOR_HSV2RGB)
    return x, {"brightness": b, "contrast": c, "hue": dh}


def make_target(reference: ObjectView, target_size: int, rng: np.random.Generator,
                photometric: bool = True) -> tuple[TargetView, Warp]:
    """Random warp + new background + photometric change: the target view and its GT warp."""
    warp = random_warp(reference.footprint, target_size, rng)
    view = render_target(reference, warp, target_background(target_size, rng))
    if photometric:
        view.rgb, view.photometric = photometric_jitter(view.geometric_rgb, rng)
    return view, warp
