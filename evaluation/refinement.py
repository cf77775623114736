"""Refinement comparison: the same cases through every method, scored with the same metrics.

Methods (each a name in ``cfg.methods``, defaults in ``configs/refinement/default.yaml``):

- ``input``: the image unchanged;
- ``telea``: OpenCV TELEA inpainting of the (dilated) mask, no reference;
- ``ours_whole_reference``: our model given the whole reference (Paint-by-Example style;
  ``whole_reference`` before report schema 3, renamed apart from the correspondence
  baseline of that name);
- ``aligned_crop``: Refine-by-Align, the crop the alignment stage found;
- ``oracle_crop``: our model given the ground-truth crop (training's square crop around
  ``reference_mask`` with the alignment stage's margin, ``cfg.alignment.margin``); cases
  without ``reference_mask`` are not scored for it (counted);
- ``copy_from_reference``: the feature-matching homography warp of the reference pasted into
  the mask; where matching fails the input is kept (counted);
- ``paint_by_example_oracle_crop`` / ``paint_by_example_aligned_crop``: diffusers'
  Paint-by-Example given the ground-truth crop / our aligned crop, when eval.py's
  ``baselines.paint_by_example.model`` is set (evaluation/paint_by_example.py).

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
from evaluation import paint_by_example as pbe
from evaluation.cache import CaseRecord, RunCache, stage
from models.alignment import Alignment, case_noise_seed, crop, reference_crop_box
from models.image_metrics import ground_truth_metrics
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
METHODS = ("input", "telea", "ours_whole_reference", "aligned_crop", "oracle_crop",
           "copy_from_reference")
MODEL_METHODS = ("ours_whole_reference", "aligned_crop", "oracle_crop")


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
    crop, stop = cfg.get("padding_mask_crop"), cfg.get("final_x0_timestep")
    return RefinementConfig(
        sampler=cfg.sampler, num_steps=int(cfg.num_steps), guidance_scale=float(cfg.guidance_scale),
        dilate=int(cfg.dilate), feather=int(cfg.feather),
        padding_mask_crop=None if crop is None else int(crop),
        final_x0_timestep=None if stop is None else int(stop))


def _batches(items: Sequence[Any], size: int) -> list[Sequence[Any]]:
    return [items[i:i + size] for i in range(0, len(items), max(1, size))]


def check_methods(methods: Sequence[str]) -> None:
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        raise ValueError(f"unknown methods {unknown}; choose from {list(METHODS)}")


def reference_for(method: str, case: BenchmarkCase, alignments: Mapping[str, Alignment],
                  margin: float) -> torch.Tensor | None:
    """What a model method conditions on; None when the case has none (oracle_crop without a
    reference_mask)."""
    if method == "ours_whole_reference":
        return reference_tensor(case.reference)
    if method == "aligned_crop":
        return alignments[case.id].crop.detach().float().cpu()
    if case.reference_mask is None:
        return None
    return oracle_crop(case.reference, case.reference_mask, margin)


def run_batch(method: str, batch: Sequence[BenchmarkCase], pipe: RefineByAlignPipeline,
              alignments: Mapping[str, Alignment], cfg: DictConfig
              ) -> dict[str, tuple[np.ndarray | None, dict[str, bool]]]:
    """One method on a batch of cases: {case_id: (uint8 output or None, flags)}; flags say
    ``fallback`` (copy_from_reference kept the input) or ``skipped`` (no output).

    Model methods draw each case's noise from its own seed (:func:`case_noise_seed` of
    ``cfg.seed`` and the case id): every model method sees the same noise on a case, and a
    case's output does not depend on its batch or on the order of the run.
    """
    out: dict[str, tuple[np.ndarray | None, dict[str, bool]]] = {}
    if method not in MODEL_METHODS:
        for case in batch:
            try:
                if method == "input":
                    out[case.id] = case.image.copy(), {}
                elif method == "telea":
                    out[case.id] = telea(case.image, case.mask, int(cfg.telea_radius),
                                         int(cfg.dilate)), {}
                else:
                    image, fell_back = copy_from_reference(case.image, case.mask,
                                                           case.reference, int(cfg.dilate),
                                                           int(cfg.feather))
                    out[case.id] = image, {"fallback": fell_back}
            except Exception as err:
                raise _failed(f"method {method}", [case.id], err) from err
        return out
    refs = [(c, reference_for(method, c, alignments, float(cfg.alignment.margin)))
            for c in batch]
    todo = [(c, r) for c, r in refs if r is not None]
    results: list[np.ndarray] = []
    if todo:
        try:
            results = pipe([c.image for c, _ in todo], [c.mask for c, _ in todo],
                           [r for _, r in todo], refinement_config(cfg), align=False,
                           seed=[case_noise_seed(int(cfg.seed), c.id) for c, _ in todo]).images
        except Exception as err:
            raise _failed(f"method {method}", [c.id for c, _ in todo], err) from err
    done = {c.id: image for (c, _), image in zip(todo, results, strict=True)}
    for case, _ in refs:
        out[case.id] = (done[case.id], {}) if case.id in done else (None, {"skipped": True})
    return out


def score_outputs(
    cases: Sequence[BenchmarkCase],
    outputs: Mapping[str, np.ndarray],
    cfg: DictConfig,
    device: str = "cpu",
    loaded: Mapping[str, Any] | None = None,
) -> dict[str, dict[str, M.Value]]:
    """Per-case metrics of one method: {case_id: {metric: value}} (FID is per set, not here).

    ``loaded``: :func:`evaluation.metrics.load_metrics` of ``cfg.metrics`` (loaded here when
    None); a metric switched off there has no entry.
    """
    if loaded is None:
        loaded = M.load_metrics(cfg.metrics, device)
    scored = [c for c in cases if c.id in outputs]
    per_case: dict[str, dict[str, M.Value]] = {c.id: {} for c in scored}
    for case in scored:
        if case.target is not None:
            try:
                per_case[case.id].update(ground_truth_metrics(outputs[case.id], case.target,
                                                              case.mask))
            except Exception as err:
                raise _failed("ground-truth metrics", [case.id], err) from err
    for name in ("clip", "dino"):
        if name not in loaded:
            continue
        try:
            values = M.identity_scores(
                loaded[name], [outputs[c.id] for c in scored], [c.mask for c in scored],
                [c.reference for c in scored], [c.reference_mask for c in scored],
                int(cfg.metrics.batch_size))
        except Exception as err:
            raise _failed(f"{name} score", [c.id for c in scored], err) from err
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
    cache: RunCache | None = None,
    external: Mapping[str, Mapping[str, np.ndarray]] | None = None,
    paint_by_example: DictConfig | None = None,
) -> dict[str, Any]:
    """Run every method of ``cfg.methods`` on ``cases`` and score them, and score the
    ``external`` methods' outputs ({name: {case_id: uint8 image}}, see evaluation/external.py)
    the same way, in the same tables.

    ``alignments`` maps case id -> the alignment stage's answer (calibrated t*, l*); cases
    missing from it are aligned here with ``cfg.alignment`` (counted as aligned_on_the_fly).
    Each batch of each method is run and scored in turn; with a ``cache``
    (:mod:`evaluation.cache`) its outputs and scores are kept as it finishes (stage
    ``refinement/<method>``) and a resumed run reuses them.
    With ``paint_by_example.model`` set (eval.py's ``baselines.paint_by_example``) the
    Paint-by-Example rows run after ours, batched and cached the same way.
    Returns ``{"methods": {method: {metric: value}}, "by_category": {category: {method:
    {metric: value}}}, "per_case": {method: {case_id: {metric: value}}}, "counts": {...},
    "baseline_methods": [Paint-by-Example rows run], "outputs": {case_id: {method: uint8
    HxWx3}}}``; per-case scores let two exports be compared case by case (paired) on the same
    benchmark.
    Everything but "outputs" is JSON-able (PSNR can be inf, written as Infinity by json);
    "outputs" holds the images for qualitative figures and must be popped before dumping.
    The pretrained metrics load first (before any sampling); one whose weights cannot be had
    (offline and not cached, or the download failed) has a note for value, e.g. ``"not
    available (offline, not cached)"`` (a resumed run rescores cached outputs that have such a
    note once the weights load); weights that are present but fail to load raise
    :class:`evaluation.metrics.MetricLoadError`, and a method or metric failing on a case
    raises :class:`RefinementError` naming it.
    """
    cfg = OmegaConf.merge(default_config(), cfg or {})
    check_methods(list(cfg.methods))
    device = str(pipe.device)
    loaded = M.load_metrics(cfg.metrics, device)
    baseline_methods = (pbe.method_names(paint_by_example) if pbe.enabled(paint_by_example)
                        else [])
    methods = [*cfg.methods, *baseline_methods]
    pbe_pipe = (pbe.load_pipeline(str(paint_by_example.model), device,
                                  paint_by_example.get("dtype", "auto"))
                if baseline_methods else None)
    counts: dict[str, Any] = defaultdict(int)
    alignments = dict(alignments or {})
    if "aligned_crop" in methods or pbe.PREFIX + "aligned_crop" in methods:
        missing = [c for c in cases if c.id not in alignments]
        for case in tqdm(missing, desc="align (missing)", disable=not (missing and progress),
                         leave=False):
            alignments[case.id] = pipe.align(case.image, case.mask, case.reference,
                                             int(cfg.seed), _alignment_config(cfg))
        counts["aligned_on_the_fly"] = len(missing)

    outputs: dict[str, dict[str, np.ndarray]] = {m: {} for m in methods}
    per_case: dict[str, dict[str, dict[str, M.Value]]] = {m: {} for m in methods}
    batches = _batches(list(cases), int(cfg.batch_size))
    bar = tqdm(total=len(methods) * len(cases), desc="refine", unit="case",
               disable=not progress)
    for method in methods:
        bar.set_postfix(method=method)
        store = stage(cache, pbe.stage_name(method, paint_by_example)
                      if method in baseline_methods else f"refinement/{method}")
        for index, batch in enumerate(batches):
            ids = [c.id for c in batch]
            found = store.get(ids) if store is not None else None
            if found is not None and _notes_now_loadable(found, loaded):
                found = _rescored(found, batch, cfg, device, loaded)
                store.put(f"batch{index:05d}", dict(zip(ids, found, strict=True)),
                          compress=True)
            if found is None:
                if method in baseline_methods:
                    try:
                        produced = pbe.run_batch(pbe_pipe, method, batch, alignments, cfg,
                                                 paint_by_example, reference_for)
                    except RuntimeError as err:
                        raise RefinementError(str(err)) from err
                else:
                    produced = run_batch(method, batch, pipe, alignments, cfg)
                images = {i: image for i, (image, _) in produced.items() if image is not None}
                scores = score_outputs(batch, images, cfg, device, loaded)
                found = [CaseRecord({"metrics": scores.get(i), "flags": produced[i][1]},
                                    {"output": images[i]} if i in images else {}) for i in ids]
                if store is not None:
                    store.put(f"batch{index:05d}", dict(zip(ids, found, strict=True)),
                              compress=True)
            for case_id, record in zip(ids, found, strict=True):
                if "output" in record.arrays:
                    outputs[method][case_id] = record.arrays["output"]
                    per_case[method][case_id] = record.values["metrics"]
                flags = record.values["flags"]
                if method == "copy_from_reference":
                    counts["copy_from_reference_fallback"] += int(flags.get("fallback", False))
                if method in ("oracle_crop", pbe.PREFIX + "oracle_crop"):
                    counts[f"{method}_skipped_no_reference_mask"] += int(
                        flags.get("skipped", False))
            bar.update(len(batch))
    bar.close()
    for name, images in (external or {}).items():
        outputs[name] = dict(images)
        per_case[name] = {}
        for batch in batches:
            per_case[name] |= score_outputs(batch, images, cfg, device, loaded)
    result = summarise(cases, per_case, outputs, cfg, device, dict(counts), progress, loaded)
    return {**result, "baseline_methods": baseline_methods}


def _notes_now_loadable(records: Sequence[CaseRecord], loaded: Mapping[str, Any]) -> bool:
    """Cached scores hold a note (e.g. offline, not cached) for a metric that loads now."""
    return any(isinstance(value, str) and name in loaded and not isinstance(loaded[name], str)
               for r in records for name, value in (r.values.get("metrics") or {}).items())


def _rescored(records: Sequence[CaseRecord], batch: Sequence[BenchmarkCase], cfg: DictConfig,
              device: str, loaded: Mapping[str, Any]) -> list[CaseRecord]:
    """The cached outputs of ``batch`` scored again (their images are kept)."""
    images = {c.id: r.arrays["output"] for c, r in zip(batch, records, strict=True)
              if "output" in r.arrays}
    scores = score_outputs(batch, images, cfg, device, loaded)
    return [CaseRecord({**r.values, "metrics": scores.get(c.id)}, r.arrays)
            for c, r in zip(batch, records, strict=True)]


def summarise(cases: Sequence[BenchmarkCase],
              per_case: Mapping[str, Mapping[str, Mapping[str, M.Value]]],
              outputs: Mapping[str, Mapping[str, np.ndarray]], cfg: DictConfig, device: str,
              counts: dict[str, Any], progress: bool = True,
              loaded: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Means per method and per category (FID over each set of outputs, when it is on), and
    the counts; ``loaded`` as for :func:`score_outputs`."""
    categories: dict[str, list[str]] = defaultdict(list)
    for case in cases:
        categories[case.category].append(case.id)
    if loaded is None:
        loaded = M.load_metrics(cfg.metrics, device)
    by_id = {c.id: c for c in cases}
    methods: dict[str, dict[str, M.Value]] = {}
    by_category: dict[str, dict[str, dict[str, M.Value]]] = {cat: {} for cat in categories}
    for method in tqdm(list(per_case), desc="metrics", leave=False, disable=not progress):
        out = outputs[method]

        def with_fid(values: dict[str, M.Value], ids: Sequence[str],
                     out: Mapping[str, np.ndarray] = out) -> dict[str, M.Value]:
            if "fid" not in loaded:
                return values
            pairs = [(out[i], by_id[i].target) for i in ids
                     if i in out and by_id[i].target is not None]
            return {**values, "fid": M.fid_score(loaded["fid"], [o for o, _ in pairs],
                                                 [t for _, t in pairs])}

        methods[method] = with_fid(aggregate(per_case[method], list(by_id)), list(by_id))
        for cat, ids in categories.items():
            by_category[cat][method] = with_fid(aggregate(per_case[method], ids), ids)

    counts.update({
        "cases": len(cases),
        "with_target": sum(c.target is not None for c in cases),
        "with_reference_mask": sum(c.reference_mask is not None for c in cases),
        "by_category": {cat: len(ids) for cat, ids in categories.items()},
        "scored": {m: len(v) for m, v in per_case.items()},
        "scored_by_category": {cat: {m: sum(i in v for i in ids) for m, v in per_case.items()}
                               for cat, ids in categories.items()},
    })
    per_image = {c.id: {m: outputs[m][c.id] for m in per_case if c.id in outputs[m]}
                 for c in cases}
    return {"methods": methods, "by_category": by_category,
            "per_case": {m: dict(v) for m, v in per_case.items()}, "counts": counts,
            "outputs": per_image}
