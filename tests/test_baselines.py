"""Correspondence baselines: homography recovery, the reference warp, failure fallback."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from data.benchmark import BenchmarkCase
from evaluation.baselines import (
    MatchConfig,
    feature_matching_region,
    match_homography,
    run_baselines,
    warp_reference_into_image,
)

# reference px -> image px: shrink, slight rotation/shear and perspective
H_TRUE = np.array([[0.45, 0.05, -10.0], [-0.03, 0.42, 5.0], [2e-4, 1e-4, 1.0]])


@pytest.fixture(scope="module")
def pair() -> dict[str, np.ndarray]:
    """A textured reference, its warp as the image, an artifact mask and its true region."""
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, (224, 224, 3), dtype=np.uint8)
    reference = cv2.normalize(cv2.GaussianBlur(noise, (0, 0), 2.0), None, 0, 255,
                              cv2.NORM_MINMAX)
    image = cv2.warpPerspective(reference, H_TRUE, (96, 96))
    mask = np.zeros((96, 96), bool)
    mask[30:60, 35:70] = True
    gt = cv2.warpPerspective(mask.astype(np.uint8) * 255, H_TRUE, (224, 224),
                             flags=cv2.WARP_INVERSE_MAP) >= 128
    return {"image": image, "mask": mask, "reference": reference, "gt": gt}


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max(1, (a | b).sum()))


def test_feature_matching_recovers_known_homography(pair) -> None:
    homography, info = match_homography(pair["image"], pair["mask"], pair["reference"])
    assert homography is not None, info
    corners = np.array([[0, 0, 1], [223, 0, 1], [0, 223, 1], [223, 223, 1], [112, 112, 1]]).T
    found, true = homography @ corners, H_TRUE @ corners
    assert np.abs(found[:2] / found[2] - true[:2] / true[2]).max() < 1.0  # image pixels
    region, info = feature_matching_region(pair["image"], pair["mask"], pair["reference"])
    assert region is not None and region.shape == (224, 224)
    assert iou(region, pair["gt"]) > 0.8


def test_orb_fallback_detector_also_runs(pair) -> None:
    region, info = feature_matching_region(pair["image"], pair["mask"], pair["reference"],
                                           MatchConfig(detector="orb"))
    assert info["detector"] == "orb"
    assert region is not None and region.shape == (224, 224), info
    assert iou(region, pair["gt"]) > 0.8


def test_warp_reference_into_image(pair) -> None:
    warped, info = warp_reference_into_image(pair["image"], pair["mask"], pair["reference"])
    assert warped is not None and warped.shape == pair["image"].shape
    assert warped.dtype == np.uint8 and len(info["homography"]) == 3
    inner = (slice(15, 75), slice(15, 75))  # away from the image's uncovered border
    diff = np.abs(warped[inner].astype(int) - pair["image"][inner].astype(int))
    other = np.abs(np.roll(warped, 7, axis=1)[inner].astype(int) - pair["image"][inner])
    assert diff.mean() < 0.5 * other.mean()  # aligned, unlike a shifted copy


def test_failure_falls_back_to_whole_reference_and_is_counted(pair) -> None:
    flat = np.full((64, 64, 3), 128, np.uint8)
    mask = np.zeros((64, 64), bool)
    mask[10:30, 10:30] = True
    warped, info = warp_reference_into_image(flat, mask, pair["reference"])
    assert warped is None and info["reason"]
    good = BenchmarkCase("good", pair["image"], pair["mask"], pair["reference"], pair["gt"])
    bad = BenchmarkCase("bad", flat, mask, pair["reference"], pair["gt"])
    no_gt = BenchmarkCase("nogt", flat, mask, pair["reference"], None)
    result = run_baselines([good, bad, no_gt], progress=False)
    fm = result["feature_matching"]
    assert fm["attempts"] == 2 and fm["failures"] == 1 and fm["failed"][0]["id"] == "bad"
    per = result["per_case"]
    assert set(per) == {"good", "bad"}
    assert per["bad"]["feature_matching"] == per["bad"]["whole_reference"]
    assert per["good"]["feature_matching"]["mask"] > 0.8
    whole = pair["gt"].mean()
    assert per["good"]["whole_reference"]["mask"] == pytest.approx(whole, rel=1e-5)
    for name in ("whole_reference", "same_position_box", "feature_matching"):
        assert set(result["scores"][name]) == {"miou_mask", "miou_box"}
