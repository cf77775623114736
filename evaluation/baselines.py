"""Correspondence baselines: where on the reference is the artifact, without our attention maps?

- ``whole_reference``: the entire reference (what a method without alignment conditions on).
- ``same_position_box``: the artifact mask's box at the same relative position on the reference.
- ``feature_matching``: classical matching. SIFT (ORB if SIFT is unavailable) keypoints of the
  image *outside* the artifact mask against the reference, Lowe's ratio test, a RANSAC
  homography reference -> image, and the artifact mask mapped back onto the reference. A case
  whose matching fails (too few matches or inliers, degenerate homography, empty region) falls
  back to the whole reference and is counted as a failure.

:func:`warp_reference_into_image` exposes the same homography for the refinement evaluation
(a "warp the reference into place" baseline).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

import cv2
import numpy as np
import torch
from tqdm.auto import tqdm

from data.benchmark import BenchmarkCase
from models.correspondence import (
    baseline_scores,
    boxes_to_masks,
    mask_boxes,
    mask_iou,
    mask_iou_box_target,
)

log = logging.getLogger(__name__)

BASELINES = ("whole_reference", "same_position_box", "feature_matching")


@dataclass
class MatchConfig:
    """Feature matching settings; mirrors the ``baselines`` node of configs/eval.yaml."""

    detector: str = "sift"  # sift | orb (sift falls back to orb if OpenCV lacks it)
    ratio: float = 0.75  # Lowe's ratio test
    min_matches: int = 8  # good matches needed before RANSAC
    min_inliers: int = 6
    ransac_threshold: float = 1.0  # reprojection error in image pixels (tight: small images)
    min_detect_side: int = 256  # small images are upsampled so the detector finds keypoints
    mask_dilate: int = 2  # keep keypoints this many pixels away from the artifact


def match_config(section: Mapping[str, Any]) -> MatchConfig:
    """The feature-matching fields of the ``baselines`` node (it also holds other baselines'
    sections, e.g. ``paint_by_example``)."""
    names = {f.name for f in fields(MatchConfig)}
    return MatchConfig(**{k: v for k, v in section.items() if k in names})


def _detector(name: str) -> tuple[Any, int, str]:
    """(detector, matcher norm, name actually used)."""
    if name == "sift" and hasattr(cv2, "SIFT_create"):
        return cv2.SIFT_create(), cv2.NORM_L2, "sift"
    if name == "sift":
        log.warning("OpenCV has no SIFT; using ORB")
    return cv2.ORB_create(nfeatures=2000), cv2.NORM_HAMMING, "orb"


def _gray(image: np.ndarray, scale: float) -> np.ndarray:
    gray = cv2.cvtColor(np.ascontiguousarray(image), cv2.COLOR_RGB2GRAY)
    if scale != 1.0:
        gray = cv2.resize(gray, None, fx=scale, fy=scale, interpolation=cv2.INTER_CUBIC)
    return gray


def _scale(shape: Sequence[int], min_side: int) -> float:
    return max(1.0, min_side / min(shape[:2]))


def match_homography(
    image: np.ndarray, mask: np.ndarray, reference: np.ndarray, cfg: MatchConfig | None = None
) -> tuple[np.ndarray | None, dict[str, Any]]:
    """Homography mapping reference pixels to image pixels, from keypoints outside ``mask``.

    Returns (3x3 float64 or None, info); info has ``detector``, ``keypoints``, ``matches``,
    ``inliers`` and, on failure, ``reason``.
    """
    cfg = cfg or MatchConfig()
    detector, norm, used = _detector(cfg.detector)
    s_img, s_ref = _scale(image.shape, cfg.min_detect_side), _scale(reference.shape,
                                                                    cfg.min_detect_side)
    gray_img, gray_ref = _gray(image, s_img), _gray(reference, s_ref)
    outside = (~mask.astype(bool)).astype(np.uint8) * 255
    if cfg.mask_dilate > 0:  # erode the outside = dilate the artifact
        kernel = np.ones((2 * cfg.mask_dilate + 1,) * 2, np.uint8)
        outside = cv2.erode(outside, kernel)
    outside = cv2.resize(outside, gray_img.shape[::-1], interpolation=cv2.INTER_NEAREST)
    kp_img, des_img = detector.detectAndCompute(gray_img, outside)
    kp_ref, des_ref = detector.detectAndCompute(gray_ref, None)
    info: dict[str, Any] = {"detector": used, "keypoints": [len(kp_img), len(kp_ref)],
                            "matches": 0, "inliers": 0}
    if des_img is None or des_ref is None or len(kp_img) < 2 or len(kp_ref) < 2:
        return None, {**info, "reason": "too few keypoints"}
    pairs = cv2.BFMatcher(norm).knnMatch(des_ref, des_img, k=2)
    good = [p[0] for p in pairs if len(p) == 2 and p[0].distance < cfg.ratio * p[1].distance]
    info["matches"] = len(good)
    if len(good) < max(cfg.min_matches, 4):
        return None, {**info, "reason": f"too few matches ({len(good)} < {cfg.min_matches})"}
    src = np.float32([kp_ref[m.queryIdx].pt for m in good]) / s_ref
    dst = np.float32([kp_img[m.trainIdx].pt for m in good]) / s_img
    homography, inliers = cv2.findHomography(src, dst, cv2.RANSAC, cfg.ransac_threshold)
    n_in = int(inliers.sum()) if inliers is not None else 0
    info["inliers"] = n_in
    if homography is None or n_in < cfg.min_inliers:
        return None, {**info, "reason": f"RANSAC failed ({n_in} inliers)"}
    if np.linalg.det(homography[:2, :2]) <= 1e-6 or not np.isfinite(homography).all():
        return None, {**info, "reason": "degenerate homography"}
    return homography, info


def map_mask_to_reference(mask: np.ndarray, homography: np.ndarray,
                          reference_shape: Sequence[int]) -> np.ndarray:
    """The artifact mask (image frame) on the reference grid, via the inverse of ``homography``."""
    height, width = reference_shape[:2]
    warped = cv2.warpPerspective(mask.astype(np.uint8) * 255, homography, (width, height),
                                 flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP)
    return warped >= 128


def feature_matching_region(
    image: np.ndarray, mask: np.ndarray, reference: np.ndarray, cfg: MatchConfig | None = None
) -> tuple[np.ndarray | None, dict[str, Any]]:
    """The artifact's region on the reference by feature matching, or None when matching fails."""
    homography, info = match_homography(image, mask, reference, cfg)
    if homography is None:
        return None, info
    region = map_mask_to_reference(mask, homography, reference.shape)
    if not region.any():
        return None, {**info, "reason": "mapped region falls outside the reference"}
    return region, info


def warp_reference_into_image(
    image: np.ndarray, mask: np.ndarray, reference: np.ndarray, cfg: MatchConfig | None = None
) -> tuple[np.ndarray | None, dict[str, Any]]:
    """The reference warped into the image frame (uint8 HxWx3), or None when matching fails.

    For the refinement evaluation: paste ``warped`` into ``mask`` as a no-diffusion baseline.
    ``info`` also holds ``homography`` (reference -> image, as a nested list) when it succeeds.
    """
    homography, info = match_homography(image, mask, reference, cfg)
    if homography is None:
        return None, info
    height, width = image.shape[:2]
    warped = cv2.warpPerspective(np.ascontiguousarray(reference), homography, (width, height),
                                 flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
    return warped, {**info, "homography": homography.tolist()}


def _region_scores(region: torch.Tensor, gt: torch.Tensor) -> tuple[float, float]:
    """(mask IoU, box IoU) of one [H, W] region vs ground truth, as the sweep scores maps."""
    size = tuple(gt.shape)
    box = boxes_to_masks(mask_boxes(region[None]), size)
    return (float(mask_iou(region[None], gt[None])[0]),
            float(mask_iou(box, mask_iou_box_target(gt[None]))[0]))


def run_baselines(cases: Sequence[BenchmarkCase], cfg: MatchConfig | None = None,
                  progress: bool = True) -> dict[str, Any]:
    """Score the three baselines on the cases that have a ``reference_mask``.

    Returns ``{"scores": {name: {miou_mask, miou_box}}, "per_case": {id: {name: {mask, box}}},
    "feature_matching": {"failures": n, "attempts": n, "failed": [{id, reason}]}}``.
    """
    cfg = cfg or MatchConfig()
    per_case: dict[str, dict[str, dict[str, float]]] = {}
    failed: list[dict[str, str]] = []
    usable = [c for c in cases if c.reference_mask is not None]
    for case in tqdm(usable, desc="baselines", unit="case", disable=not progress):
        gt = torch.from_numpy(np.array(case.reference_mask, dtype=bool))
        mask = torch.from_numpy(np.array(case.mask, dtype=np.float32))[None, None]
        trivial = baseline_scores(mask, gt[None, None].float())
        row = {name: {k: float(v[0]) for k, v in scores.items()}
               for name, scores in trivial.items()}
        region, info = feature_matching_region(case.image, case.mask, case.reference, cfg)
        if region is None:
            failed.append({"id": case.id, "reason": info.get("reason", "unknown")})
            row["feature_matching"] = dict(row["whole_reference"])
        else:
            m, b = _region_scores(torch.from_numpy(region), gt)
            row["feature_matching"] = {"mask": m, "box": b}
        per_case[case.id] = row
    scores = {
        name: {f"miou_{kind}": float(np.mean([r[name][kind] for r in per_case.values()]))
               if per_case else float("nan") for kind in ("mask", "box")}
        for name in BASELINES
    }
    if failed:
        log.info("feature matching failed on %d/%d cases (whole reference used)", len(failed),
                 len(usable))
    return {"scores": scores, "per_case": per_case,
            "feature_matching": {"attempts": len(usable), "failures": len(failed),
                                 "failed": failed}}
