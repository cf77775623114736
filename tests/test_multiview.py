"""Multi-view pairs from depth and poses, checked on scenes ray-cast here with known geometry.

The scenes are textured rectangles (a ground plane, optionally a floating occluder) seen by
OpenCV pinhole cameras; a tiny numpy ray caster renders RGB, z-depth and object masks, and
the true correspondence comes from the plane-induced homography or from casting the
reference camera's ray back through the projected point.
"""

from __future__ import annotations

import json
import logging
import tarfile
from dataclasses import dataclass

import numpy as np
import pytest
from PIL import Image

from data.datamodule import PairDataModule
from data.modes import ALIGNMENT
from data.multiview import (
    OPENGL_TO_OPENCV,
    Camera,
    MultiviewObject,
    PairSelection,
    correspondence,
    load_cameras,
    multiview_records,
)
from data.shards import (
    SampleDecoder,
    decode_npy,
    decode_png,
    fit_window,
    image_folder_records,
    sample_flow,
)
from data.synthetic import working_sizes


# ----------------------------------------------------------------------------- ray caster
@dataclass
class Rect:
    """The parallelogram origin + s a + u b, s and u in [0, 1], with a sinusoid texture."""

    origin: tuple[float, float, float]
    a: tuple[float, float, float]
    b: tuple[float, float, float]
    freq: tuple[float, float] = (5.0, 3.0)
    phase: float = 0.0


def look_at(eye, target, up=(0.0, 0.0, 1.0)) -> np.ndarray:
    """OpenCV camera-to-world: x right, y down, z towards `target`."""
    eye = np.asarray(eye, float)
    z = np.asarray(target, float) - eye
    z /= np.linalg.norm(z)
    x = np.cross(z, up)
    x /= np.linalg.norm(x)
    pose = np.eye(4)
    pose[:3, :3] = np.stack([x, np.cross(z, x), z], 1)
    pose[:3, 3] = eye
    return pose


def intrinsics(h: int, w: int, f: float) -> np.ndarray:
    return np.array([[f, 0, (w - 1) / 2], [0, f, (h - 1) / 2], [0, 0, 1.0]])


def cast(rects: list[Rect], K: np.ndarray, pose: np.ndarray, pix: np.ndarray):
    """First hit along each pixel's ray: (z-depth, world point, rect id (-1 = none), s, u)."""
    d_cam = np.concatenate([pix, np.ones_like(pix[..., :1])], -1) @ np.linalg.inv(K).T
    d_cam = d_cam / d_cam[..., 2:3]  # unit z, so the ray parameter is the z-depth
    d = d_cam @ pose[:3, :3].T
    c = pose[:3, 3]
    best = np.full(pix.shape[:-1], np.inf)
    ids = np.full(pix.shape[:-1], -1)
    s_out, u_out = np.zeros_like(best), np.zeros_like(best)
    for i, r in enumerate(rects):
        o, a, b = (np.asarray(v, float) for v in (r.origin, r.a, r.b))
        n = np.cross(a, b)
        with np.errstate(divide="ignore", invalid="ignore"):
            t = ((o - c) @ n) / (d @ n)
        p = c + t[..., None] * d
        s = (p - o) @ a / (a @ a)
        u = (p - o) @ b / (b @ b)
        hit = (t > 1e-6) & (s >= 0) & (s <= 1) & (u >= 0) & (u <= 1) & (t < best)
        best[hit], ids[hit], s_out[hit], u_out[hit] = t[hit], i, s[hit], u[hit]
    points = np.where((ids >= 0)[..., None], c + np.where(ids >= 0, best, 0)[..., None] * d,
                      np.nan)
    return best, points, ids, s_out, u_out


def render(rects: list[Rect], K: np.ndarray, pose: np.ndarray, h: int, w: int):
    """(rgb uint8, depth float32 with NaN on misses, rect ids)."""
    ys, xs = np.mgrid[0:h, 0:w].astype(float)
    depth, _, ids, s, u = cast(rects, K, pose, np.stack([xs, ys], -1))
    rgb = np.full((h, w, 3), 90.0)
    for i, r in enumerate(rects):
        m = ids == i
        base = np.sin(2 * np.pi * r.freq[0] * s[m] + r.phase) * np.cos(2 * np.pi * r.freq[1]
                                                                       * u[m])
        rgb[m] = 128 + np.stack([100 * base, 60 * np.sin(9 * s[m]), 80 * np.cos(7 * u[m])], -1)
    depth = np.where(ids >= 0, depth, np.nan).astype(np.float32)
    return np.clip(rgb, 0, 255).astype(np.uint8), depth, ids


def project(K: np.ndarray, pose: np.ndarray, points: np.ndarray):
    """World points -> (pixel (x, y), z-depth) in the camera (NaN stays NaN)."""
    cam = np.nan_to_num(points - pose[:3, 3]) @ pose[:3, :3]
    cam[~np.isfinite(points).all(-1)] = np.nan
    pix = cam @ K.T
    return pix[..., :2] / pix[..., 2:3], cam[..., 2]


PLANE = Rect((-1.0, -1.0, 0.0), (2.0, 0.0, 0.0), (0.0, 2.0, 0.0))
OCCLUDER = Rect((-0.5, -0.55, 0.7), (0.45, 0.0, 0.0), (0.0, 0.4, 0.0), (2.0, 2.0), 1.0)
TARGET = (intrinsics(96, 144, 120.0), look_at((0.4, -1.9, 2.3), (0.05, 0.0, 0.0)), 96, 144)
REFERENCE = (intrinsics(120, 90, 100.0), look_at((-0.9, -1.3, 2.1), (-0.1, 0.1, 0.0)), 120, 90)


def plane_homography(K_t, pose_t, K_r, pose_r) -> np.ndarray:
    """Target px -> reference px homography induced by the plane z = 0 (world)."""
    n_w = np.array([0.0, 0.0, 1.0])
    n_t = pose_t[:3, :3].T @ n_w
    d_t = n_w @ (np.zeros(3) - pose_t[:3, 3])
    rel = np.linalg.inv(pose_r) @ pose_t
    return K_r @ (rel[:3, :3] + np.outer(rel[:3, 3], n_t) / d_t) @ np.linalg.inv(K_t)


def edge_band(ids: np.ndarray, pix: np.ndarray, radius: int = 2) -> np.ndarray:
    """Whether the ids around the rounded pixel positions are not all the same."""
    h, w = ids.shape
    pix = np.nan_to_num(pix, nan=-1.0, posinf=-1.0, neginf=-1.0)
    xi = np.clip(np.rint(pix[..., 0]).astype(int), 0, w - 1)
    yi = np.clip(np.rint(pix[..., 1]).astype(int), 0, h - 1)
    pad = np.pad(ids, radius, constant_values=-2)
    around = [pad[yi + radius + dy, xi + radius + dx]
              for dy in range(-radius, radius + 1) for dx in range(-radius, radius + 1)]
    return np.any(np.stack(around) != ids[yi, xi], 0)


# ----------------------------------------------------------------------------- geometry
def test_plane_correspondence_matches_homography():
    (K_t, pose_t, ht, wt), (K_r, pose_r, hr, wr) = TARGET, REFERENCE
    _, depth_t, ids_t = render([PLANE], K_t, pose_t, ht, wt)
    _, depth_r, ids_r = render([PLANE], K_r, pose_r, hr, wr)
    corr = correspondence(depth_t, Camera(K_t, pose_t), depth_r, Camera(K_r, pose_r))

    ys, xs = np.mgrid[0:ht, 0:wt].astype(float)
    q = np.stack([xs, ys, np.ones_like(xs)], -1) @ plane_homography(K_t, pose_t, K_r, pose_r).T
    truth = q[..., :2] / q[..., 2:3]
    inside = ((truth[..., 0] > -0.5) & (truth[..., 0] < wr - 0.5) & (truth[..., 1] > -0.5)
              & (truth[..., 1] < hr - 0.5))
    seen = (ids_t == 0) & inside
    sure = ~edge_band(ids_r, truth) & (truth[..., 0] > 1) & (truth[..., 0] < wr - 2) \
        & (truth[..., 1] > 1) & (truth[..., 1] < hr - 2)
    assert seen.sum() > 3000 and (~inside & (ids_t == 0)).sum() > 200  # both cases occur
    assert corr.valid[seen & sure].all()
    assert not corr.valid[~seen].any()  # off the plane or off the reference frame
    assert corr.outside[(ids_t == 0) & ~inside].all() and not corr.occluded[sure].any()
    err = np.abs(corr.target_to_reference - truth)[corr.valid]
    assert err.max() < 1e-3
    assert np.isnan(corr.target_to_reference[~corr.valid]).all()


def test_occluded_pixels_are_invalid():
    (K_t, pose_t, ht, wt), (K_r, pose_r, hr, wr) = TARGET, REFERENCE
    scene = [PLANE, OCCLUDER]
    _, depth_t, ids_t = render(scene, K_t, pose_t, ht, wt)
    _, depth_r, ids_r = render(scene, K_r, pose_r, hr, wr)
    corr = correspondence(depth_t, Camera(K_t, pose_t), depth_r, Camera(K_r, pose_r))

    ys, xs = np.mgrid[0:ht, 0:wt].astype(float)
    _, points, _, _, _ = cast(scene, K_t, pose_t, np.stack([xs, ys], -1))
    uv, z = project(K_r, pose_r, points)
    inside = ((ids_t >= 0) & (uv[..., 0] > -0.5) & (uv[..., 0] < wr - 0.5)
              & (uv[..., 1] > -0.5) & (uv[..., 1] < hr - 0.5))
    first, _, _, _, _ = cast(scene, K_r, pose_r, uv)  # the reference ray through the point
    visible = inside & (first >= z * (1 - 1e-6))
    occluded = inside & ~visible
    sure = ~edge_band(ids_r, uv) & ~edge_band(ids_t, np.stack([xs, ys], -1))
    assert (occluded & sure).sum() > 200 and (visible & sure).sum() > 3000
    assert not corr.valid[occluded & sure].any()
    assert corr.occluded[occluded & sure].all()
    assert corr.valid[visible & sure].all()
    assert np.abs(corr.target_to_reference - uv)[corr.valid].max() < 1e-3
    # the depth test is what rejects them: with any depth accepted they would pass
    lax = correspondence(depth_t, Camera(K_t, pose_t), depth_r, Camera(K_r, pose_r), 1e9)
    assert lax.valid[occluded & sure].all()


def test_flow_resampling_interpolates_smooth_flow_but_not_across_edges():
    ys, xs = np.mgrid[0:20, 0:20].astype(float)
    affine = np.stack([1.3 * xs + 0.2 * ys + 5, -0.4 * xs + 0.9 * ys + 2], -1)
    pts = np.random.default_rng(0).uniform(1, 18, (200, 2))
    exact = np.stack([1.3 * pts[:, 0] + 0.2 * pts[:, 1] + 5,
                      -0.4 * pts[:, 0] + 0.9 * pts[:, 1] + 2], -1)
    assert np.abs(sample_flow(affine, pts) - exact).max() < 1e-4
    step = affine.copy()
    step[:, 10:] += 30.0  # a depth edge between columns 9 and 10
    step[15:, :] = np.nan  # unknown rows
    out = sample_flow(step, np.array([[9.4, 5.0], [9.6, 5.0], [4.5, 5.5], [4.0, 16.0]]))
    assert np.allclose(out[0], step[5, 9]) and np.allclose(out[1], step[5, 10])
    assert np.allclose(out[2], [1.3 * 4.5 + 0.2 * 5.5 + 5, -0.4 * 4.5 + 0.9 * 5.5 + 2],
                       atol=1e-4)
    assert np.isnan(out[3]).all()


# ----------------------------------------------------------------------------- folder format
def write_object(folder, views: dict[str, tuple], scene: list[Rect], convention="opencv",
                 png_depth_scale: float | None = None) -> None:
    """An object folder in docs/multiview_format.md's layout, rendered from `views`."""
    (folder / "views").mkdir(parents=True)
    spec: dict = {"convention": convention, "views": {}}
    if png_depth_scale is not None:
        spec["depth_png_scale"] = png_depth_scale
    for name, (K, pose, h, w) in views.items():
        rgb, depth, ids = render(scene, K, pose, h, w)
        Image.fromarray(rgb).save(folder / "views" / f"{name}.png")
        Image.fromarray(((ids >= 0) * 255).astype(np.uint8)).save(
            folder / "views" / f"{name}_mask.png")
        if png_depth_scale is None:
            np.save(folder / "views" / f"{name}_depth.npy", depth)
        else:
            raw = np.rint(np.nan_to_num(depth) / png_depth_scale).astype(np.uint16)
            Image.fromarray(raw).save(folder / "views" / f"{name}_depth.png")
        stored = pose @ OPENGL_TO_OPENCV if convention == "opengl" else pose
        spec["views"][name] = {"K": K.tolist(), "cam_to_world": stored.tolist()}
    (folder / "cameras.json").write_text(json.dumps(spec))


def test_opengl_poses_and_png_depth_load_as_opencv(tmp_path):
    views = {"a": TARGET, "b": REFERENCE}
    write_object(tmp_path / "cv", views, [PLANE])
    write_object(tmp_path / "gl", views, [PLANE], convention="opengl", png_depth_scale=1e-4)
    cv, gl = MultiviewObject(tmp_path / "cv"), MultiviewObject(tmp_path / "gl")
    for name, (_, pose, _, _) in views.items():
        assert np.allclose(gl.cameras[name].cam_to_world, pose, atol=1e-12)
        a, b = cv.view(name).depth, gl.view(name).depth
        assert np.array_equal(np.isnan(a), np.isnan(b))
        assert np.nanmax(np.abs(a - b)) <= 0.5e-4 + 1e-6
    c_cv = correspondence(cv.view("a").depth, cv.cameras["a"], cv.view("b").depth,
                          cv.cameras["b"])
    c_gl = correspondence(gl.view("a").depth, gl.cameras["a"], gl.view("b").depth,
                          gl.cameras["b"])
    both = c_cv.valid & c_gl.valid
    assert both.sum() > 0.98 * c_cv.valid.sum()
    assert np.abs(c_cv.target_to_reference - c_gl.target_to_reference)[both].max() < 0.02


def test_malformed_cameras_name_the_view(tmp_path, caplog):
    folder = tmp_path / "objects" / "mug"
    write_object(folder, {"a": TARGET, "b": REFERENCE}, [PLANE])
    spec = json.loads((folder / "cameras.json").read_text())
    spec["views"]["b"]["cam_to_world"][0][0] = 2.0  # not a rotation
    (folder / "cameras.json").write_text(json.dumps(spec))
    with pytest.raises(ValueError, match="view 'b'.*rotation"):
        load_cameras(folder / "cameras.json")
    with caplog.at_level(logging.WARNING, logger="data.multiview"), pytest.raises(
            FileNotFoundError):
        list(multiview_records(tmp_path / "empty_root_that_does_not_exist"))
    with caplog.at_level(logging.WARNING, logger="data.multiview"):
        assert list(multiview_records(tmp_path / "objects")) == []
    assert "mug" in caplog.text and "rotation" in caplog.text


# ----------------------------------------------------------------------------- ingestion
def expected_window(h: int, w: int) -> tuple[int, int, int]:
    """The pad fit, written out: (left pad, top pad, side) of the centred square."""
    s = max(h, w)
    return (s - w) // 2, (s - h) // 2, s


def test_square_windows():
    focus = np.zeros((40, 100), bool)
    focus[10:20, 80:95] = True
    assert fit_window((40, 100), "crop", focus).to_list() == [60, 0, 40, 40]  # inside, on it
    focus[:] = False
    focus[5:30, 30:50] = True
    assert fit_window((40, 100), "crop", focus).to_list() == [20, 0, 40, 40]
    assert fit_window((40, 100), "pad").to_list() == [0, -30, 100, 100]
    assert fit_window((41, 100), "squash").to_list() == [0, 0, 100, 41]


@pytest.mark.parametrize("fit", ["pad", "crop"])
def test_ingestion_keeps_geometry(tmp_path, fit):
    """A non-square target and reference: each target pixel of the record must land where
    the scene's geometry puts it after the square fit (squashing would move it)."""
    scene = [PLANE, OCCLUDER]
    write_object(tmp_path / "box", {"t": TARGET, "r": REFERENCE}, scene)
    selection = PairSelection(pairs_per_object=2, min_angle=0.0, max_angle=90.0,
                              min_overlap=0.1)
    records = {json.loads(r["json"])["target_view"]: r
               for r in multiview_records(tmp_path, fit=fit, selection=selection)}
    rec = records["t"]
    meta = json.loads(rec["json"])
    ref_res, tgt_res = working_sizes(64, 224)
    t2r = decode_npy(rec["t2r.npy"]).astype(np.float64)
    fp = decode_png(rec["fp.png"], mask=True)
    assert t2r.shape == (tgt_res, tgt_res, 2) and decode_png(rec["ref.png"]).shape == (
        ref_res, ref_res, 3)

    (K_t, pose_t, ht, wt), (K_r, pose_r, hr, wr) = TARGET, REFERENCE
    if fit == "pad":
        tl, tt, ts = expected_window(ht, wt)
        rl, rt, rs = expected_window(hr, wr)
        t_win, r_win = (-tl, -tt, ts, ts), (-rl, -rt, rs, rs)
        assert meta["target_window"] == list(t_win) and meta["reference_window"] == list(r_win)
        band = int(tt * tgt_res / ts)  # padded rows above the image: nothing there
        assert not fp[:band].any() and np.isnan(t2r[:band]).all()
        assert not fp[-band:].any()
    else:  # a square of the shorter side, inside the image
        t_win, r_win = meta["target_window"], meta["reference_window"]
        assert t_win[2] == t_win[3] == min(ht, wt) and r_win[2] == r_win[3] == min(hr, wr)
        assert 0 <= t_win[0] <= wt - t_win[2] and 0 <= r_win[1] <= hr - r_win[3]

    ys, xs = np.mgrid[0:tgt_res, 0:tgt_res].astype(float)
    src = (np.stack([xs, ys], -1) + 0.5) * t_win[2] / tgt_res - 0.5 + np.array(t_win[:2])
    _, points, ids, _, _ = cast(scene, K_t, pose_t, src)
    uv, z = project(K_r, pose_r, points)
    first, _, _, _, _ = cast(scene, K_r, pose_r, uv)
    truth = (uv - np.array(r_win[:2]) + 0.5) * ref_res / r_win[2] - 0.5
    seen = ((ids >= 0) & (first >= z * (1 - 1e-6)) & (truth > 0).all(-1)
            & (truth < ref_res - 1).all(-1))
    _, _, ids_r = render(scene, K_r, pose_r, hr, wr)
    _, _, ids_t = render(scene, K_t, pose_t, ht, wt)
    sure = seen & ~edge_band(ids_r, uv) & ~edge_band(ids_t, src)
    valid = np.isfinite(t2r).all(-1)
    assert fp[valid].mean() > 0.99 and valid[sure].mean() > 0.99 and sure.sum() > 2000
    err = np.linalg.norm(t2r - truth, axis=-1)
    assert np.median(err[sure & valid]) < 0.05 and err[sure & valid].max() < 0.15

    # the region ground truth the reader derives is where the scene puts the target mask
    sample = SampleDecoder(seed=0, force_mode=ALIGNMENT)(dict(rec))
    mask = sample["mask"][0].numpy() > 0.5  # at 64 px
    my, mx = np.nonzero(mask)
    centres = (np.stack([mx, my], -1) + 0.5) * tgt_res / 64 - 0.5
    picked = centres.round().astype(int)
    ok = sure[picked[:, 1], picked[:, 0]]
    region = sample["reference_mask"][0].numpy() > 0.5
    ry, rx = np.nonzero(region)
    expected = truth[picked[ok, 1], picked[ok, 0]].mean(0)
    assert ok.sum() > 10 and np.linalg.norm(np.array([rx.mean(), ry.mean()]) - expected) < 4


def test_flow_pairs_can_be_padded_too(tmp_path):
    """`--images` `_flow.npy` pairs take the same path: padded, a shift stays a shift."""
    rng = np.random.default_rng(0)
    ref = rng.integers(0, 255, (60, 100, 3)).astype(np.uint8)
    tgt = np.zeros_like(ref)
    tgt[5:, 10:] = ref[:-5, :-10]
    ys, xs = np.mgrid[0:60, 0:100].astype(np.float32)
    flow = np.stack([xs - 10, ys - 5], -1)
    Image.fromarray(ref).save(tmp_path / "shoe_ref.png")
    Image.fromarray(tgt).save(tmp_path / "shoe_tgt.png")
    np.save(tmp_path / "shoe_flow.npy", flow)
    (rec,) = image_folder_records(tmp_path, seed=0, fit="pad")
    ref_res, tgt_res = working_sizes(64, 224)
    t2r = decode_npy(rec["t2r.npy"]).astype(np.float64)
    oy, ox = np.mgrid[0:tgt_res, 0:tgt_res].astype(float)
    src = (np.stack([ox, oy], -1) + 0.5) * 100 / tgt_res - 0.5 - np.array([0, 20])
    truth = (src - np.array([10, 5]) + np.array([0, 20]) + 0.5) * ref_res / 100 - 0.5
    inside = (src[..., 1] > -0.5) & (src[..., 1] < 59.5) & (src[..., 0] - 10 > 0.5) \
        & (src[..., 1] - 5 > 0.5)
    valid = np.isfinite(t2r).all(-1)
    assert valid[inside].all() and not valid[(src[..., 1] < -1) | (src[..., 1] > 60)].any()
    err = np.abs(t2r - truth).max(-1)
    interior = (src >= 0).all(-1) & (src[..., 0] <= 99) & (src[..., 1] <= 59)
    assert err[valid & interior].max() < 0.1  # bilinear
    assert err[valid].max() < 0.5 * ref_res / 100 + 0.1  # nearest in the outer half pixel


def test_make_shards_multiview_feeds_datamodule(tmp_path):
    from scripts.make_shards import main

    scene = [PLANE, OCCLUDER]
    around = [look_at((2.2 * np.cos(a), 2.2 * np.sin(a), 2.0), (0.0, 0.0, 0.0))
              for a in np.radians([-110, -80, -50])]
    for obj, (h, w) in {"lamp": (80, 112), "vase": (100, 72)}.items():
        K = intrinsics(h, w, 90.0)
        write_object(tmp_path / "objects" / obj,
                     {f"{i:02d}": (K, pose, h, w) for i, pose in enumerate(around)}, scene)
    main(["--out", str(tmp_path / "shards"), "--multiview", str(tmp_path / "objects"),
          "--pairs-per-object", "3", "--per-shard", "4"])
    shards = sorted((tmp_path / "shards").glob("shard-*.tar"))
    assert [p.name for p in shards] == ["shard-000000.tar", "shard-000001.tar"]  # 6 pairs

    dm = PairDataModule(source="shards", shard_urls=str(tmp_path / "shards" / "shard-*.tar"),
                        batch_size=3, train_length=6, val_length=2, resampled=False,
                        shuffle_buffer=0)
    dm.setup("fit")
    batches = list(dm.train_dataloader())
    assert len(batches) == 2
    for b in batches:
        assert b["target"].shape == (3, 3, 64, 64) and b["mask"].shape == (3, 1, 64, 64)
        assert b["reference"].shape == (3, 3, 224, 224)
        assert b["reference_mask"].shape == (3, 1, 224, 224)
        assert (b["mask"].flatten(1).sum(1) > 0).all()
        assert (b["reference_mask"].flatten(1).sum(1) > 0).all()
    keys = sorted(k for b in batches for k in b["__key__"])
    assert sum("lamp" in k for k in keys) == 3 and sum("vase" in k for k in keys) == 3

    # padded by default, not squashed: the bands beyond the image have no correspondence
    for shard in shards:
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                if member.name.endswith(".t2r.npy"):
                    t2r = decode_npy(tar.extractfile(member).read())
                    band = t2r[:17] if "lamp" in member.name else t2r[:, :17]
                    assert np.isnan(band).all() and np.isfinite(t2r).any()
