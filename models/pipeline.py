"""The two-stage Refine-by-Align pipeline: align on the whole reference, refine from the crop.

:class:`RefineByAlign` owns inference, as a diffusers pipeline does: it takes a user's image,
mask and reference at any size (uint8 arrays), runs the model at its own resolution and
returns the refined image at the input's size, identical to the input outside the mask.
``scripts/refine.py``, ``eval.py`` and the notebook all go through it.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from data.modes import INFERENCE_CROP_MARGIN
from models.alignment import READOUTS, Alignment, align, resize_reference
from models.export import DEFAULT_EXPORT, REPO_ROOT, Components
from models.refinement import blend, build_sampler, generators, resize_mask, sample_inpaint

log = logging.getLogger(__name__)

ALIGNMENT_FILE = "alignment.yaml"
DEFAULT_POSTPROCESS = REPO_ROOT / "configs" / "alignment" / "default.yaml"


@dataclass
class AlignmentConfig:
    """Which (timestep, block) to read and how; calibrated by eval.py's sweep.

    ``margin`` defaults to the midpoint of training's crop margins, so aligned crops look like
    the refinement-mode references the model was trained on.
    """

    timestep: int = 300
    block: int = 3
    threshold: float = 0.5
    margin: float = INFERENCE_CROP_MARGIN
    readout: str = "forward_noise"  # or "trajectory" (Algorithm 1); see models.alignment
    num_steps: int = 50  # the DDIM schedule the timestep lies on (trajectory read-out)

    def __post_init__(self) -> None:
        if self.readout not in READOUTS:
            raise ValueError(f"alignment readout must be one of {READOUTS}, got {self.readout!r}")


ALIGNMENT_KEYS = tuple(AlignmentConfig.__dataclass_fields__)


def _read_alignment(path: Path) -> dict:
    cfg = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    if not isinstance(cfg, dict):
        raise ValueError(f"{path} must be a mapping with keys {ALIGNMENT_KEYS}")
    unknown = sorted(set(cfg) - set(ALIGNMENT_KEYS))
    if unknown:
        raise ValueError(f"{path}: unknown alignment keys {unknown}; known: {ALIGNMENT_KEYS}")
    return cfg


def load_alignment(path: str | Path | None = None, export_dir: str | Path | None = None,
                   components: Components | None = None) -> AlignmentConfig:
    """The alignment read-out to deploy: ``path``, else the export's own calibrated
    ``alignment.yaml`` (written by eval.py).

    Without either, the read-out is uncalibrated: the model preset's documented default
    (``val_timestep`` / ``val_block`` of its config, e.g. block 9 for SD-1.5, the paper's best)
    is used with a loud warning, never silently another model's calibration.
    """
    if path:
        if not Path(path).is_file():
            raise FileNotFoundError(f"alignment config not found: {path}")
        return AlignmentConfig(**_read_alignment(Path(path)))
    export_dir = Path(export_dir or DEFAULT_EXPORT)
    calibrated = export_dir / ALIGNMENT_FILE
    if calibrated.is_file():
        return AlignmentConfig(**_read_alignment(calibrated))
    defaults = _read_alignment(DEFAULT_POSTPROCESS)
    model_cfg = components.config if components is not None else None
    if model_cfg is None:
        raise FileNotFoundError(
            f"{export_dir} has no calibrated {ALIGNMENT_FILE}; pass one, or run "
            f"`python eval.py ckpt_path={export_dir}` to calibrate")
    chosen = AlignmentConfig(**defaults, timestep=int(model_cfg.val_timestep),
                             block=int(model_cfg.val_block))
    log.warning(
        "UNCALIBRATED alignment read-out: %s has no %s, so the preset's default "
        "(t=%d, block %d, from its model config) is used. Calibrate it with "
        "`python eval.py ckpt_path=%s write_alignment_to_export=true` (writes %s into the "
        "export and its diffusers folder).",
        export_dir, ALIGNMENT_FILE, chosen.timestep, chosen.block, export_dir, ALIGNMENT_FILE)
    return chosen


@dataclass
class RefinementConfig:
    # Ancestral DDPM, 25 steps, no guidance: the best masked MSE on held-out validation pairs
    # for the shipped tiny model (50 and 100 steps no better), and +0.68 dB PSNR over guidance
    # 2 on the benchmark (results/README.md, "Sampler and guidance"); other models:
    # compare_samplers.py
    sampler: str = "ddpm"
    num_steps: int = 25
    guidance_scale: float = 1.0
    dilate: int = 0
    feather: int = 0


# ----------------------------------------------------------------------------- conversions
def _chw(image: np.ndarray) -> torch.Tensor:
    """uint8 HxWx3 (possibly a read-only view) -> float [3,H,W], values kept as 0..255."""
    return torch.from_numpy(np.array(image, dtype=np.float32)).permute(2, 0, 1)


def to_model_inputs(image: np.ndarray, mask: np.ndarray, size: int
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 image / bool mask -> [1,3,S,S] in [-1,1] and [1,1,S,S] at the model's size.

    The mask covers every masked pixel of the original, so generated content spans the whole
    mask (the sweep scores the mask's faithful shape instead).
    """
    img = _chw(image)[None] / 255.0
    msk = torch.from_numpy(np.asarray(mask).astype(np.float32))[None, None]
    if img.shape[-2:] != (size, size):
        img = F.interpolate(img, size=(size, size), mode="bilinear", antialias=True,
                            align_corners=False).clamp(0, 1)
    return img * 2 - 1, resize_mask(msk, (size, size), cover=True)


def reference_tensor(reference: np.ndarray) -> torch.Tensor:
    """uint8 HxWx3 -> [3,H,W] in [0,1] (the layout of ``Alignment.crop``)."""
    return _chw(reference) / 255.0


def to_uint8(image: torch.Tensor) -> np.ndarray:
    """[3,H,W] in [-1,1] -> uint8 HxWx3."""
    return ((image.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()


def paste(image: np.ndarray, content: np.ndarray, mask: np.ndarray, dilate: int = 0,
          feather: int = 0) -> np.ndarray:
    """Blend ``content`` (any size, upsampled to the image's) into ``image`` inside the mask.

    Done at the image's own resolution with :func:`models.refinement.blend` on 0..255 floats,
    so zero-weight pixels are the input's integers exactly.
    """
    height, width = mask.shape
    gen = _chw(content)[None]
    if gen.shape[-2:] != (height, width):
        gen = F.interpolate(gen, size=(height, width), mode="bicubic", align_corners=False)
    orig = _chw(image)[None]
    msk = torch.from_numpy(np.asarray(mask).astype(np.float32))[None, None]
    out = blend(orig, gen.clamp(0, 255), msk, dilate, feather)
    return out[0].round().clamp(0, 255).byte().permute(1, 2, 0).numpy()


def check_case(image: np.ndarray, mask: np.ndarray, reference: np.ndarray) -> None:
    """Clear errors for inputs the pipeline cannot refine."""
    for name, arr in (("image", image), ("reference", reference)):
        if arr.ndim != 3 or arr.shape[2] != 3 or arr.dtype != np.uint8:
            raise ValueError(f"{name} must be uint8 HxWx3, got {arr.dtype} {arr.shape}")
    if mask.shape != image.shape[:2]:
        raise ValueError(f"mask size {mask.shape[1]}x{mask.shape[0]} does not match image size "
                         f"{image.shape[1]}x{image.shape[0]}")
    if not np.asarray(mask).any():
        raise ValueError("mask is empty: nothing to refine")


# ----------------------------------------------------------------------------- pipeline
@dataclass
class RefineByAlign:
    """Both stages over one set of weights.

    ``dtype`` (``torch.bfloat16`` / ``torch.float16`` on a GPU) runs the denoiser, encoder
    and autoencoder under autocast; the default float32 runs as the weights are.
    """

    components: Components
    alignment: AlignmentConfig = field(default_factory=AlignmentConfig)
    refinement: RefinementConfig = field(default_factory=RefinementConfig)
    dtype: torch.dtype = torch.float32

    def __post_init__(self) -> None:
        self.scheduler = build_sampler(self.refinement.sampler,
                                       self.components.noise_scheduler.config,
                                       self.components.autoencoder)
        if self.dtype != torch.float32 and self.device.type == "cpu":
            raise ValueError("reduced-precision inference is for GPUs; use float32 on CPU")

    @property
    def device(self) -> torch.device:
        return next(self.components.denoiser.parameters()).device

    @property
    def image_size(self) -> int:
        return self.components.image_size

    def _autocast(self):
        if self.dtype == torch.float32:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    # --- stages on model-size tensors -------------------------------------------------------
    @torch.no_grad()
    def align_tensors(self, image: torch.Tensor, mask: torch.Tensor, reference: torch.Tensor,
                      seed: int = 0) -> Alignment:
        """Alignment stage on one case at the model's size (see :func:`models.alignment.align`):
        ``image`` [1,3,S,S] in [-1,1], ``mask`` [1,1,S,S], ``reference`` [1,3,h,w] in [0,1]."""
        cfg = self.alignment
        with self._autocast():
            found = align(self.components, image.to(self.device), mask.to(self.device),
                          reference.to(self.device), cfg.timestep, cfg.block, cfg.threshold,
                          cfg.margin, torch.Generator().manual_seed(seed), cfg.readout,
                          cfg.num_steps)
        return found

    @torch.no_grad()
    def generate(self, image: torch.Tensor, mask: torch.Tensor, references: torch.Tensor,
                 seed: int | Sequence[int] = 0, progress: bool = False) -> torch.Tensor:
        """Refinement sampling at the model's size, before blending: [B,3,S,S] in [-1,1].

        ``references`` [B,3,h,w] in [0,1] (crops or whole references, resized to the
        encoder's input); one generator seeded with ``seed`` draws the batch's noise, or with
        B seeds, one generator per case (a case's output then does not depend on its batch).
        """
        cfg, encoder = self.refinement, self.components.reference_encoder
        with self._autocast():
            context = encoder(resize_reference(references.to(self.device).float(),
                                               encoder.image_size))
            generated = sample_inpaint(
                self.components.denoiser, self.components.autoencoder, self.scheduler,
                image.to(self.device), mask.to(self.device), context,
                encoder.null(len(context)), cfg.num_steps, cfg.guidance_scale,
                generators(seed, len(context)), progress)
        return generated.float()

    # --- user-facing: any size in, input size out ----------------------------------------
    def align(self, image: np.ndarray, mask: np.ndarray, reference: np.ndarray,
              seed: int = 0) -> Alignment:
        """Alignment stage on a user's case (uint8 image and reference, bool mask, any size);
        the map, region, box and crop are on the reference's own pixel grid."""
        check_case(image, mask, reference)
        model_image, model_mask = to_model_inputs(image, mask, self.image_size)
        return self.align_tensors(model_image, model_mask, reference_tensor(reference)[None],
                                  seed)

    def refine(self, images: Sequence[np.ndarray], masks: Sequence[np.ndarray],
               references: Sequence[torch.Tensor | np.ndarray], seed: int | Sequence[int] = 0,
               progress: bool = False) -> list[np.ndarray]:
        """Refinement stage for a batch of cases of any sizes; returns uint8 images at each
        input's size, identical to it outside the (dilated) mask.

        ``references`` are crops or whole references: [3,h,w] tensors in [0,1] or uint8
        arrays; each is resized to the encoder's input on its own. ``seed``: one for the
        batch, or one per case (see :meth:`generate`).
        """
        size, cfg = self.image_size, self.refinement
        pairs = [to_model_inputs(im, m, size) for im, m in zip(images, masks, strict=True)]
        refs = [reference_tensor(r) if isinstance(r, np.ndarray) else r for r in references]
        encoder_size = self.components.reference_encoder.image_size
        refs = torch.cat([resize_reference(r[None].float().cpu(), encoder_size) for r in refs])
        generated = self.generate(torch.cat([p[0] for p in pairs]),
                                  torch.cat([p[1] for p in pairs]), refs, seed, progress)
        return [paste(im, to_uint8(g), m, cfg.dilate, cfg.feather)
                for im, g, m in zip(images, generated, masks, strict=True)]

    def __call__(self, image: np.ndarray, mask: np.ndarray, reference: np.ndarray,
                 seed: int = 0, progress: bool = False) -> tuple[np.ndarray, Alignment]:
        """Align on the whole reference, then refine with the aligned crop."""
        found = self.align(image, mask, reference, seed)
        refined = self.refine([image], [mask], [found.crop.float().cpu()], seed, progress)[0]
        return refined, found

    def describe(self) -> dict:
        """The read-out and sampling settings in use, for logs and reports."""
        return {"alignment": asdict(self.alignment), "refinement": asdict(self.refinement),
                "dtype": str(self.dtype).removeprefix("torch.")}
