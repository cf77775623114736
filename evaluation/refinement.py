"""Refinement comparison: the same cases through every method, scored with the same metrics.

Methods (each a name in ``cfg.methods``, defaults in ``configs/refinement/default.yaml``):

- ``input``: the image unchanged;
- ``telea``: OpenCV TELEA inpainting of the (dilated) mask, no reference;
- ``whole_reference``: our model given the whole reference (Paint-by-Example style);
- ``aligned_crop``: Refine-by-Align, the crop the alignment stage found;
- ``oracle_crop``: our model given the ground-truth crop (training's square crop around
  ``reference_mask`` with the alignment stage's margin, ``cfg.alignment.margin``); cases
  without ``reference_mask`` are not scored for it (counted);
- ``copy_from_reference``: the feature-matching homography warp of the reference pasted into
  the mask; where matching fails the input is kept (counted).

Images of any size go through the model at its own resolution (the whole image, or with
``padding_mask_crop`` a padded crop around the mask) and the generated content is resized and
blended at the image's resolution, so pixels outside the (dilated) mask are the input's bit
for bit, for every method.

Failures are loud: an exception in a method or a metric is re-raised as
:class:`RefinementError` naming the method and case(s); only feature matching's own failure
to find a homography falls back (to the input, counted).
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from data.benchmark import BenchmarkCase
from evaluation import metrics as M
from models.alignment import Alignment, crop, reference_crop_box
from models.image_processor import ImageProcessor, reference_tensor
from models.pipeline import (
    ALIGNMENT_KEYS,
    AlignmentConfig,
    RefineByAlignPipeline,
    RefinementConfig,
)
from models.refinement import blend_weights

log = logging.getLogger(__name__)


class RefinementError(RuntimeError):
    """A method or metric failed on named case(s); the cause is chained."""


def _failed(what: str, ids: Sequence[str], err: Exception) -> RefinementError:
    listed = ", ".join(ids[:10]) + (" ..." if len(ids) > 10 else "")
    return RefinementError(f"{what} failed on case(s) {listed}: {err.__class__.__name__}: {err}")


DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "refinement" / "default.yaml"
METHODS = ("input", "telea", "whole_reference", "aligned_crop", "oracle_crop",
           "copy_from_reference")
MODEL_METHODS = ("whole_reference", "aligned_crop", "oracle_crop")


def default_config() -> DictConfig:
    """The shipped defaults of ``evaluate_refinement``'s ``cfg``."""
    return OmegaConf.load(DEFAULT_CONFIG)


def dilated_mask(mask: np.ndarray, dilate: int = 0) -> np.ndarray:
    """The region a method may change: the mask grown by ``dilate`` px (as in blending)."""
    msk = torch.from_numpy(mask.astype(np.float32))[None, None]
    return blend_weights(msk, dilate, 0)[0, 0].numpy() > 0


# ----------------------------------------------------------------------------- methods
def oracle_crop(reference: np.ndarray, reference_mask: np.ndarray, margin: float
                ) -> torch.Tensor:
    """The ground-truth crop: training's square crop around ``reference_mask``, as [3,h,w]."""
    region = torch.from_numpy(np.array(reference_mask, dtype=bool))
    return crop(reference_tensor(reference), reference_crop_box(region, margin))


def telea(image: np.ndarray, mask: np.ndarray, radius: int = 3, dilate: int = 0) -> np.ndarray:
    """Classical inpainting without a reference (OpenCV TELEA) of the dilated mask."""
    region = dilated_mask(mask, dilate)
    painted = cv2.inpaint(np.ascontiguousarray(image), region.astype(np.uint8) * 255,
                          radius, cv2.INPAINT_TELEA)
    return np.where(region[..., None], painted, image)


def copy_from_reference(image: np.ndarray, mask: np.ndarray, reference: np.ndarray,
                        dilate: int = 0, feather: int = 0) -> tuple[np.ndarray, bool]:
    """Homography-warp the reference into the mask; (output, True) if matching failed."""
    from evaluation.baselines import warp_reference_into_image

    try:
        warped, info = warp_reference_into_image(image, mask, reference)
    except cv2.error as err:  # OpenCV rejecting a degenerate match: counted as a fallback
        log.warning("copy_from_reference failed: %s", err)
        warped, info = None, {"error": str(err)}
    if warped is None:
        log.debug("copy_from_reference fell back to the input: %s", info)
        return image.copy(), True
    return ImageProcessor().apply_overlay(mask, image, warped, None, dilate, feather), False


# ----------------------------------------------------------------------------- evaluation
def _alignment_config(cfg: DictConfig) -> AlignmentConfig:
    section = cfg.get("alignment") or {}
    return AlignmentConfig(**{k: section[k] for k in ALIGNMENT_KEYS if k in section})


def refinement_config(cfg: DictConfig) -> RefinementConfig:
    """The model methods' sampling and pasting settings from ``cfg`` (defaults filled in)."""
    crop = cfg.get("padding_mask_crop")
    return RefinementConfig(cfg.sampler, int(cfg.num_steps), float(cfg.guidance_scale),
                            int(cfg.dilate), int(cfg.feather),
                            None if crop is None else int(crop))


def _batches(items: Sequence[Any], size: int) -> list[Sequence[Any]]:
    return [items[i:i + size] for i in range(0, len(items), max(1, size))]


def run_methods(
    cases: Sequence[BenchmarkCase],
    pipe: RefineByAlignPipeline,
    alignments: Mapping[str, Alignment] | None,
    cfg: DictConfig,
    progress: bool = True,
) -> tuple[dict[str, dict[str, np.ndarray]], dict[str, int]]:
    """Every method's output per case: ({method: {case_id: uint8}}, counts)."""
    methods = list(cfg.methods)
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        raise ValueError(f"unknown methods {unknown}; choose from {list(METHODS)}")
    alignment, refinement = _alignment_config(cfg), refinement_config(cfg)
    outputs: dict[str, dict[str, np.ndarray]] = {m: {} for m in methods}
    counts: dict[str, int] = defaultdict(int)
    alignments = dict(alignments or {})

    if "aligned_crop" in methods:
        missing = [c for c in cases if c.id not in alignments]
        for case in tqdm(missing, desc="align (missing)", disable=not (missing and progress),
                         leave=False):
            alignments[case.id] = pipe.align(case.image, case.mask, case.reference,
                                             int(cfg.seed), alignment)
        counts["aligned_on_the_fly"] = len(missing)

    for case in tqdm(cases, desc="classical methods", leave=False, disable=not progress):
        method = "input"
        try:
            if "input" in methods:
                outputs["input"][case.id] = case.image.copy()
            method = "telea"
            if "telea" in methods:
                outputs["telea"][case.id] = telea(case.image, case.mask, int(cfg.telea_radius),
                                                  int(cfg.dilate))
            method = "copy_from_reference"
            if "copy_from_reference" in methods:
                out, fell_back = copy_from_reference(case.image, case.mask, case.reference,
                                                     int(cfg.dilate), int(cfg.feather))
                outputs["copy_from_reference"][case.id] = out
                counts["copy_from_reference_fallback"] += int(fell_back)
        except Exception as err:
            raise _failed(f"method {method}", [case.id], err) from err

    def reference_for(method: str, case: BenchmarkCase) -> torch.Tensor | None:
        if method == "whole_reference":
            return reference_tensor(case.reference)
        if method == "aligned_crop":
            return alignments[case.id].crop.detach().float().cpu()
        if case.reference_mask is None:
            return None
        return oracle_crop(case.reference, case.reference_mask,
                           float(cfg.alignment.margin))

    model_methods = [m for m in methods if m in MODEL_METHODS]
    batches = _batches(list(cases), int(cfg.batch_size))
    bar = tqdm(total=len(model_methods) * len(cases), desc="refine", unit="case",
               disable=not progress)
    for method in model_methods:
        bar.set_postfix(method=method)
        for index, batch in enumerate(batches):
            refs = [(c, reference_for(method, c)) for c in batch]
            todo = [(c, r) for c, r in refs if r is not None]
            if method == "oracle_crop":
                counts["oracle_crop_skipped_no_reference_mask"] += len(refs) - len(todo)
            if todo:
                # the same seed per batch index: every model method sees the same noise
                # (unless oracle_crop dropped a case of the batch for want of a GT region)
                try:
                    results = pipe([c.image for c, _ in todo], [c.mask for c, _ in todo],
                                   [r for _, r in todo], refinement, align=False,
                                   seed=int(cfg.seed) + index).images
                except Exception as err:
                    raise _failed(f"method {method}", [c.id for c, _ in todo], err) from err
                for (case, _), out in zip(todo, results, strict=True):
                    outputs[method][case.id] = out
            bar.update(len(batch))
    bar.close()
    return outputs, dict(counts)


def score_outputs(
    cases: Sequence[BenchmarkCase],
    outputs: Mapping[str, np.ndarray],
    cfg: DictConfig,
    device: str = "cpu",
) -> dict[str, dict[str, M.Value]]:
    """Per-case metrics of one method: {case_id: {metric: value}} (FID is per set, not here)."""
    mcfg = cfg.metrics
    scored = [c for c in cases if c.id in outputs]
    per_case: dict[str, dict[str, M.Value]] = {c.id: {} for c in scored}
    for case in scored:
        if case.target is not None:
            try:
                per_case[case.id].update(M.ground_truth_metrics(outputs[case.id], case.target,
                                                                case.mask))
            except Exception as err:
                raise _failed("ground-truth metrics", [case.id], err) from err
    scorers = {
        "clip": M.load_clip_scorer(str(mcfg.clip.model), mcfg.clip.pretrained, device),
        "dino": M.load_dino_scorer(mcfg.dino.path, device),
    }
    for name, scorer in scorers.items():
        values = M.identity_scores(
            scorer, [outputs[c.id] for c in scored], [c.mask for c in scored],
            [c.reference for c in scored], [c.reference_mask for c in scored],
            int(mcfg.batch_size))
        for case, value in zip(scored, values, strict=True):
            per_case[case.id][name] = value
    return per_case


def aggregate(per_case: Mapping[str, Mapping[str, M.Value]], ids: Sequence[str]
              ) -> dict[str, M.Value]:
    """Mean of each metric over the cases ``ids`` that have it."""
    rows = [per_case[i] for i in ids if i in per_case]
    names = sorted({k for row in rows for k in row})
    result = {}
    for name in names:
        value = M.mean_value([row.get(name) for row in rows])
        if value is not None:
            result[name] = value
    return result


def evaluate_refinement(
    cases: Sequence[BenchmarkCase],
    pipe: RefineByAlignPipeline,
    alignments: Mapping[str, Alignment] | None,
    cfg: DictConfig | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Run every method of ``cfg.methods`` on ``cases`` and score them.

    ``alignments`` maps case id -> the alignment stage's answer (calibrated t*, l*); cases
    missing from it are aligned here with ``cfg.alignment`` (counted as aligned_on_the_fly).
    Returns ``{"methods": {method: {metric: value}}, "by_category": {category: {method:
    {metric: value}}}, "per_case": {method: {case_id: {metric: value}}}, "counts": {...},
    "outputs": {case_id: {method: uint8 HxWx3}}}``; per-case scores let two exports be
    compared case by case (paired) on the same benchmark.
    Everything but "outputs" is JSON-able (PSNR can be inf, written as Infinity by json);
    "outputs" holds the images for qualitative figures and must be popped before dumping.
    A metric whose network weights are missing has the value ``"not available (no weights)"``;
    weights that are present but fail to load raise :class:`evaluation.metrics.MetricLoadError`,
    and a method or metric failing on a case raises :class:`RefinementError` naming it.
    """
    cfg = OmegaConf.merge(default_config(), cfg or {})
    outputs, counts = run_methods(cases, pipe, alignments, cfg, progress)
    categories: dict[str, list[str]] = defaultdict(list)
    for case in cases:
        categories[case.category].append(case.id)

    device = str(pipe.device)
    fid = M.load_fid(cfg.metrics.fid.feature_extractor_weights_path,
                     int(cfg.metrics.fid.feature), device)
    by_id = {c.id: c for c in cases}
    methods: dict[str, dict[str, M.Value]] = {}
    by_category: dict[str, dict[str, dict[str, M.Value]]] = {cat: {} for cat in categories}
    scored: dict[str, int] = {}
    scores_by_method: dict[str, dict[str, dict[str, M.Value]]] = {}
    for method in tqdm(list(cfg.methods), desc="metrics", leave=False, disable=not progress):
        out = outputs[method]
        per_case = scores_by_method[method] = score_outputs(cases, out, cfg, device)
        scored[method] = len(per_case)

        def fid_of(ids: Sequence[str], out: Mapping[str, np.ndarray] = out) -> M.Value:
            pairs = [(out[i], by_id[i].target) for i in ids
                     if i in out and by_id[i].target is not None]
            return M.fid_score(fid, [o for o, _ in pairs], [t for _, t in pairs])

        methods[method] = {**aggregate(per_case, list(by_id)), "fid": fid_of(list(by_id))}
        for cat, ids in categories.items():
            by_category[cat][method] = {**aggregate(per_case, ids), "fid": fid_of(ids)}

    counts.update({
        "cases": len(cases),
        "with_target": sum(c.target is not None for c in cases),
        "with_reference_mask": sum(c.reference_mask is not None for c in cases),
        "by_category": {cat: len(ids) for cat, ids in categories.items()},
        "scored": scored,
    })
    per_image = {c.id: {m: outputs[m][c.id] for m in cfg.methods if c.id in outputs[m]}
                 for c in cases}
    return {"methods": methods, "by_category": by_category, "per_case": scores_by_method,
            "counts": counts, "outputs": per_image}
