"""Refine-by-Align inference: one diffusers pipeline that aligns, then refines.

:class:`RefineByAlignPipeline` owns inference, as ``StableDiffusionInpaintPipeline`` does for
inpainting: registered components (``unet``, ``vae`` or none for pixel-space models,
``reference_encoder``, ``scheduler``), an image and a mask processor
(models/image_processor.py), the calibrated alignment read-out in its config, and two calls
that read top to bottom: :meth:`~RefineByAlignPipeline.align` (the alignment stage) and
``__call__`` (both stages). It takes a user's image, mask and reference at any size, runs the
model at its own resolution and returns the refined image at the input's size, identical to
the input outside the mask. The maths lives in the stage modules (models/alignment.py,
models/refinement.py, models/attention_capture.py, models/correspondence.py); this file
composes them. Saved and loaded as one folder: ``save_pretrained`` / ``from_pretrained``
(models/export.py writes and reads it).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import AutoencoderKL, DiffusionPipeline, UNet2DConditionModel
from diffusers.schedulers import SchedulerMixin
from diffusers.utils import BaseOutput
from omegaconf import DictConfig, ListConfig, OmegaConf

from data.modes import INFERENCE_CROP_MARGIN, Box
from models.alignment import READOUTS, Alignment, attention_vectors, from_vector, resize_reference
from models.autoencoder import VAE, Autoencoder, PixelSpace
from models.image_processor import ImageProcessor, MaskProcessor, reference_tensor
from models.reference_encoder import ReferenceEncoder, ReferenceEncoderModel
from models.refinement import build_sampler, generators, sample_inpaint

log = logging.getLogger(__name__)

# the folder's module for DiffusionPipeline.from_pretrained(dir, custom_pipeline=<its stem>, ...)
CUSTOM_PIPELINE_MODULE = "refine_by_align_pipeline.py"
CUSTOM_PIPELINE_SOURCE = '''"""The pipeline class of this folder, for diffusers' generic loader:

    DiffusionPipeline.from_pretrained(folder, custom_pipeline="refine_by_align_pipeline",
                                      trust_remote_code=True)

The refine-by-align repository must be importable.
"""

from models.pipeline import RefineByAlignPipeline  # noqa: F401
'''


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


def read_alignment(path: str | Path) -> AlignmentConfig:
    """An alignment read-out from a yaml file with :data:`ALIGNMENT_KEYS` (eval.py writes one
    into its run folder); unknown keys are refused."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"alignment config not found: {path}")
    cfg = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    if not isinstance(cfg, dict):
        raise ValueError(f"{path} must be a mapping with keys {ALIGNMENT_KEYS}")
    unknown = sorted(set(cfg) - set(ALIGNMENT_KEYS))
    if unknown:
        raise ValueError(f"{path}: unknown alignment keys {unknown}; known: {ALIGNMENT_KEYS}")
    return AlignmentConfig(**cfg)


@dataclass
class RefinementConfig:
    """How the refinement stage samples and pastes back.

    Ancestral DDPM, 25 steps, no guidance: the best masked MSE on held-out validation pairs for
    the shipped tiny model (50 and 100 steps no better), and +0.68 dB PSNR over guidance 2 on
    the benchmark (results/README.md, "Sampler and guidance"); other models:
    compare_samplers.py.
    ``padding_mask_crop`` (px, None = off): refine a square crop around the mask grown by that
    many pixels (at least the model's size) instead of the whole image, as diffusers'
    inpainting pipelines do; it changes nothing for images at or below the model's size. Off
    by default: worse for the shipped model at every padding tried, on validation pairs at
    256 px (results/crop_option).
    ``final_x0_timestep`` (None = off): stop sampling at the first step at or below this
    timestep and keep the denoiser's clean-sample prediction (DDPM / DDIM only); an option
    beside the pure method, compared in results/final_x0.
    """

    sampler: str = "ddpm"
    num_steps: int = 25
    guidance_scale: float = 1.0
    dilate: int = 0
    feather: int = 0
    padding_mask_crop: int | None = None
    final_x0_timestep: int | None = None


@dataclass
class RefineByAlignOutput(BaseOutput):
    """``images``: uint8 HxWx3 at each input's size; ``alignments``: the alignment stage's
    answer per case (None when the references were used as given, ``align=False``)."""

    images: list[np.ndarray]
    alignments: list[Alignment] | None


def check_case(image: np.ndarray, mask: np.ndarray, reference: np.ndarray | torch.Tensor
               ) -> None:
    """Clear errors for inputs the pipeline cannot refine."""
    arrays = [("image", image)] + ([("reference", reference)]
                                   if isinstance(reference, np.ndarray) else [])
    for name, arr in arrays:
        if arr.ndim != 3 or arr.shape[2] != 3 or arr.dtype != np.uint8:
            raise ValueError(f"{name} must be uint8 HxWx3, got {arr.dtype} {arr.shape}")
    if isinstance(reference, torch.Tensor) and (reference.ndim != 3 or reference.shape[0] != 3):
        raise ValueError(f"a reference tensor must be [3,H,W] in [0,1], got "
                         f"{tuple(reference.shape)}")
    if mask.shape != image.shape[:2]:
        raise ValueError(f"mask size {mask.shape[1]}x{mask.shape[0]} does not match image size "
                         f"{image.shape[1]}x{image.shape[0]}")
    if not np.asarray(mask).any():
        raise ValueError("mask is empty: nothing to refine")


def _plain_config(part: Any) -> None:
    """Hydra-built modules hold OmegaConf lists in their config; JSON needs plain ones."""
    omega = {k: OmegaConf.to_container(v, resolve=True) for k, v in part.config.items()
             if isinstance(v, DictConfig | ListConfig)}
    if omega:
        part.register_to_config(**omega)


def _listed(value: Any) -> list:
    return list(value) if isinstance(value, list | tuple) else [value]


class RefineByAlignPipeline(DiffusionPipeline):
    """Align on the whole reference, refine from the aligned crop (Song et al., ICLR 2025).

    Like ``PaintByExamplePipeline``, an image encoder (``reference_encoder``: DINOv2 + MLP +
    null embedding) feeds the inpainting UNet's cross-attention. ``vae`` is None for
    pixel-space models. ``scheduler`` is the training noise schedule: the alignment stage
    noises with it, and each call builds its sampler (``RefinementConfig.sampler``) from its
    config. The config holds the alignment read-out (``alignment``) and what calibrated it
    (``calibration``; None: not calibrated, e.g. the preset's default that train.py writes,
    and loading warns). ``autocast_dtype``
    (``torch.bfloat16`` / ``torch.float16`` on a GPU) runs the networks under autocast.
    """

    model_cpu_offload_seq = "reference_encoder->unet->vae"
    _optional_components = ["vae"]

    def __init__(
        self,
        unet: UNet2DConditionModel,
        vae: AutoencoderKL | None,
        reference_encoder: ReferenceEncoderModel,
        scheduler: SchedulerMixin,
        alignment: dict[str, Any] | None = None,
        calibration: str | None = None,
    ) -> None:
        super().__init__()
        self.register_modules(unet=unet, vae=vae, reference_encoder=reference_encoder,
                              scheduler=scheduler)
        self.set_alignment(AlignmentConfig(**(alignment or {})), calibration)
        self.image_processor = ImageProcessor()
        self.mask_processor = MaskProcessor()
        self.autocast_dtype = torch.float32
        self._autoencoder: Autoencoder | None = None

    @classmethod
    def from_modules(cls, denoiser: UNet2DConditionModel, reference_encoder: ReferenceEncoder,
                     autoencoder: Autoencoder, noise_scheduler: SchedulerMixin,
                     alignment: AlignmentConfig | None = None, calibration: str | None = None
                     ) -> RefineByAlignPipeline:
        """The pipeline over a trained module's parts (the LightningModule's names); the
        encoder is re-homed in a :class:`ReferenceEncoderModel` (same weights)."""
        if not isinstance(reference_encoder, ReferenceEncoderModel):
            reference_encoder = ReferenceEncoderModel.from_encoder(reference_encoder)
        vae = getattr(autoencoder, "vae", None)
        for part in (denoiser, vae, noise_scheduler):
            if part is not None:
                _plain_config(part)
        return cls(unet=denoiser, vae=vae, reference_encoder=reference_encoder,
                   scheduler=noise_scheduler, alignment=asdict(alignment or AlignmentConfig()),
                   calibration=calibration)

    # --- settings ----------------------------------------------------------------------------
    @property
    def alignment(self) -> AlignmentConfig:
        """The deployed read-out (a copy: change it with :meth:`set_alignment`)."""
        return AlignmentConfig(**self.config.alignment)

    def set_alignment(self, alignment: AlignmentConfig, calibration: str | None = None) -> None:
        """Deploy a read-out; ``calibration`` says what chose it (None: uncalibrated)."""
        self.register_to_config(alignment=asdict(alignment), calibration=calibration)

    @property
    def calibrated(self) -> bool:
        return self.config.calibration is not None

    @property
    def autoencoder(self) -> Autoencoder:
        """``vae`` behind the interface the stages use, or pixel space when there is none."""
        current = getattr(self._autoencoder, "vae", None)
        if self._autoencoder is None or current is not self.vae:
            self._autoencoder = PixelSpace() if self.vae is None else VAE(self.vae)
        return self._autoencoder

    @property
    def image_size(self) -> int:
        """Pixel size the denoiser was built for (latent sample size x autoencoder factor)."""
        return int(self.unet.config.sample_size) * int(self.autoencoder.downsample)

    def autocast(self) -> AbstractContextManager:
        if self.autocast_dtype == torch.float32:
            return nullcontext()
        if self.device.type == "cpu":
            raise ValueError("reduced-precision inference is for GPUs; use float32 on CPU")
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def describe(self, refinement: RefinementConfig | None = None) -> dict[str, Any]:
        """The deployed read-out and the sampling settings, for logs and reports."""
        return {"alignment": asdict(self.alignment), "calibration": self.config.calibration,
                "refinement": asdict(refinement or RefinementConfig()),
                "autocast_dtype": str(self.autocast_dtype).removeprefix("torch.")}

    # --- steps -------------------------------------------------------------------------------
    def encode_reference(self, references: torch.Tensor) -> torch.Tensor:
        """[B,3,h,w] in [0,1], any size -> context tokens [B, T, C]."""
        encoder = self.reference_encoder
        return encoder(resize_reference(references.to(self.device).float(), encoder.image_size))

    def crop_region(self, mask: np.ndarray, refinement: RefinementConfig) -> Box | None:
        """The image region the refinement stage sees: a padded square around the mask (it
        holds the dilated, feathered blend), or None for the whole image."""
        if refinement.padding_mask_crop is None:
            return None
        pad = int(refinement.padding_mask_crop) + refinement.dilate + refinement.feather
        region = self.mask_processor.get_crop_region(mask, pad, self.image_size)
        height, width = mask.shape[:2]
        return None if region == (0, 0, width, height) else region

    # --- stage 1: alignment ------------------------------------------------------------------
    @torch.no_grad()
    def align(self, image: np.ndarray, mask_image: np.ndarray, reference: np.ndarray,
              seed: int = 0, alignment: AlignmentConfig | None = None) -> Alignment:
        """Alignment stage on a user's case (uint8 image and reference, bool mask, any size),
        on the whole image as the read-out was calibrated; the map, region, box and crop are
        on the reference's own pixel grid."""
        check_case(image, mask_image, reference)
        size = self.image_size
        return self.align_tensors(self.image_processor.preprocess(image, size),
                                  self.mask_processor.preprocess(mask_image, size),
                                  reference_tensor(reference)[None], seed, alignment)

    @torch.no_grad()
    def align_tensors(self, image: torch.Tensor, mask: torch.Tensor, reference: torch.Tensor,
                      seed: int = 0, alignment: AlignmentConfig | None = None) -> Alignment:
        """Alignment stage at the model's size: ``image`` [1,3,S,S] in [-1,1], ``mask``
        [1,1,S,S], ``reference`` [1,3,h,w] in [0,1]; ``alignment`` defaults to the
        deployed read-out."""
        cfg = alignment or self.alignment
        encoder, device = self.reference_encoder, self.device
        reference = reference.to(device)
        with self.autocast():
            # 1. the whole reference as context
            context = self.encode_reference(reference)
            # 2. masked-query cross-attention of block l* at t* over the reference tokens
            vector = attention_vectors(
                self.unet, self.autoencoder, self.scheduler, image.to(device), mask.to(device),
                context, [cfg.timestep], [cfg.block], torch.Generator().manual_seed(seed),
                readout=cfg.readout, num_steps=cfg.num_steps)[cfg.timestep][cfg.block]
            # 3. map -> region -> square box on the reference's own grid -> crop
            return from_vector(vector[0], reference, encoder.grid, encoder.num_prefix_tokens,
                               cfg.threshold, cfg.margin)

    # --- both stages -------------------------------------------------------------------------
    @torch.no_grad()
    def __call__(
        self,
        image: np.ndarray | Sequence[np.ndarray],
        mask_image: np.ndarray | Sequence[np.ndarray],
        reference: np.ndarray | torch.Tensor | Sequence[np.ndarray | torch.Tensor],
        refinement: RefinementConfig | None = None,
        *,
        seed: int | Sequence[int] = 0,
        align: bool = True,
        alignment: AlignmentConfig | None = None,
        progress: bool = False,
        return_dict: bool = True,
    ) -> RefineByAlignOutput | tuple[list[np.ndarray], list[Alignment] | None]:
        """Refine one case or a batch (lists): align on each whole reference, then refine the
        masked region from the aligned crop and paste it back.

        ``image`` uint8 HxWx3 and ``mask_image`` bool HxW of any size; ``reference`` uint8
        HxWx3 or a [3,h,w] tensor in [0,1]. With ``align=False`` the references are used as
        given (a whole reference, or crops found before). ``seed``: one for the batch (it
        seeds each case's alignment noise and one generator for the batch's sampling noise),
        or one per case (a case's output then does not depend on its batch).
        """
        cfg = refinement or RefinementConfig()
        images, masks = _listed(image), _listed(mask_image)
        references = _listed(reference)
        if not len(images) == len(masks) == len(references):
            raise ValueError(f"{len(images)} images, {len(masks)} masks and {len(references)} "
                             "references: one of each per case")
        # 1. check inputs
        for im, m, ref in zip(images, masks, references, strict=True):
            check_case(im, m, ref)
        # 2. alignment stage: the region of each reference that the masked content shows
        seeds = list(seed) if isinstance(seed, Sequence) else [seed] * len(images)
        alignments = None
        if align:
            alignments = [self.align(im, m, ref, case_seed, alignment) for im, m, ref, case_seed
                          in zip(images, masks, references, seeds, strict=True)]
            references = [found.crop.float().cpu() for found in alignments]
        # 3. preprocess: each case's view (whole image or padded crop) at the model's size
        size = self.image_size
        regions = [self.crop_region(m, cfg) for m in masks]
        model_image = torch.cat([self.image_processor.preprocess(im, size, region)
                                 for im, region in zip(images, regions, strict=True)])
        model_mask = torch.cat([self.mask_processor.preprocess(m, size, region)
                                for m, region in zip(masks, regions, strict=True)])
        encoder_size = self.reference_encoder.image_size
        refs = torch.cat([resize_reference(reference_tensor(r)[None].float().cpu(), encoder_size)
                          for r in references])
        # 4. refinement stage: sample the masked region from the references
        device = self.device
        with self.autocast():
            context = self.encode_reference(refs)
            sampler = build_sampler(cfg.sampler, self.scheduler.config, self.autoencoder)
            generated = sample_inpaint(
                self.unet, self.autoencoder, sampler, model_image.to(device),
                model_mask.to(device), context, self.reference_encoder.null(len(context)),
                cfg.num_steps, cfg.guidance_scale, generators(seed, len(context)),
                progress, cfg.final_x0_timestep).float()
        # 5. postprocess: paste inside the mask at each image's own resolution
        refined = [self.image_processor.apply_overlay(m, im, self.image_processor.postprocess(g),
                                                      region, cfg.dilate, cfg.feather)
                   for im, m, g, region in zip(images, masks, generated, regions, strict=True)]
        if not return_dict:
            return refined, alignments
        return RefineByAlignOutput(images=refined, alignments=alignments)

    # --- folder I/O --------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | Path, **kwargs: Any
                        ) -> RefineByAlignPipeline:
        """diffusers' loader; warns loudly when the folder's read-out is uncalibrated."""
        pipe = super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        if not pipe.calibrated:
            cfg = pipe.alignment
            log.warning(
                "UNCALIBRATED alignment read-out: %s carries the model preset's default "
                "(t=%d, block %d), not a calibration. Calibrate it with `python eval.py "
                "ckpt_path=%s write_alignment_to_export=true`.", pretrained_model_name_or_path,
                cfg.timestep, cfg.block, pretrained_model_name_or_path)
        return pipe

    def save_pretrained(self, save_directory: str | Path, **kwargs: Any) -> None:
        """diffusers' layout (safetensors) plus the module that lets
        ``DiffusionPipeline.from_pretrained`` find this class."""
        kwargs.setdefault("safe_serialization", True)
        super().save_pretrained(save_directory, **kwargs)
        (Path(save_directory) / CUSTOM_PIPELINE_MODULE).write_text(CUSTOM_PIPELINE_SOURCE)
