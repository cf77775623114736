"""Validation sample grids: rows of (target, mask, reference, prediction), to every logger.

A Lightning callback that keeps the first samples of the first validation batch and, when the
validation ends (not in the sanity check), inpaints them with the weights validation ran with
(the EMA ones when kept) and a fixed seed, then logs the grid: ``log_image`` (wandb),
``add_image`` (TensorBoard), or a PNG under the logger's ``log_dir``/samples (CSV).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch

from models.distributed import call_with_full_weights
from models.refinement import sample_inpaint


class ValidationSampleGrid(pl.Callback):
    """Sample ``num_samples`` validation pairs in ``steps`` steps at ``guidance_scale``."""

    def __init__(self, num_samples: int = 4, steps: int = 20, guidance_scale: float = 2.0,
                 seed: int = 0) -> None:
        self.num_samples, self.steps = num_samples, steps
        self.guidance_scale, self.seed = guidance_scale, seed
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
        generator = torch.Generator(device="cpu").manual_seed(self.seed)
        encoder = pl_module.reference_encoder
        context = encoder(batch["reference"])
        return sample_inpaint(
            pl_module.denoiser, pl_module.autoencoder, pl_module.sampling_scheduler,
            batch["target"], batch["mask"], context, encoder.null(len(context)), self.steps,
            self.guidance_scale, generator,
        )


def sample_grid(batch: dict[str, torch.Tensor], pred: torch.Tensor) -> torch.Tensor:
    """One row per sample: target, mask, reference (resized to the target), prediction."""
    from torchvision.utils import make_grid

    # float32: under FSDP with bf16 the prediction comes back in bf16
    target, mask, reference, pred = (x.float() for x in (
        batch["target"], batch["mask"], batch["reference"], pred))
    resize = torch.nn.functional.interpolate
    columns = [
        (target + 1) / 2,
        mask.expand(-1, 3, -1, -1),
        resize(reference, size=target.shape[-2:], mode="bilinear", antialias=True),
        (pred + 1) / 2,
    ]
    return make_grid(torch.stack(columns, 1).flatten(0, 1), nrow=4).clamp(0, 1)


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
