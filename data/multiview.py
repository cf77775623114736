"""Training pairs from several views of one object with depth and camera poses.

Target pixels are back-projected with their depth, moved into the reference camera and
projected, giving a dense target -> reference correspondence; a pixel keeps it only when it
lands inside the reference frame and the reference depth there agrees with the projected
depth (otherwise something else is in front: occluded). The pair then goes through the same
flow-pair path as `_flow.npy` pairs (`data.shards.flow_pair_record`), squared by padding or
cropping so the views keep their geometry.

Conventions (docs/multiview_format.md): OpenCV cameras (x right, y down, z forward), K maps
camera coordinates to pixels whose integer coordinates are pixel centres, poses are
camera-to-world 4x4, depth is z-depth (along the optical axis, not along the ray).
"""

from __future__ import annotations

import json
import logging
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image

from data.shards import (
    FITS,
    IMAGE_EXTENSIONS,
    find_image,
    flow_pair_record,
    load_mask,
    load_rgb,
    sample_nearest_and_linear,
)
from data.synthetic import working_sizes

log = logging.getLogger(__name__)

CONVENTIONS = ("opencv", "opengl")
# OpenGL / Blender cameras look down -z with y up: flip y and z to get OpenCV axes
OPENGL_TO_OPENCV = np.diag([1.0, -1.0, -1.0, 1.0])
DEPTH_TOLERANCE = 0.02  # relative: 2 cm at 1 m still counts as the same surface


@dataclass(frozen=True, eq=False)
class Camera:
    """Pinhole camera: intrinsics K (3x3) and an OpenCV camera-to-world pose (4x4)."""

    K: np.ndarray
    cam_to_world: np.ndarray

    def __post_init__(self) -> None:
        k, pose = np.asarray(self.K, np.float64), np.asarray(self.cam_to_world, np.float64)
        if k.shape != (3, 3) or not np.isfinite(k).all() or abs(np.linalg.det(k)) < 1e-12:
            raise ValueError(f"K must be an invertible 3x3 matrix, got {k.tolist()}")
        if pose.shape != (4, 4) or not np.allclose(pose[3], [0, 0, 0, 1]):
            raise ValueError(f"cam_to_world must be 4x4 with last row 0 0 0 1, got "
                             f"{pose.tolist()}")
        r = pose[:3, :3]
        if not np.allclose(r @ r.T, np.eye(3), atol=1e-4) or np.linalg.det(r) < 0:
            raise ValueError("cam_to_world's 3x3 block must be a rotation (orthonormal, det +1)")
        object.__setattr__(self, "K", k)
        object.__setattr__(self, "cam_to_world", pose)

    @property
    def axis(self) -> np.ndarray:
        """Viewing direction (the camera's +z) in world coordinates."""
        return self.cam_to_world[:3, 2]


@dataclass
class View:
    """One view of an object: RGB, z-depth (NaN where unknown), optional object mask."""

    name: str
    rgb: np.ndarray  # uint8 [H, W, 3]
    depth: np.ndarray  # float32 [H, W]
    camera: Camera
    mask: np.ndarray | None = None  # bool [H, W]


@dataclass
class Correspondence:
    """Dense target -> reference correspondence with the reason a pixel has none."""

    target_to_reference: np.ndarray  # float32 [Ht, Wt, 2] reference (x, y); NaN where invalid
    valid: np.ndarray  # bool [Ht, Wt]
    outside: np.ndarray  # bool: no target depth, behind the reference camera or off its frame
    occluded: np.ndarray  # bool: in the frame, but the reference depth there differs or is unknown


def backproject(depth: np.ndarray, K: np.ndarray) -> np.ndarray:
    """Camera-frame points [H, W, 3] of every pixel centre at its z-depth."""
    h, w = depth.shape
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float64)
    rays = np.stack([xs, ys, np.ones_like(xs)], -1) @ np.linalg.inv(K).T
    return rays / rays[..., 2:3] * depth[..., None].astype(np.float64)


def correspondence(target_depth: np.ndarray, target_camera: Camera,
                   reference_depth: np.ndarray, reference_camera: Camera,
                   depth_tolerance: float = DEPTH_TOLERANCE) -> Correspondence:
    """Where each target pixel lands in the reference view, and whether it is seen there.

    A pixel is valid when its depth is known, it projects in front of the reference camera
    and inside its frame (pixel extents), and the reference depth there (bilinear where its
    four neighbours are known, else the nearest pixel's; either may agree) is within
    `depth_tolerance` (relative) of the projected depth.
    """
    if depth_tolerance < 0:
        raise ValueError(f"depth_tolerance must be >= 0, got {depth_tolerance}")
    t_depth = np.asarray(target_depth, np.float64)
    with np.errstate(invalid="ignore"):
        known = np.isfinite(t_depth) & (t_depth > 0)
    pts = backproject(np.where(known, t_depth, 1.0), target_camera.K)
    rel = np.linalg.inv(reference_camera.cam_to_world) @ target_camera.cam_to_world
    pts = pts @ rel[:3, :3].T + rel[:3, 3]
    z = pts[..., 2]
    front = known & (z > 1e-9)
    pix = pts @ reference_camera.K.T
    with np.errstate(divide="ignore", invalid="ignore"):
        uv = pix[..., :2] / np.where(front, pix[..., 2], np.nan)[..., None]
    hr, wr = reference_depth.shape
    with np.errstate(invalid="ignore"):
        inside = (front & (uv[..., 0] > -0.5) & (uv[..., 0] < wr - 0.5)
                  & (uv[..., 1] > -0.5) & (uv[..., 1] < hr - 0.5))
        r_depth = np.asarray(reference_depth, np.float64)
        r_depth = np.where(np.isfinite(r_depth) & (r_depth > 0), r_depth, np.nan)
    nearest, linear, _ = sample_nearest_and_linear(r_depth, uv)
    with np.errstate(invalid="ignore"):
        agree = ((np.abs(nearest - z) <= depth_tolerance * z)
                 | (np.abs(linear - z) <= depth_tolerance * z))
    valid = inside & agree
    t2r = np.where(valid[..., None], uv, np.nan).astype(np.float32)
    return Correspondence(t2r, valid, ~inside, inside & ~agree)


# ----------------------------------------------------------------------------- folder format
def load_cameras(path: str | Path) -> tuple[dict[str, Camera], float | None]:
    """cameras.json -> ({view name: Camera (OpenCV)}, depth_png_scale or None)."""
    path = Path(path)
    try:
        spec = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: unreadable cameras file ({err})") from err
    convention = spec.get("convention", "opencv")
    if convention not in CONVENTIONS:
        raise ValueError(f"{path}: convention must be one of {CONVENTIONS}, got {convention!r}")
    views = spec.get("views")
    if not isinstance(views, dict) or not views:
        raise ValueError(f"{path}: 'views' must map view names to cameras")
    cameras = {}
    for name, cam in views.items():
        try:
            K = cam.get("K", spec.get("K"))
            if K is None:
                raise ValueError("no K (per view or shared)")
            pose = np.asarray(cam["cam_to_world"], np.float64)
            if convention == "opengl" and pose.shape == (4, 4):
                pose = pose @ OPENGL_TO_OPENCV
            cameras[str(name)] = Camera(np.asarray(K, np.float64), pose)
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"{path}: view {name!r}: {err}") from err
    scale = spec.get("depth_png_scale")
    return cameras, None if scale is None else float(scale)


def load_depth(views_dir: Path, name: str, depth_png_scale: float | None) -> np.ndarray:
    """`<name>_depth.npy` (float) or `<name>_depth.png` (16-bit, times depth_png_scale);
    zeros and non-finite values become NaN (unknown)."""
    npy = views_dir / f"{name}_depth.npy"
    if npy.is_file():
        depth = np.load(npy, allow_pickle=False).astype(np.float32)
        where = npy
    else:
        png = views_dir / f"{name}_depth.png"
        if not png.is_file():
            raise ValueError(f"{views_dir}: view {name!r} has no {npy.name} or {png.name}")
        if depth_png_scale is None:
            raise ValueError(f"{png}: a PNG depth needs 'depth_png_scale' in cameras.json")
        with Image.open(png) as im:
            raw = np.asarray(im)
        if raw.dtype != np.uint16 and im.mode not in ("I;16", "I"):
            raise ValueError(f"{png}: depth PNG must be 16-bit, got mode {im.mode}")
        depth = raw.astype(np.float32) * depth_png_scale
        where = png
    if depth.ndim != 2:
        raise ValueError(f"{where}: depth must be [H, W], got shape {depth.shape}")
    depth[~np.isfinite(depth) | (depth <= 0)] = np.nan
    return depth


class MultiviewObject:
    """One object folder: `cameras.json` and `views/` (see docs/multiview_format.md).

    Views are read on demand (a few kept in memory), so objects with many views fit.
    """

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.views_dir = self.folder / "views"
        self.cameras, self.depth_png_scale = load_cameras(self.folder / "cameras.json")
        self.view = lru_cache(maxsize=8)(self._load_view)

    @property
    def names(self) -> list[str]:
        return sorted(self.cameras)

    def _load_view(self, name: str) -> View:
        rgb_path = find_image(self.views_dir, name)
        if rgb_path is None:
            raise ValueError(f"{self.views_dir}: no image for view {name!r} "
                             f"({name}.png or another of {IMAGE_EXTENSIONS})")
        rgb = load_rgb(rgb_path)
        depth = load_depth(self.views_dir, name, self.depth_png_scale)
        if depth.shape != rgb.shape[:2]:
            raise ValueError(f"{self.views_dir}: view {name!r} depth {depth.shape} != image "
                             f"{rgb.shape[:2]}")
        mask_path = find_image(self.views_dir, f"{name}_mask")
        mask = load_mask(mask_path) if mask_path is not None else None
        if mask is not None and mask.shape != rgb.shape[:2]:
            raise ValueError(f"{mask_path}: mask {mask.shape} != image {rgb.shape[:2]}")
        return View(name, rgb, depth, self.cameras[name], mask)


def object_folders(root: str | Path) -> list[Path]:
    """Object folders under `root` (sorted), or `root` itself when it holds cameras.json."""
    root = Path(root)
    if (root / "cameras.json").is_file():
        return [root]
    if not root.is_dir():
        raise FileNotFoundError(f"multi-view folder not found: {root}")
    return sorted(p for p in root.iterdir() if (p / "cameras.json").is_file())


@dataclass(frozen=True)
class PairSelection:
    """Which (target, reference) view pairs of an object become samples.

    Candidates have viewing directions `min_angle`-`max_angle` degrees apart; they are tried
    in a seeded random order and kept when at least `min_overlap` of the target's object
    pixels (all pixels with depth when there is no mask) are seen in the reference, up to
    `pairs_per_object`.
    """

    pairs_per_object: int = 8
    min_angle: float = 10.0
    max_angle: float = 60.0
    min_overlap: float = 0.3


def candidate_pairs(cameras: dict[str, Camera], min_angle: float, max_angle: float
                    ) -> list[tuple[str, str]]:
    """Ordered (target, reference) pairs whose viewing directions are within the range."""
    names = sorted(cameras)
    out = []
    for t in names:
        for r in names:
            if t == r:
                continue
            cos = float(np.clip(cameras[t].axis @ cameras[r].axis, -1.0, 1.0))
            if min_angle <= np.degrees(np.arccos(cos)) <= max_angle:
                out.append((t, r))
    return out


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name)


def object_records(obj: MultiviewObject, index: int, seed: int, reference_res: int,
                   target_res: int, selection: PairSelection, fit: str,
                   depth_tolerance: float) -> Iterator[dict]:
    """Shard records of one object's selected view pairs."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, zlib.crc32(obj.folder.name
                                                                          .encode())]))
    pairs = candidate_pairs(obj.cameras, selection.min_angle, selection.max_angle)
    order = {n: i for i, n in enumerate(obj.names)}
    kept = 0
    for j in rng.permutation(len(pairs)):
        if kept >= selection.pairs_per_object:
            break
        t_name, r_name = pairs[j]
        tgt, ref = obj.view(t_name), obj.view(r_name)
        corr = correspondence(tgt.depth, tgt.camera, ref.depth, ref.camera, depth_tolerance)
        region = np.isfinite(tgt.depth) if tgt.mask is None else tgt.mask
        if not region.any() or corr.valid[region].mean() < selection.min_overlap:
            continue
        key = f"{index:06d}_{order[t_name]:04d}_{order[r_name]:04d}_{_safe(obj.folder.name)}"
        meta = {"source": "multiview", "object": obj.folder.name, "target_view": t_name,
                "reference_view": r_name}
        rec = flow_pair_record(key, ref.rgb, tgt.rgb, corr.target_to_reference, meta,
                               reference_res, target_res, fit, target_mask=tgt.mask,
                               reference_mask=ref.mask)
        if rec is not None:
            kept += 1
            yield rec
    if kept == 0:
        log.warning("object %s: no view pair passed the selection (%d candidates)",
                    obj.folder, len(pairs))


def multiview_records(root: str | Path, seed: int = 0, image_size: int = 64,
                      reference_size: int = 224, selection: PairSelection | None = None,
                      fit: str = "pad", depth_tolerance: float = DEPTH_TOLERANCE) -> Iterator[dict]:
    """Shard records of view pairs from every object folder under `root` (sorted,
    deterministic given `seed`): correspondence from depth (`correspondence`), views squared
    by `fit` ("pad" or "crop" keep the geometry). A malformed object is skipped with a
    warning naming it."""
    if fit not in FITS:
        raise ValueError(f"fit must be one of {FITS}, got {fit!r}")
    selection = selection or PairSelection()
    ref_res, tgt_res = working_sizes(image_size, reference_size)
    folders = object_folders(root)
    if not folders:
        raise FileNotFoundError(f"no object folder with cameras.json under {root}")
    for i, folder in enumerate(folders):
        try:
            obj = MultiviewObject(folder)
            yield from object_records(obj, i, seed, ref_res, tgt_res, selection, fit,
                                      depth_tolerance)
        except ValueError as err:
            log.warning("skipping object %s: %s", folder, err)
