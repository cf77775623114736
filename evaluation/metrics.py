"""Refinement metrics: ground truth in the mask, reference identity (CLIP / DINO) and FID.

Ground-truth metrics (PSNR, SSIM in the mask's bounding box, L1 and gradient magnitude
similarity inside the mask) need only ``target.png``; their arithmetic lives in
models/image_metrics.py (training diagnostics score with it too). The paper's identity and
realism metrics need pretrained networks; each loads
from a configured local path (nothing is ever fetched: HF_HUB_OFFLINE is forced) and, when the
weights are missing or unloadable, its value is :data:`NOT_AVAILABLE` instead of a number, so
a score from random weights can never be reported under the paper's name. Loaders are cached:
each network loads once per process.

All images are uint8 HxWx3 numpy arrays, masks bool HxW.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from functools import cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

# mask_bbox, to_tensor used here; the ground-truth metrics re-exported (their home is
# models/image_metrics.py, which training diagnostics can import)
from models.image_metrics import gradient_similarity as gradient_similarity
from models.image_metrics import ground_truth_metrics as ground_truth_metrics
from models.image_metrics import mask_bbox, to_tensor
from models.image_metrics import masked_l1 as masked_l1
from models.image_metrics import psnr_in_box as psnr_in_box
from models.image_metrics import ssim_in_box as ssim_in_box

log = logging.getLogger(__name__)


class MetricLoadError(RuntimeError):
    """A metric's weights are configured and present but could not be loaded."""


NOT_AVAILABLE = "not available (no weights)"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
Value = float | str


# ----------------------------------------------------------------------------- identity
def region_crop(image: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    """The image inside the mask's bounding box (the whole image when ``mask`` is None)."""
    if mask is None:
        return image
    rows, cols = mask_bbox(mask)
    return image[rows, cols]


class ClipScorer:
    """open_clip image tower; embeddings are L2-normalised."""

    def __init__(self, model: torch.nn.Module, preprocess, device: torch.device) -> None:
        self.model, self.preprocess, self.device = model, preprocess, device

    @torch.no_grad()
    def embed(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        from PIL import Image

        batch = torch.stack([self.preprocess(Image.fromarray(im)) for im in images])
        return F.normalize(self.model.encode_image(batch.to(self.device)).float(), dim=-1)


class DinoScorer:
    """DINOv2 CLS token (pooled, layer-normed) at 224 px; embeddings are L2-normalised."""

    def __init__(self, model: torch.nn.Module, device: torch.device, size: int = 224) -> None:
        self.model, self.device, self.size = model, device, size
        self.mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)

    @torch.no_grad()
    def embed(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        batch = torch.cat([
            F.interpolate(to_tensor(im), size=(self.size, self.size), mode="bicubic",
                          antialias=True, align_corners=False) for im in images
        ]).clamp(0, 1).to(self.device)
        out = self.model(pixel_values=(batch - self.mean) / self.std)
        return F.normalize(out.pooler_output.float(), dim=-1)


def _offline() -> None:
    os.environ["HF_HUB_OFFLINE"] = "1"


@cache
def load_clip_scorer(model_name: str, pretrained: str | None, device: str = "cpu"
                     ) -> ClipScorer | None:
    """open_clip ``model_name`` with weights from the local file ``pretrained``.

    None when no file is configured or it does not exist; :class:`MetricLoadError` when the
    file exists and loading it fails.
    """
    _offline()
    if not pretrained or not Path(pretrained).is_file():
        log.warning("CLIP score %s: weights file %r not found", NOT_AVAILABLE, pretrained)
        return None
    try:
        import open_clip

        model, _, preprocess = open_clip.create_model_and_transforms(
            model_name, pretrained=str(pretrained), device=device)
    except Exception as err:
        raise MetricLoadError(f"CLIP score: weights {pretrained} are present but loading "
                              f"{model_name} failed: {err.__class__.__name__}: {err}") from err
    return ClipScorer(model.eval(), preprocess, torch.device(device))


def _dinov2_present(path: str) -> bool:
    """A local directory / file at ``path``, or a hub id whose config is in the local cache."""
    if Path(path).exists():
        return True
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(path, "config.json"), str)
    except ValueError:  # not a valid repo id either
        return False


@cache
def load_dino_scorer(path: str | None, device: str = "cpu") -> DinoScorer | None:
    """DINOv2 from a local directory or a hub id already in the local cache.

    None when nothing is configured or found; :class:`MetricLoadError` when it is there and
    loading fails.
    """
    _offline()
    if not path or not _dinov2_present(str(path)):
        log.warning("DINO score %s: no DINOv2 at %r", NOT_AVAILABLE, path)
        return None
    try:
        from transformers import Dinov2Model

        model = Dinov2Model.from_pretrained(str(path), local_files_only=True)
    except Exception as err:
        raise MetricLoadError(f"DINO score: DINOv2 at {path} is present but loading failed: "
                              f"{err.__class__.__name__}: {err}") from err
    return DinoScorer(model.to(device).eval(), torch.device(device))


def identity_scores(
    scorer: ClipScorer | DinoScorer | None,
    outputs: Sequence[np.ndarray],
    masks: Sequence[np.ndarray],
    references: Sequence[np.ndarray],
    reference_masks: Sequence[np.ndarray | None],
    batch_size: int = 32,
) -> list[Value]:
    """Cosine similarity of the refined region crop and the ground-truth reference region crop.

    The reference region is the box of ``reference_mask`` (the whole reference when it is
    None). Without a scorer every value is :data:`NOT_AVAILABLE`.
    """
    if scorer is None:
        return [NOT_AVAILABLE] * len(outputs)
    scores: list[Value] = []
    for start in range(0, len(outputs), batch_size):
        end = start + batch_size
        ours = scorer.embed([region_crop(o, m) for o, m in zip(outputs[start:end],
                                                                masks[start:end], strict=True)])
        refs = scorer.embed([region_crop(r, m) for r, m in zip(references[start:end],
                                                                reference_masks[start:end],
                                                                strict=True)])
        scores.extend(float(s) for s in (ours * refs).sum(-1))
    return scores


# ----------------------------------------------------------------------------- FID
@cache
def load_fid(weights_path: str | None, feature: int = 2048, device: str = "cpu"):
    """torchmetrics FID on the Inception weights at ``weights_path``.

    None when the file is not configured or absent (never built without it: torch-fidelity
    would download the weights); :class:`MetricLoadError` when it is there and building fails.
    """
    if not weights_path or not Path(weights_path).is_file():
        log.warning("FID %s: Inception weights %r not found", NOT_AVAILABLE, weights_path)
        return None
    try:
        from torchmetrics.image.fid import FrechetInceptionDistance

        metric = FrechetInceptionDistance(feature=feature,
                                          feature_extractor_weights_path=str(weights_path))
    except Exception as err:
        raise MetricLoadError(f"FID: Inception weights {weights_path} are present but building "
                              f"the metric failed: {err.__class__.__name__}: {err}") from err
    return metric.to(device)


def fid_score(metric, outputs: Sequence[np.ndarray], targets: Sequence[np.ndarray],
              batch_size: int = 32) -> Value:
    """FID of ``outputs`` vs ``targets`` (whole images); :data:`NOT_AVAILABLE` without weights."""
    if metric is None:
        return NOT_AVAILABLE
    if len(outputs) < 2 or len(targets) < 2:
        return "not available (needs >= 2 images)"
    metric.reset()
    device = metric.device
    for images, real in ((targets, True), (outputs, False)):
        for start in range(0, len(images), batch_size):
            chunk = np.stack(images[start:start + batch_size])
            batch = torch.from_numpy(chunk).permute(0, 3, 1, 2).contiguous().to(device)
            metric.update(batch, real=real)
    return float(metric.compute())


# ----------------------------------------------------------------------------- aggregation
def mean_value(values: Sequence[Value | None]) -> Value | None:
    """Mean of the numbers (None = not applicable, skipped); a string reason wins if present.

    An inf (e.g. PSNR of an untouched identical region) makes the mean inf, as it should.
    """
    present = [v for v in values if v is not None]
    if not present:
        return None
    reasons = [v for v in present if isinstance(v, str)]
    if reasons:
        return reasons[0]
    mean = float(np.mean(present))
    return mean if not math.isnan(mean) else None
