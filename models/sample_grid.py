"""Validation sample grids: rows of (target, mask, reference, prediction, result), the
columns labelled in the image, to every logger.

A Lightning callback that keeps the first samples of the first validation batch and, when the
validation ends (not in the sanity check), inpaints them with the weights validation ran with
(the EMA ones when kept) and a fixed seed, then logs the grid: ``log_image`` (wandb),
``add_image`` (TensorBoard), or a PNG under the logger's ``log_dir``/samples (CSV). It samples
as refinement is deployed (:class:`models.pipeline.RefinementConfig`, the sampler, steps and
guidance of configs/refinement/default.yaml), so the grid shows what users get; ``result`` is
the prediction pasted into the mask, what refinement returns.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch

from models.distributed import call_with_full_weights
from models.pipeline import RefinementConfig
from models.refinement import blend, build_sampler, sample_inpaint

COLUMNS = ("target", "mask", "reference", "prediction", "result")


class ValidationSampleGrid(pl.Callback):
    """Sample ``num_samples`` validation pairs as refinement is deployed; ``steps``,
    ``guidance_scale`` and ``sampler`` override the deployed settings (e.g. fewer steps in
    smoke runs)."""

    def __init__(self, num_samples: int = 4, steps: int | None = None,
                 guidance_scale: float | None = None, seed: int = 0,
                 sampler: str | None = None) -> None:
        deployed = RefinementConfig()
        self.num_samples, self.seed = num_samples, seed
        self.sampler = sampler or deployed.sampler
        self.steps = deployed.num_steps if steps is None else int(steps)
        self.guidance_scale = (deployed.guidance_scale if guidance_scale is None
                               else float(guidance_scale))
        self._batch: dict[str, Any] | None = None

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule
                                  ) -> None:
        self._batch = None

    def on_validation_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                                outputs: Any, batch: dict[str, Any], batch_idx: int,
                                dataloader_idx: int = 0) -> None:
        if batch_idx == 0 and dataloader_idx == 0:
            self._batch = {k: v[: self.num_samples] for k, v in batch.items()}

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule
                                ) -> None:
        batch, self._batch = self._batch, None
        if batch is None or trainer.sanity_checking:
            return
        # on every rank: under FSDP sampling gathers the weights, a collective
        pred = call_with_full_weights(pl_module, self.sample, pl_module, batch)
        log_grid(trainer.loggers, sample_grid(batch, pred), trainer.global_step)

    @torch.no_grad()
    def sample(self, pl_module: pl.LightningModule, batch: dict[str, Any]) -> torch.Tensor:
        """The inpainted targets (in [-1, 1]) of ``batch``, with a fixed seed."""
        scheduler = build_sampler(self.sampler, pl_module.noise_scheduler.config,
                                  pl_module.autoencoder)
        generator = torch.Generator(device="cpu").manual_seed(self.seed)
        encoder = pl_module.reference_encoder
        context = encoder(batch["reference"])
        return sample_inpaint(
            pl_module.denoiser, pl_module.autoencoder, scheduler, batch["target"],
            batch["mask"], context, encoder.null(len(context)), self.steps,
            self.guidance_scale, generator,
        )


def sample_grid(batch: dict[str, torch.Tensor], pred: torch.Tensor) -> torch.Tensor:
    """One row per sample: target, mask, reference (resized to the target), prediction, result
    (the prediction pasted into the mask as refinement blends it), labelled above."""
    # float32: under FSDP with bf16 the prediction comes back in bf16
    target, mask, reference, pred = (x.float() for x in (
        batch["target"], batch["mask"], batch["reference"], pred))
    resize = torch.nn.functional.interpolate
    deployed = RefinementConfig()
    images = [
        (target + 1) / 2,
        mask.expand(-1, 3, -1, -1),
        resize(reference, size=target.shape[-2:], mode="bilinear", antialias=True),
        (pred + 1) / 2,
        (blend(target, pred, mask, deployed.dilate, deployed.feather) + 1) / 2,
    ]
    return labelled_grid(list(zip(COLUMNS, images, strict=True)))


def labelled_grid(columns: Sequence[tuple[str, torch.Tensor]], padding: int = 2
                  ) -> torch.Tensor:
    """[3, H, W] in [0, 1]: one column per (label, [B,3,h,w] images in [0, 1]), one row per
    sample, each label written above its column."""
    from PIL import Image, ImageDraw, ImageFont
    from torchvision.utils import make_grid

    labels, images = zip(*columns, strict=True)
    grid = make_grid(torch.stack(images, 1).flatten(0, 1), nrow=len(images), padding=padding,
                     pad_value=1.0).clamp(0, 1).cpu()
    step = images[0].shape[-1] + padding  # column pitch
    size = max(10, step // 8)
    font = ImageFont.load_default(size=size)
    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    while size > 6 and max(draw.textlength(t, font=font) for t in labels) > step - 2:
        size -= 1
        font = ImageFont.load_default(size=size)
    header = Image.new("RGB", (grid.shape[-1], size + 2 * padding + 2), "white")
    draw = ImageDraw.Draw(header)
    _, y0, _, y1 = draw.textbbox((0, 0), "".join(labels), font=font)  # one baseline for all
    for i, text in enumerate(labels):
        x0, _, x1, _ = draw.textbbox((0, 0), text, font=font)
        left = padding + i * step + (step - padding - (x1 - x0)) / 2 - x0
        draw.text((left, (header.height - (y1 - y0)) / 2 - y0), text, fill="black", font=font)
    top = torch.from_numpy(np.asarray(header).copy()).permute(2, 0, 1).float() / 255
    return torch.cat([top, grid], dim=1)


def log_grid(loggers: list[Any], grid: torch.Tensor, step: int) -> None:
    """Log ``grid`` as ``val/samples`` to every logger that takes images."""
    for logger in loggers:
        log_image = getattr(logger, "log_image", None)
        experiment = getattr(logger, "experiment", None)
        if log_image is not None:
            log_image("val/samples", [grid], step=step)
        elif hasattr(experiment, "add_image"):
            experiment.add_image("val/samples", grid, step)
        elif getattr(logger, "log_dir", None):
            from torchvision.utils import save_image

            out = Path(logger.log_dir) / "samples"
            out.mkdir(parents=True, exist_ok=True)
            save_image(grid, out / f"step{step:07d}.png")
