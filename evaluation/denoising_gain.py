"""The denoising gain (models/denoising_gain.py) on benchmark cases: eval.py's report section
and scripts/validate_export.py's table.

Every case with a ``target`` is scored at the model's resolution, with the whole reference
(``whole``) and, for cases with a ``reference_mask``, the ground-truth crop (``crop``: the
oracle_crop of evaluation/refinement.py), or another case's whole reference (``other``: case i
takes the next scored case's, cyclically). A case's noise is ``case_noise_seed(seed, case
id)``, the same under every reference (so they are paired) and whatever else is scored:
``whole`` minus ``other`` is how much the denoiser draws from the right reference.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from data.benchmark import BenchmarkCase
from data.modes import INFERENCE_CROP_MARGIN
from evaluation.refinement import oracle_crop
from models.alignment import case_noise_seed, resize_reference
from models.autoencoder import PixelSpace
from models.denoising_gain import (
    DEFAULT_TIMESTEPS,
    PSNR_CAP,
    Scores,
    check_timesteps,
    concat_scores,
    gain_rows,
    score_batch,
)
from models.image_processor import reference_tensor
from models.pipeline import RefineByAlignPipeline

REFERENCES = ("whole", "crop", "other")


@dataclass
class GainConfig:
    """What the measurement covers; mirrors the ``denoising_gain`` node of configs/eval.yaml."""

    run: bool = True
    timesteps: list[int] = field(default_factory=lambda: list(DEFAULT_TIMESTEPS))
    references: list[str] = field(default_factory=lambda: ["whole"])
    seed: int = 0
    batch_size: int = 16
    crop_margin: float = INFERENCE_CROP_MARGIN  # the ground-truth crop's, as oracle_crop's

    def __post_init__(self) -> None:
        unknown = [r for r in self.references if r not in REFERENCES]
        if unknown or not self.references:
            raise ValueError(f"denoising_gain.references must be some of {REFERENCES}, got "
                             f"{list(self.references)}")


def _reference(case: BenchmarkCase, kind: str, size: int, margin: float) -> torch.Tensor:
    image = (oracle_crop(case.reference, case.reference_mask, margin) if kind == "crop"
             else reference_tensor(case.reference))
    return resize_reference(image[None], size)


def reference_sources(cases: Sequence[BenchmarkCase], reference: str) -> list[BenchmarkCase]:
    """The case whose reference each of ``cases`` is scored with: itself, or for ``other``
    the next one (cyclically), so no case sees its own."""
    if reference != "other":
        return list(cases)
    if len(cases) < 2:
        raise ValueError("the 'other' reference needs at least 2 cases")
    return [*cases[1:], cases[0]]


def case_batches(pipe: RefineByAlignPipeline, cases: Sequence[BenchmarkCase], reference: str,
                 cfg: GainConfig) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                    list[int]]]:
    """``(target, mask, context, noise_seeds)`` per batch of ``cases``, at the model's size,
    with the ``reference`` kind's tokens (the inputs of ``models.denoising_gain.score_batch``)."""
    device, encoder, size = pipe.device, pipe.reference_encoder, pipe.image_size
    sources = reference_sources(cases, reference)
    for start in range(0, len(cases), max(1, cfg.batch_size)):
        chunk = cases[start: start + cfg.batch_size]
        target = torch.cat([pipe.image_processor.preprocess(c.target, size)
                            for c in chunk]).to(device)
        mask = torch.cat([pipe.mask_processor.preprocess(c.mask, size) for c in chunk]).to(device)
        refs = torch.cat([_reference(c, reference, encoder.image_size, cfg.crop_margin)
                          for c in sources[start: start + cfg.batch_size]]).to(device)
        with torch.no_grad():
            context = encoder(refs)
        yield target, mask, context, [case_noise_seed(cfg.seed, c.id) for c in chunk]


def score_cases(pipe: RefineByAlignPipeline, cases: Sequence[BenchmarkCase], reference: str,
                cfg: GainConfig, progress: Callable[[int], None] | None = None) -> Scores:
    """Per-case scores of ``cases`` with the ``reference`` kind."""
    parts = []
    for target, mask, context, seeds in case_batches(pipe, cases, reference, cfg):
        parts.append(score_batch(pipe.unet, pipe.autoencoder, pipe.scheduler, target, mask,
                                 context, cfg.timesteps, seeds))
        if progress is not None:
            progress(len(seeds))
    return concat_scores(parts)


def measure_cases(pipe: RefineByAlignPipeline, cases: Sequence[BenchmarkCase], cfg: GainConfig,
                  progress: bool = True, per_case: bool = False) -> dict[str, Any]:
    """report.json's ``denoising_gain`` section (docs/report_schema.md); with ``per_case``,
    each reference also carries ``per_case: {case_id: {psnr_noisy: [T], ...}}``."""
    check_timesteps(cfg.timesteps, pipe.scheduler)
    scored = [c for c in cases if c.target is not None]
    chosen = {"whole": scored, "crop": [c for c in scored if c.reference_mask is not None],
              "other": scored if len(scored) > 1 else []}
    out: dict[str, Any] = {
        "timesteps": [int(t) for t in cfg.timesteps], "seed": int(cfg.seed),
        "psnr_cap": PSNR_CAP,
        "prediction_type": str(pipe.scheduler.config.prediction_type),
        "space": "pixel" if isinstance(pipe.autoencoder, PixelSpace) else "latent",
        "image_size": pipe.image_size, "crop_margin": float(cfg.crop_margin),
        "cases_without_target": len(cases) - len(scored), "references": {},
    }
    total = sum(len(chosen[r]) for r in cfg.references)
    with tqdm(total=total, desc="denoising gain", unit="case", disable=not progress) as bar:
        for ref in cfg.references:
            items = chosen[ref]
            if not items:
                out["references"][ref] = {"num_cases": 0, "rows": []}
                continue
            scores = score_cases(pipe, items, ref, cfg, bar.update)
            node: dict[str, Any] = {"num_cases": len(items),
                                    "rows": gain_rows(scores, cfg.timesteps)}
            if per_case:
                node["per_case"] = {c.id: {k: v[n].tolist() for k, v in scores.items()}
                                    for n, c in enumerate(items)}
            out["references"][ref] = node
    return out


def run_section(pipe: RefineByAlignPipeline, cases: Sequence[BenchmarkCase],
                node: Mapping[str, Any] | None, progress: bool = True) -> dict[str, Any] | None:
    """eval.py's section from its ``denoising_gain`` config node; None when off or absent."""
    if not node:
        return None
    if isinstance(node, DictConfig):
        node = OmegaConf.to_container(node, resolve=True)
    cfg = GainConfig(**node)
    return measure_cases(pipe, cases, cfg, progress) if cfg.run else None
