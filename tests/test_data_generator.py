"""Procedural objects, warps and masks: determinism and exactness of the ground truth."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from data.geometry import SmoothField, Warp, _apply_h, make_target
from data.masks import MaskConfig, make_mask, mask_bbox
from data.modes import ALIGNMENT, REFINEMENT
from data.objects import render_object
from data.synthetic import SyntheticPairs, item_generators, make_pair


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max(1, (a | b).sum()))


def box_iou(a, b) -> float:
    iw = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def bilinear(img: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Independent (numpy) bilinear sampling, to check OpenCV-based rendering."""
    x0, y0 = np.floor(x).astype(int), np.floor(y).astype(int)
    fx, fy = (x - x0)[..., None], (y - y0)[..., None]
    im = img.astype(np.float64)
    return ((1 - fx) * (1 - fy) * im[y0, x0] + fx * (1 - fy) * im[y0, x0 + 1]
            + (1 - fx) * fy * im[y0 + 1, x0] + fx * fy * im[y0 + 1, x0 + 1])


def field_at(smooth: SmoothField, pts: np.ndarray) -> np.ndarray:
    """Analytic displacement at arbitrary points [N, 2]."""
    out = np.zeros_like(pts, dtype=np.float64)
    for k in range(smooth.amp.shape[0]):
        for c in range(2):
            out[:, c] += smooth.amp[k, c] * np.sin(pts @ smooth.freq[k, c] + smooth.phase[k, c])
    return out


def test_render_object_deterministic_and_seed_dependent():
    a = render_object(96, np.random.default_rng(7))
    b = render_object(96, np.random.default_rng(7))
    c = render_object(96, np.random.default_rng(8))
    assert np.array_equal(a.rgb, b.rgb) and np.array_equal(a.detail, b.detail)
    assert not np.array_equal(a.rgb, c.rgb)
    assert a.rgb.dtype == np.uint8 and a.rgb.shape == (96, 96, 3)


@pytest.mark.parametrize("seed", range(6))
def test_object_masks_are_consistent(seed):
    v = render_object(128, np.random.default_rng(seed))
    fp_frac = v.footprint.mean()
    assert 0.15 < fp_frac < 0.9
    assert v.detail.any() and not (v.detail & ~v.footprint).any()
    # detail pixels must actually look different from the plain body
    body = v.rgb[v.footprint & ~v.detail].astype(float).mean(0)
    assert np.abs(v.rgb[v.detail].astype(float) - body).sum(-1).mean() > 20


def test_dataset_items_deterministic_regardless_of_order():
    ds = SyntheticPairs(length=10, seed=3)
    later_first = ds[5]
    ds[2]
    again = SyntheticPairs(length=10, seed=3)[5]
    for k in later_first:
        assert torch.equal(later_first[k], again[k]), k
    other = SyntheticPairs(length=10, seed=4)[5]
    assert not torch.equal(later_first["target"], other["target"])
    assert not torch.equal(ds[5]["target"], ds[6]["target"])


@pytest.mark.parametrize("seed", range(8))
def test_mask_round_trip_target_reference_target(seed):
    content, _ = item_generators(11, seed)
    pair = make_pair(content, 160, 160)
    region = pair.reference_region
    assert region.any()
    back = pair.warp.map_mask_to_target(region)
    assert iou(back, pair.mask) > 0.9


@pytest.mark.parametrize("seed", range(4))
def test_inverse_map_solves_the_forward_model(seed):
    rng = np.random.default_rng(seed)
    ref = render_object(128, rng)
    _, warp = make_target(ref, 96, rng)
    r2t = warp.reference_to_target
    q = np.argwhere(ref.footprint)[:, ::-1].astype(np.float64)  # (x, y) of object pixels
    p = r2t[ref.footprint].astype(np.float64)
    # the object lands inside the target frame
    inside = (p > 0).all(1) & (p < 95).all(1)
    assert inside.mean() > 0.95
    # p + d(p) == H(q) with d evaluated analytically (not on the lookup grid)
    lhs = p + field_at(warp.displacement, p)
    rhs = _apply_h(warp.homography, q)
    assert np.abs(lhs - rhs).max() < 0.05
    # and the dense forward map sends p back to q
    back = bilinear(warp.target_to_reference, p[inside, 0], p[inside, 1])
    assert np.abs(back - q[inside]).max() < 0.1


@pytest.mark.parametrize("seed", range(4))
def test_target_colour_equals_reference_at_correspondence(seed):
    rng = np.random.default_rng(seed)
    ref = render_object(128, rng)
    tgt, warp = make_target(ref, 128, rng)
    core = cv2.erode(tgt.footprint.astype(np.uint8), np.ones((5, 5), np.uint8)).astype(bool)
    ys, xs = np.nonzero(core)
    q = warp.target_to_reference[ys, xs]
    expected = bilinear(ref.rgb, q[:, 0], q[:, 1])
    diff = np.abs(tgt.geometric_rgb[ys, xs].astype(float) - expected)
    assert np.median(diff) <= 1.0 and np.percentile(diff, 99) < 12
    # the photometric change is real, so appearance alone is not the ground truth
    assert np.abs(tgt.rgb.astype(float) - tgt.geometric_rgb).mean() > 1.0


def test_warp_params_round_trip():
    rng = np.random.default_rng(5)
    ref = render_object(96, rng)
    _, warp = make_target(ref, 64, rng)
    rebuilt = Warp.from_dict(warp.to_dict())
    assert np.array_equal(rebuilt.target_to_reference, warp.target_to_reference)


def test_position_is_a_poor_cue():
    """The mask's box at the same (relative) place on the reference rarely hits the region."""
    scores, shifts = [], []
    for i in range(30):
        content, _ = item_generators(2, i)
        pair = make_pair(content, 160, 96)
        tb = np.array(mask_bbox(pair.mask), float) * (160 / 96)
        rb = mask_bbox(pair.reference_region)
        scores.append(box_iou(tb, rb))
        shifts.append(abs(pair.target.footprint.mean() - pair.reference.footprint.mean()))
    assert np.mean(scores) < 0.35
    assert np.mean(shifts) > 0.03  # object scale changes between views


@pytest.mark.parametrize("kind", ["detail", "brush", "box"])
def test_masks_respect_kind_footprint_and_area(kind):
    cfg = MaskConfig(p_detail=float(kind == "detail"), p_brush=float(kind == "brush"),
                     p_box=float(kind == "box"), min_area=0.02, max_area=0.5)
    kinds = []
    for seed in range(8):
        rng = np.random.default_rng(seed)
        ref = render_object(128, rng)
        tgt, _ = make_target(ref, 128, rng)
        mask, got = make_mask(tgt.footprint, tgt.detail, rng, cfg)
        kinds.append(got)
        frac = mask.sum() / tgt.footprint.sum()
        assert mask.any() and not (mask & ~tgt.footprint).any()
        assert 0.02 <= frac <= 0.5 or got == "box"  # fallback box may exceed on tiny objects
        if got == "detail":  # hugs a detail element: every pixel is close to detail
            dist = cv2.distanceTransform((~tgt.detail).astype(np.uint8), cv2.DIST_L2, 5)
            assert (mask & tgt.detail).any() and dist[mask].max() < 0.15 * 128
    assert kinds.count(kind) >= 6


def test_seed_namespaces_never_share_an_item():
    """The same seed and index in train / validation / benchmark give different pairs; the
    pre-namespace scheme (SeedSequence([seed, index])) at seed 0 is disjoint from all three."""
    import itertools

    from data.synthetic import SEED_NAMESPACES

    def state(words):
        return tuple(np.random.SeedSequence(words).spawn(2)[0].generate_state(4))

    for seed, index in itertools.product([0, 1, 2, 3], [0, 1, 5]):
        states = {ns: tuple(item_generators(seed, index, ns)[0].integers(0, 2**62, 4))
                  for ns in SEED_NAMESPACES}
        assert len(set(states.values())) == len(SEED_NAMESPACES), (seed, index)
    legacy = {state([0, i]) for i in range(64)}
    namespaced = {state([SEED_NAMESPACES[ns], s, i]) for ns in SEED_NAMESPACES
                  for s in range(4) for i in range(64)}
    assert not legacy & namespaced
    a = SyntheticPairs(length=2, seed=0)[1]["target"]
    b = SyntheticPairs(length=2, seed=0, namespace="validation")[1]["target"]
    assert not torch.equal(a, b)
    with pytest.raises(ValueError):
        item_generators(2**32, 0)


# Pixels of seeds whose objects carry lettering, rendered at 128 px with the fonts of the
# pinned matplotlib (requirements.txt): a machine whose fonts differ renders other pixels.
LETTERING_SHA256 = {0: "f95c44aefd091c97", 1: "9acaf1cde7c18388", 4: "82dbcb37231d76b1"}


def test_lettering_uses_only_the_pinned_matplotlib_fonts_and_renders_the_same_pixels(
        monkeypatch):
    import hashlib
    from pathlib import Path

    import matplotlib
    from PIL import ImageFont

    from data import objects

    pinned = next(line.split("==")[1].strip() for line in
                  (Path(__file__).resolve().parents[1] / "requirements.txt").read_text().split()
                  if line.startswith("matplotlib=="))
    assert matplotlib.__version__ == pinned
    opened: list[str] = []
    truetype = ImageFont.truetype
    monkeypatch.setattr(ImageFont, "truetype",
                        lambda path, *a, **k: opened.append(str(path)) or truetype(path, *a, **k))
    objects.load_font.cache_clear()
    rendered = {}
    for seed in LETTERING_SHA256:
        view = render_object(128, np.random.default_rng(seed))
        assert "text" in [e["kind"] for e in view.meta["elements"]]
        rendered[seed] = hashlib.sha256(view.rgb.tobytes()).hexdigest()[:16]
    objects.load_font.cache_clear()  # later tests must not keep fonts opened by the spy
    data_dir = Path(matplotlib.get_data_path()).resolve()
    assert opened and all(Path(p).resolve().is_relative_to(data_dir) for p in opened), opened
    assert rendered == LETTERING_SHA256


GOLDEN = Path(__file__).parent / "fixtures" / "synthetic_item_digests.json"
# sizes (image, reference) and forced mode of the recorded items: the tiny model's 64 / 224
# (target supersampled to 128), a small reference, and target = reference resolution
GOLDEN_SETS = {"64_224": (64, 224, None), "32_56": (32, 56, REFINEMENT),
               "96_112": (96, 112, ALIGNMENT)}


def item_digests(image_size: int, reference_size: int, mode: int | None, count: int
                 ) -> list[dict[str, str]]:
    """SHA-1 of every array of items 0..count-1 (seed 5): the pair and the float sample."""

    def digest(*values) -> str:
        h = hashlib.sha1()
        for v in values:
            v = v.numpy() if isinstance(v, torch.Tensor) else v
            if isinstance(v, np.ndarray):
                h.update(f"{v.dtype}{v.shape}".encode() + np.ascontiguousarray(v).tobytes())
            else:
                h.update(json.dumps(v, sort_keys=True, default=str).encode())
        return h.hexdigest()[:16]

    ds = SyntheticPairs(length=count, seed=5, image_size=image_size,
                        reference_size=reference_size, force_mode=mode)
    out = []
    for i in range(count):
        p, s = ds.pair(i), ds[i]
        out.append({
            "reference": digest(p.reference.rgb, p.reference.footprint, p.reference.detail,
                                p.reference.meta),
            "target": digest(p.target.rgb, p.target.geometric_rgb, p.target.footprint,
                             p.target.detail, p.target.photometric),
            "warp": digest(p.warp.target_to_reference, p.warp.homography),
            "mask": digest(p.mask, p.mask_kind, p.reference_region),
            "sample": digest(*(s[k] for k in sorted(s))),
        })
    return out


@pytest.mark.parametrize("name", sorted(GOLDEN_SETS))
def test_items_are_bit_identical_to_the_recorded_generator(name):
    """The generator's output is pinned: items recorded from the per-pixel float reference
    implementation (before the speed work) must come out bit for bit. A deliberate change of
    the generator rewrites the fixture: python -m tests.test_data_generator --write."""
    recorded = json.loads(GOLDEN.read_text())[name]
    got = item_digests(*GOLDEN_SETS[name], len(recorded))
    for i, (want, have) in enumerate(zip(recorded, got, strict=True)):
        assert have == want, (name, i, [k for k in want if want[k] != have[k]])


if __name__ == "__main__" and sys.argv[1:] == ["--write"]:
    GOLDEN.write_text(json.dumps({name: item_digests(*spec, 12 if name == "64_224" else 6)
                                  for name, spec in GOLDEN_SETS.items()}, indent=1) + "\n")
