"""The two-stage Refine-by-Align pipeline: align on the whole reference, refine from the crop."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from omegaconf import OmegaConf

from models.alignment import Alignment, align, resize_reference
from models.export import DEFAULT_EXPORT, REPO_ROOT, Components
from models.refinement import blend, build_sampler, sample_inpaint


@dataclass
class AlignmentConfig:
    """Which (timestep, block) to read and how to post-process; set by the calibration sweep."""

    timestep: int = 300
    block: int = 3
    threshold: float = 0.5
    margin: float = 0.1


ALIGNMENT_KEYS = ("timestep", "block", "threshold", "margin")
DEFAULT_ALIGNMENT = REPO_ROOT / "configs" / "alignment" / "default.yaml"


def load_alignment(path: str | Path | None = None,
                   export_dir: str | Path | None = None) -> AlignmentConfig:
    """The alignment read-out to deploy: ``path``, else the export's own calibrated
    ``alignment.yaml`` (written by eval.py), else configs/alignment/default.yaml."""
    candidates = [Path(path)] if path else [Path(export_dir or DEFAULT_EXPORT) / "alignment.yaml",
                                            DEFAULT_ALIGNMENT]
    found = next((p for p in candidates if p.is_file()), None)
    if path and found is None:
        raise FileNotFoundError(f"alignment config not found: {path}")
    if found is None:
        return AlignmentConfig()
    cfg = OmegaConf.to_container(OmegaConf.load(found), resolve=True)
    if not isinstance(cfg, dict):
        raise ValueError(f"{found} must be a mapping with keys {ALIGNMENT_KEYS}")
    return AlignmentConfig(**{k: cfg[k] for k in ALIGNMENT_KEYS if k in cfg})


@dataclass
class RefinementConfig:
    # Ancestral DDPM is the default: the tiny pixel-space model (cosine schedule, epsilon)
    # sampled with deterministic DDIM or DPM-Solver gives far worse masked MSE (README).
    sampler: str = "ddpm"
    num_steps: int = 50
    guidance_scale: float = 2.0
    dilate: int = 0
    feather: int = 0


@dataclass
class RefineByAlign:
    """Both stages over one set of weights."""

    components: Components
    alignment: AlignmentConfig = field(default_factory=AlignmentConfig)
    refinement: RefinementConfig = field(default_factory=RefinementConfig)

    def __post_init__(self) -> None:
        self.scheduler = build_sampler(self.refinement.sampler,
                                       self.components.noise_scheduler.config,
                                       self.components.autoencoder)

    @property
    def device(self) -> torch.device:
        return next(self.components.denoiser.parameters()).device

    def align(self, image: torch.Tensor, mask: torch.Tensor, reference: torch.Tensor,
              seed: int = 0) -> Alignment:
        """Alignment stage on one case (see :func:`models.alignment.align`)."""
        cfg = self.alignment
        generator = torch.Generator().manual_seed(seed)
        return align(self.components, image, mask, reference, cfg.timestep, cfg.block,
                     cfg.threshold, cfg.margin, generator)

    @torch.no_grad()
    def refine(self, image: torch.Tensor, mask: torch.Tensor, reference: torch.Tensor,
               seed: int = 0, progress: bool = False) -> torch.Tensor:
        """Refinement stage: sample from ``reference`` (a crop or the whole) and blend.

        ``image`` [B,3,H,W] in [-1,1], ``mask`` [B,1,H,W], ``reference`` [B,3,h,w] in [0,1].
        Pixels outside the (dilated) mask are returned unchanged.
        """
        cfg = self.refinement
        encoder = self.components.reference_encoder
        context = encoder(resize_reference(reference, encoder.image_size))
        generated = sample_inpaint(
            self.components.denoiser, self.components.autoencoder, self.scheduler, image, mask,
            context, encoder.null(len(context)), cfg.num_steps, cfg.guidance_scale,
            torch.Generator().manual_seed(seed), progress,
        )
        return blend(image, generated, mask, cfg.dilate, cfg.feather)

    def __call__(self, image: torch.Tensor, mask: torch.Tensor, reference: torch.Tensor,
                 seed: int = 0) -> tuple[torch.Tensor, Alignment]:
        """Align on the whole reference, then refine with the aligned crop."""
        found = self.align(image, mask, reference, seed)
        refined = self.refine(image, mask, found.crop.unsqueeze(0), seed)
        return refined, found
