"""Refinement metrics: ground truth in the mask, reference identity (CLIP / DINO) and FID.

Ground-truth metrics (PSNR, SSIM in the mask's bounding box, L1 and gradient magnitude
similarity inside the mask) need only ``target.png``; their arithmetic lives in
models/image_metrics.py (training diagnostics score with it too). The paper's identity and
realism metrics need pretrained networks, loaded by name through their own libraries (CLIP:
open_clip model + tag; DINO: transformers DINOv2 hub id; FID: torchmetrics on
torch-fidelity's Inception), which download into their caches unless offline mode is on
(models/hub.py); a local path overrides the name. Weights that cannot be
had (offline and not cached, or the download failed) give one warning line naming what to
fetch, and the metric's value is a note (:data:`NOT_CACHED`, :data:`DOWNLOAD_FAILED`) instead
of a number, so a score from random weights is never reported under the paper's name. Weights
that are there and fail to load raise :class:`MetricLoadError`. Loaders are cached: each
network loads once per process.

All images are uint8 HxWx3 numpy arrays, masks bool HxW.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping, Sequence
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from models.hub import (
    in_hub_cache,
    is_download_failure,
    is_local,
    looks_like_path,
    not_cached_line,
    offline_reason,
    snapshot_command,
)

# mask_box_slices, to_tensor used here; the ground-truth metrics re-exported (their home is
# models/image_metrics.py, which training diagnostics can import)
from models.image_metrics import gradient_similarity as gradient_similarity
from models.image_metrics import ground_truth_metrics as ground_truth_metrics
from models.image_metrics import mask_box_slices, to_tensor
from models.image_metrics import masked_l1 as masked_l1
from models.image_metrics import psnr_in_box as psnr_in_box
from models.image_metrics import ssim_in_box as ssim_in_box

log = logging.getLogger(__name__)


class MetricLoadError(RuntimeError):
    """A metric's weights are configured and present but could not be loaded."""


NOT_CACHED = "not available (offline, not cached)"
DOWNLOAD_FAILED = "not available (download failed)"
CLIP_HUB_PREFIX, CLIP_DIR_PREFIX = "hf-hub:", "local-dir:"  # open_clip's model-name schemas
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
Value = float | str


# ----------------------------------------------------------------------------- identity
def region_crop(image: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    """The image inside the mask's bounding box (the whole image when ``mask`` is None)."""
    if mask is None:
        return image
    rows, cols = mask_box_slices(mask)
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


# ----------------------------------------------------------------------------- loading
def _note_or_raise(what: str, err: Exception, had_files: bool, fetch: str, override: str
                   ) -> str:
    """A failed load: ``not available (download failed)`` when the weights were not here
    before and the failure is the connection's (one warning line), else :class:`MetricLoadError`.
    """
    if not had_files and is_download_failure(err):
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        log.warning("%s could not be downloaded (%s: %s): run `%s` on a machine with internet, "
                    "or %s; HF_HUB_OFFLINE=1 skips the attempt", what, err.__class__.__name__,
                    first[:200], fetch, override)
        return DOWNLOAD_FAILED
    raise MetricLoadError(f"{what} {'is present but ' if had_files else ''}failed to load: "
                          f"{err.__class__.__name__}: {err}") from err


def _missing_path(what: str, name: str) -> MetricLoadError:
    return MetricLoadError(f"{what}: no such file or folder {name!r} (a local path; a hub id "
                           f"is org/name)")


def _clip_weights_cached(model: str, pretrained: str | None) -> bool:
    """The files open_clip would download for (model, pretrained) are in its caches."""
    from open_clip import get_pretrained_cfg
    from open_clip.constants import HF_CONFIG_NAME, HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME

    weights = (HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME)
    if model.startswith(CLIP_HUB_PREFIX):
        repo = model[len(CLIP_HUB_PREFIX):]
        return in_hub_cache(repo, HF_CONFIG_NAME) and any(in_hub_cache(repo, w) for w in weights)
    tag = get_pretrained_cfg(model.replace("/", "-"), pretrained or "")
    if tag.get("hf_hub"):
        repo, filename = os.path.split(tag["hf_hub"])
        if filename:
            stem, ext = os.path.splitext(filename)
            weights = (stem + ".safetensors", filename) if ext in (".bin", ".pth") else (filename,)
        return any(in_hub_cache(repo, w) for w in weights)
    url = tag.get("url", "")
    return bool(url) and (Path.home() / ".cache" / "clip" / os.path.basename(url)).is_file()


@cache
def load_clip_scorer(model: str, pretrained: str | None, device: str = "cpu"
                     ) -> ClipScorer | str:
    """open_clip ``model`` with ``pretrained`` weights: a tag (e.g. ``openai``, downloaded by
    open_clip into its cache), a local checkpoint file, or None for ``hf-hub:org/repo`` /
    ``local-dir:/path`` models, which carry their own weights.

    Returns the scorer, or the note to report in place of the score (offline and not cached;
    download failed). A file that does not exist, an unknown tag or weights that are present
    and fail to load raise :class:`MetricLoadError`.
    """
    import open_clip

    if model.startswith((CLIP_HUB_PREFIX, CLIP_DIR_PREFIX)):
        pretrained = None  # such a model names its own weights
    what = f"CLIP score: open_clip {model}" + (f"/{pretrained}" if pretrained else "")
    tag: dict[str, Any] = {}
    if model.startswith(CLIP_HUB_PREFIX):
        had_files = _clip_weights_cached(model, None)
    elif model.startswith(CLIP_DIR_PREFIX):
        if not is_local(model[len(CLIP_DIR_PREFIX):]):
            raise _missing_path(what, model[len(CLIP_DIR_PREFIX):])
        had_files = True
    elif pretrained and (tag := open_clip.get_pretrained_cfg(model.replace("/", "-"),
                                                             pretrained)):
        had_files = _clip_weights_cached(model, pretrained)
    elif pretrained and is_local(pretrained):
        had_files = True
    elif pretrained:
        if looks_like_path(pretrained):
            raise _missing_path(what, pretrained)
        raise MetricLoadError(f"{what}: {pretrained!r} is neither a local file nor an open_clip "
                              f"tag of {model} (tags: "
                              f"{open_clip.list_pretrained_tags_by_model(model)})")
    else:
        raise MetricLoadError(f"{what}: no weights (set refinement.metrics.clip.pretrained to "
                              f"a tag or file, or refinement.metrics.clip=null)")
    fetch = ("python -c \"import open_clip; open_clip.create_model_and_transforms("
             f"'{model}', pretrained={pretrained!r})\"")
    override = ("set refinement.metrics.clip.pretrained=/path/to/open_clip_pytorch_model.bin"
                if pretrained else "set refinement.metrics.clip.model=local-dir:/folder "
                "(open_clip_config.json + weights)")
    reason = offline_reason()
    if reason and not had_files:
        log.warning("%s", not_cached_line(what, reason, fetch, override))
        return NOT_CACHED
    try:
        net, _, preprocess = open_clip.create_model_and_transforms(
            model, pretrained=pretrained, device=device,
            force_quick_gelu=bool(tag.get("quick_gelu")))
    except Exception as err:
        return _note_or_raise(what, err, had_files, fetch, override)
    return ClipScorer(net.eval(), preprocess, torch.device(device))


@cache
def load_dino_scorer(model: str, device: str = "cpu") -> DinoScorer | str:
    """DINOv2 from a local folder or a hub id (downloaded by transformers into its cache).

    Returns the scorer or the note to report in its place (offline and not cached; download
    failed); a missing local folder, an unknown hub id or weights that are present and fail
    to load raise :class:`MetricLoadError`.
    """
    what = f"DINO score: DINOv2 {model}"
    if is_local(model):
        had_files = True
    elif looks_like_path(model):
        raise _missing_path(what, model)
    else:
        had_files = in_hub_cache(model, "config.json")
    fetch = snapshot_command(model)
    override = "set refinement.metrics.dino.model=/path/to/dinov2 (config.json + weights)"
    reason = offline_reason()
    if reason and not had_files:
        log.warning("%s", not_cached_line(what, reason, fetch, override))
        return NOT_CACHED
    try:
        from transformers import Dinov2Model

        net = Dinov2Model.from_pretrained(model, local_files_only=reason is not None)
    except Exception as err:
        return _note_or_raise(what, err, had_files, fetch, override)
    return DinoScorer(net.to(device).eval(), torch.device(device))


def default_inception_weights() -> Path:
    """Where torchmetrics' FID (torch-fidelity) saves its Inception weights: torch.hub's cache."""
    from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3

    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(URL_INCEPTION_V3)


@cache
def load_fid(weights: str | None = None, feature: int = 2048, device: str = "cpu"):
    """torchmetrics' FrechetInceptionDistance on torch-fidelity's Inception weights.

    ``weights``: a local .pth in torch-fidelity's layout; None: its published weights, from
    torch.hub's cache (downloaded there on first use unless offline). Returns the metric or the
    note to report in its place; a missing ``weights`` file or weights that are present and
    fail to load raise :class:`MetricLoadError`.
    """
    if weights:
        what = f"FID: Inception weights {weights}"
        if not Path(weights).is_file():
            raise _missing_path(what, weights)
        path: Path | None = Path(weights)
    else:
        path = default_inception_weights()
        what = f"FID: torch-fidelity's Inception weights file {path}"
        if not path.is_file():
            path = None
    fetch = ("python -c \"from torchmetrics.image.fid import FrechetInceptionDistance; "
             "FrechetInceptionDistance()\"")
    override = ("set refinement.metrics.fid.weights=/path/to/"
                f"{default_inception_weights().name}")
    reason = offline_reason()
    if reason and path is None:
        log.warning("%s", not_cached_line(what, reason, fetch, override))
        return NOT_CACHED
    try:
        from torchmetrics.image.fid import FrechetInceptionDistance

        metric = FrechetInceptionDistance(
            feature=feature, feature_extractor_weights_path=str(path) if path else None)
    except Exception as err:
        return _note_or_raise(what, err, path is not None, fetch, override)
    return metric.to(device)


def load_metrics(cfg: Mapping[str, Any] | None, device: str = "cpu") -> dict[str, Any]:
    """The configured pretrained metrics: {"clip" | "dino" | "fid": scorer, metric or note}.

    ``cfg`` is ``refinement.metrics``; a section that is null / false (or has a null
    model) is off and absent from the result, so the report has no column for it.
    """
    cfg = cfg or {}
    loaded: dict[str, Any] = {}
    clip, dino, fid = (cfg.get(name) for name in ("clip", "dino", "fid"))
    if clip and clip.get("model"):
        pretrained = clip.get("pretrained")
        loaded["clip"] = load_clip_scorer(str(clip["model"]),
                                          str(pretrained) if pretrained else None, device)
    if dino and dino.get("model"):
        loaded["dino"] = load_dino_scorer(str(dino["model"]), device)
    if fid:
        weights = fid.get("weights")
        loaded["fid"] = load_fid(str(weights) if weights else None,
                                 int(fid.get("feature", 2048)), device)
    return loaded


def identity_scores(
    scorer: ClipScorer | DinoScorer | str,
    outputs: Sequence[np.ndarray],
    masks: Sequence[np.ndarray],
    references: Sequence[np.ndarray],
    reference_masks: Sequence[np.ndarray | None],
    batch_size: int = 32,
) -> list[Value]:
    """Cosine similarity of the refined region crop and the ground-truth reference region crop.

    The reference region is the box of ``reference_mask`` (the whole reference when it is
    None). ``scorer`` may be a note (:func:`load_metrics`): then every value is that note.
    """
    if isinstance(scorer, str):
        return [scorer] * len(outputs)
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
def fid_score(metric, outputs: Sequence[np.ndarray], targets: Sequence[np.ndarray],
              batch_size: int = 32) -> Value:
    """FID of ``outputs`` vs ``targets`` (whole images); ``metric`` may be a note instead."""
    if isinstance(metric, str):
        return metric
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
