"""LightningModule: reference-guided object-completion training over the two data modes.

It receives built components (denoiser, reference encoder, autoencoder, schedulers, optimizer
and LR-schedule factories) and holds the objective: one shared ``model_step`` (diffusion loss,
captured cross-attention), the training losses and their logging, the validation loss and
correspondence score (:class:`models.correspondence_metric.CorrespondenceMIoU`), and the
optimizer configuration. What serves the objective without being it lives in callbacks that
the module asks for in :meth:`RefineByAlignModule.configure_callbacks`, so that any Trainer
gets them: the EMA (:mod:`models.ema`) and the validation sample grid
(:mod:`models.sample_grid`). The export at the end of training is train.py's
(:class:`models.checkpoint.ExportAtTrainEnd`); FSDP plumbing is in :mod:`models.distributed`.

Adding a validation-time diagnostic: write a ``pl.Callback`` and list it in
``configs/callbacks/default.yaml`` (or return it from ``configure_callbacks`` when it needs the
model's settings). Its ``on_validation_batch_end(trainer, pl_module, outputs, batch,
batch_idx)`` receives each validation batch (collated, on the device); from
``on_validation_epoch_start`` to ``on_validation_end`` the EMA weights are in ``pl_module``
already (the EMA callback swaps them in at ``on_validation_start`` and back at
``on_validation_end``, also when validation raises), so ``pl_module.model_step(batch, ...)``
there runs the EMA model. Outside validation, ``with models.ema.ema_weights(trainer,
pl_module):`` gives the same. ``ValidationSampleGrid`` is the example: it keeps the first batch
and samples at ``on_validation_epoch_end``, through ``models.distributed.call_with_full_weights``
so that it also works under FSDP (call it on every rank). Log with ``pl_module.log`` /
``log_dict`` (``sync_dist=True`` for per-rank values) or to ``trainer.loggers``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from contextlib import nullcontext
from typing import Any

import pytorch_lightning as pl
import torch
from diffusers import DDPMScheduler, UNet2DConditionModel
from diffusers.schedulers import SchedulerMixin
from torch import nn

from models.attention_capture import capture_cross_attention, cross_attention_blocks
from models.autoencoder import Autoencoder, check_autoencoder
from models.correspondence_metric import BASELINES, KINDS, CorrespondenceMIoU
from models.denoiser import compile_denoiser
from models.distributed import full_state_dict
from models.ema import EMA
from models.losses import (
    attention_alignment_loss,
    diffusion_loss,
    diffusion_target,
    min_snr_weights,
    reference_token_target,
    sample_timesteps,
)
from models.reference_encoder import ReferenceEncoder
from models.refinement import denoiser_input, latent_mask
from models.sample_grid import ValidationSampleGrid

log = logging.getLogger(__name__)
MODES = ("alignment", "refinement")
INFERENCE_PARTS = ("denoiser.", "reference_encoder.")  # what an export holds


class RefineByAlignModule(pl.LightningModule):
    """Trains the inpainting denoiser whose cross-attention reads reference tokens."""

    def __init__(
        self,
        denoiser: UNet2DConditionModel,
        reference_encoder: ReferenceEncoder,
        autoencoder: Autoencoder,
        noise_scheduler: DDPMScheduler,
        sampling_scheduler: SchedulerMixin,
        optimizer: Callable[..., torch.optim.Optimizer],
        lr_scheduler: Callable[..., Any] | None = None,
        cond_dropout: float = 0.1,
        masked_region_weight: float = 1.0,
        timestep_low_fraction: float = 0.0,
        timestep_low_max: int = 200,
        snr_gamma: float | None = None,
        attn_loss_weight: float = 0.0,
        attn_loss_blocks: Sequence[int] | None = None,
        ema_decay: float | None = 0.999,
        ema_restart_warmup: bool = False,
        val_timestep: int = 300,
        val_block: int = 0,
        val_threshold: float = 0.5,
        val_sample_steps: int | None = None,
        val_num_samples: int = 4,
        val_guidance_scale: float | None = None,
        val_sampler: str | None = None,
        compile_denoiser: bool | str = False,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(
            ignore=["denoiser", "reference_encoder", "autoencoder", "noise_scheduler",
                    "sampling_scheduler", "optimizer", "lr_scheduler"]
        )
        self.denoiser = denoiser
        self.reference_encoder = reference_encoder
        self.autoencoder = autoencoder.requires_grad_(False)
        self.noise_scheduler = noise_scheduler
        self.sampling_scheduler = sampling_scheduler
        self.optimizer_factory = optimizer
        self.lr_scheduler_factory = lr_scheduler

        self.blocks = cross_attention_blocks(denoiser)
        # a single reference token (CLS only, Paint-by-Example style) has no spatial map
        self.has_token_grid = reference_encoder.grid != (1, 1)
        if not self.has_token_grid and attn_loss_weight > 0:
            log.warning("one reference token: no correspondence map, attention loss disabled")
            self.hparams.attn_loss_weight = 0.0
        if not 0 <= val_block < len(self.blocks):
            raise ValueError(f"val_block {val_block} outside 0..{len(self.blocks) - 1}")
        self.attn_loss_blocks = (
            list(range(len(self.blocks))) if attn_loss_blocks is None else list(attn_loss_blocks)
        )
        self.val_correspondence = CorrespondenceMIoU(
            [b.index for b in self.blocks], reference_encoder.grid,
            reference_encoder.num_prefix_tokens, val_threshold)
        self.val_table: dict[str, Any] = {}
        self.val_step = -1  # global step of the last completed validation
        self.loss_terms: dict[str, torch.Tensor] = {}
        self._callbacks: list[pl.Callback] | None = None

    def setup(self, stage: str) -> None:
        # in place: parameter names (checkpoints, EMA, export) stay those of the eager module
        scope = self.hparams.compile_denoiser
        if scope and stage == "fit":
            compile_denoiser(self.denoiser, "full" if scope is True else scope)

    def trainable_parameters(self) -> list[nn.Parameter]:
        params = list(self.denoiser.parameters()) + list(self.reference_encoder.parameters())
        return [p for p in params if p.requires_grad]

    # --- training -------------------------------------------------------------------------
    def model_step(
        self, batch: dict[str, torch.Tensor], generator: torch.Generator | None = None,
        capture_blocks: Sequence[int] | None = None, timesteps: torch.Tensor | None = None,
        drop: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """One denoising forward; returns per-sample losses and any captured attention."""
        mask, reference = batch["mask"], batch["reference"]
        latents, masked_latent = self.encode_inputs(batch)
        mask_lat = latent_mask(mask, latents.shape[-2:])
        noise = _randn(latents, generator)
        if timesteps is None:
            timesteps = sample_timesteps(
                latents.shape[0], self.noise_scheduler.config.num_train_timesteps, self.device,
                self.hparams.timestep_low_fraction, self.hparams.timestep_low_max)
        noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)
        context = self.reference_encoder(reference, drop)

        capture = (
            capture_cross_attention(self.denoiser, mask, capture_blocks)
            if capture_blocks
            else nullcontext({})
        )
        with capture as attention:
            pred = self.denoiser(
                denoiser_input(noisy, masked_latent, mask_lat), timesteps,
                encoder_hidden_states=context,
            ).sample
        goal = diffusion_target(self.noise_scheduler, latents, noise, timesteps)
        loss = diffusion_loss(pred, goal, mask_lat, self.hparams.masked_region_weight)
        if self.hparams.snr_gamma:
            loss = loss * min_snr_weights(self.noise_scheduler, timesteps, self.hparams.snr_gamma)
        return {"diffusion": loss, "attention": dict(attention)}

    @torch.no_grad()
    def encode_inputs(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(target latent, masked-image latent): read from latent shards, or encoded here."""
        if "latents" not in batch:
            target, mask = batch["target"], batch["mask"]
            return self.autoencoder.encode(target), self.autoencoder.encode(target * (1 - mask))
        latents, masked = batch["latents"], batch["masked_latents"]
        ae, size = self.autoencoder, batch["mask"].shape[-1]
        expected = (ae.latent_channels, size // ae.downsample, size // ae.downsample)
        if tuple(latents.shape[1:]) != expected or masked.shape != latents.shape:
            raise ValueError(
                f"precomputed latents {tuple(latents.shape[1:])} / {tuple(masked.shape[1:])} "
                f"do not fit this model's autoencoder at {size} px (expected {expected})")
        return latents, masked

    def on_train_start(self) -> None:
        manifest = getattr(self.trainer.datamodule, "latent_manifest", None)
        if manifest is not None:
            check_autoencoder(manifest["autoencoder"], self.autoencoder)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        batch_size = len(batch["mode"])
        drop = torch.rand(batch_size, device=self.device) < self.hparams.cond_dropout
        use_attn = self.hparams.attn_loss_weight > 0
        out = self.model_step(
            batch, capture_blocks=self.attn_loss_blocks if use_attn else None, drop=drop
        )
        loss = out["diffusion"].mean()
        self.loss_terms = {"diffusion": loss.detach()}  # this step's terms, for StopOnNonFinite
        self.log("train/loss_diffusion", loss, prog_bar=True, batch_size=batch_size)
        for code, name in enumerate(MODES):
            chosen = batch["mode"] == code
            if chosen.any():
                self.loss_terms[name] = out["diffusion"][chosen].mean().detach()
                self.log(f"train/loss_{name}", self.loss_terms[name],
                         batch_size=int(chosen.sum()))
        if use_attn:
            attn_loss = self.alignment_loss(out["attention"], batch, ~drop)
            if attn_loss is not None:
                self.loss_terms["attention"] = attn_loss.detach()
                self.log("train/loss_attention", attn_loss, prog_bar=True, batch_size=batch_size)
                loss = loss + self.hparams.attn_loss_weight * attn_loss
        self.log("train/loss", loss, batch_size=batch_size)
        return loss

    def alignment_loss(
        self, attention: dict[int, torch.Tensor], batch: dict[str, torch.Tensor],
        kept: torch.Tensor,
    ) -> torch.Tensor | None:
        """Cross-entropy of the masked-query attention against the ground-truth region."""
        chosen = (batch["mode"] == 0) & kept & (batch["reference_mask"].flatten(1).sum(1) > 0)
        if not chosen.any():
            return None
        enc = self.reference_encoder
        goal = reference_token_target(batch["reference_mask"][chosen], enc.grid,
                                      enc.num_prefix_tokens)
        losses = [attention_alignment_loss(attention[b][chosen], goal) for b in attention]
        return torch.stack(losses).mean()

    # --- validation -----------------------------------------------------------------------
    def on_validation_epoch_start(self) -> None:
        # Fresh, process-private metric states. torchmetrics states are neither parameters nor
        # buffers, so a CPU ddp_spawn launch (whose arguments travel through shared memory)
        # leaves them shared by every rank: each rank would accumulate every rank's updates,
        # and the first validation would be right with or without the cross-rank sync.
        self.val_correspondence.reset()

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        batch_size = batch["target"].shape[0]
        generator = torch.Generator(device="cpu").manual_seed(self.hparams.seed + batch_idx)
        timesteps = torch.full((batch_size,), self.hparams.val_timestep, device=self.device)
        capture = list(range(len(self.blocks))) if self.has_token_grid else None
        out = self.model_step(batch, generator, capture, timesteps)
        self.log("val/loss", out["diffusion"].mean(), batch_size=batch_size, sync_dist=True)
        aligned = batch["mode"] == 0
        if aligned.any() and self.has_token_grid:
            self.val_correspondence.update(
                {index: vectors[aligned] for index, vectors in out["attention"].items()},
                batch["mask"][aligned], batch["reference_mask"][aligned])

    def on_validation_epoch_end(self) -> None:
        self.val_step = self.global_step
        if not self.has_token_grid:
            return
        scores = self.val_correspondence.compute()
        self.val_correspondence.reset()
        per_block, baselines = scores["blocks"], scores["baselines"]
        best = max(per_block, key=lambda i: per_block[i]["mask"])
        chosen = per_block[self.hparams.val_block]
        logged = {
            "val/miou_mask": chosen["mask"], "val/miou_box": chosen["box"],
            "val/best_block": float(best), "val/best_miou_mask": per_block[best]["mask"],
            **{f"val/miou_{kind}_block{i}": v[kind] for i, v in per_block.items()
               for kind in KINDS},
            **{f"val/baseline_{n}_{k}": v[k] for n, v in baselines.items() for k in v},
        }
        self.log_dict(logged)
        self.val_table = val_table_from_metrics(logged, self.hparams.val_timestep)

    # --- optimisation, callbacks, export --------------------------------------------------
    def configure_optimizers(self) -> Any:
        optimizer = self.optimizer_factory(params=self.trainable_parameters())
        if self.lr_scheduler_factory is None:
            return optimizer
        scheduler = self.lr_scheduler_factory(optimizer=optimizer)
        return {"optimizer": optimizer,
                "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def configure_callbacks(self) -> list[pl.Callback]:
        """The validation sample grid and, with ``ema_decay``, the EMA. Built once, so that a
        ``trainer.validate`` after ``fit`` finds the EMA that fit averaged."""
        if self._callbacks is None:
            hp = self.hparams
            self._callbacks = [ValidationSampleGrid(hp.val_num_samples, hp.val_sample_steps,
                                                    hp.val_guidance_scale, hp.seed,
                                                    hp.val_sampler)]
            if hp.ema_decay:
                self._callbacks.append(EMA(hp.ema_decay, hp.ema_restart_warmup))
        return self._callbacks

    def inference_state_dict(self) -> dict[str, torch.Tensor]:
        """CPU copies of the denoiser and reference-encoder weights in place now: wrap the
        call in ``models.ema.ema_weights`` for the EMA ones (what an export holds).

        Under FSDP a collective that every rank must call: the whole weights are gathered to
        global rank 0 and the other ranks get an empty dict.
        """
        return full_state_dict(self, INFERENCE_PARTS)


def val_table_from_metrics(metrics: Mapping[str, float], timestep: int) -> dict[str, Any]:
    """The per-block validation table rebuilt from logged metrics, for a process that never
    held the module that validated (the parent of a ddp_spawn launch); {} without them."""
    prefix = "val/miou_mask_block"
    blocks = sorted(int(k[len(prefix):]) for k in metrics if k.startswith(prefix))
    if not blocks:
        return {}
    kinds = ("mask", "box")
    return {
        "timestep": timestep,
        "blocks": {i: {k: metrics[f"val/miou_{k}_block{i}"] for k in kinds} for i in blocks},
        "baselines": {n: {k: metrics[f"val/baseline_{n}_{k}"] for k in kinds} for n in BASELINES},
        "best_block": int(metrics["val/best_block"]),
    }


def _randn(like: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Noise drawn on the CPU when seeded, so that fixed seeds agree across devices."""
    if generator is None:
        return torch.randn_like(like)
    return torch.randn(like.shape, generator=generator, dtype=like.dtype).to(like.device)
