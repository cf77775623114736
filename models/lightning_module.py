"""LightningModule: reference-guided object-completion training over the two data modes.

It receives built components (denoiser, reference encoder, autoencoder, schedulers) and only
wires the training objective, EMA, validation metrics and sample grids.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from typing import Any

import pytorch_lightning as pl
import torch
from diffusers import DDPMScheduler, UNet2DConditionModel
from diffusers.schedulers import SchedulerMixin
from diffusers.training_utils import EMAModel
from torch import nn
from torchmetrics import MeanMetric

from models.attention_capture import capture_cross_attention, cross_attention_blocks
from models.autoencoder import Autoencoder, check_autoencoder
from models.correspondence import baseline_scores, correspondence_scores
from models.denoiser import compile_denoiser
from models.losses import (
    attention_alignment_loss,
    diffusion_loss,
    diffusion_target,
    min_snr_weights,
    reference_token_target,
    sample_timesteps,
)
from models.reference_encoder import ReferenceEncoder
from models.refinement import denoiser_input, latent_mask, sample_inpaint

log = logging.getLogger(__name__)
MODES = ("alignment", "refinement")
BASELINES = ("whole_reference", "same_position_box")


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
        val_timestep: int = 300,
        val_block: int = 0,
        val_threshold: float = 0.5,
        val_sample_steps: int = 20,
        val_num_samples: int = 4,
        val_guidance_scale: float = 2.0,
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
        self.ema = (
            # foreach: one multi-tensor kernel per step instead of ~3 per parameter tensor
            EMAModel(self.trainable_parameters(), decay=ema_decay, use_ema_warmup=True,
                     foreach=True)
            if ema_decay
            else None
        )
        self.val_miou = nn.ModuleDict(
            {f"{kind}_{b.index}": MeanMetric() for b in self.blocks for kind in ("mask", "box")}
        )
        self.val_baselines = nn.ModuleDict(
            {f"{name}_{kind}": MeanMetric() for name in BASELINES for kind in ("mask", "box")}
        )
        self.val_table: dict[str, Any] = {}
        self.val_step = -1  # global step of the last completed validation
        self.loss_terms: dict[str, torch.Tensor] = {}
        self._val_batch: dict[str, torch.Tensor] | None = None

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

    def on_fit_start(self) -> None:
        if self.ema is not None:
            self.ema.to(self.device)
            # process-private copies: a CPU ddp_spawn launch shares them between ranks
            self.ema.shadow_params = [p.clone() for p in self.ema.shadow_params]

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        # here, not in on_train_batch_end: ModelCheckpoint saves in the callbacks' batch-end
        # hook, which runs before the module's, so a step checkpoint would hold the EMA of
        # the previous step; and with gradient accumulation the EMA follows optimizer steps
        super().optimizer_step(*args, **kwargs)
        if self.ema is not None:
            self.ema.step(self.trainable_parameters())

    # --- validation -----------------------------------------------------------------------
    @contextmanager
    def ema_weights(self):
        """Temporarily swap in the EMA weights (no-op without EMA)."""
        if self.ema is None:
            yield
            return
        params = self.trainable_parameters()
        self.ema.to(self.device)
        self.ema.store(params)
        self.ema.copy_to(params)
        try:
            yield
        finally:
            self.ema.restore(params)

    def on_validation_epoch_start(self) -> None:
        # Fresh, process-private metric states. torchmetrics states are neither parameters nor
        # buffers, so a CPU ddp_spawn launch (whose arguments travel through shared memory)
        # leaves them shared by every rank: each rank would accumulate every rank's updates,
        # and the first validation would be right with or without the cross-rank sync.
        for metric in [*self.val_miou.values(), *self.val_baselines.values()]:
            metric.reset()
        self._ema_context = self.ema_weights()
        self._ema_context.__enter__()

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        batch_size = batch["target"].shape[0]
        generator = torch.Generator(device="cpu").manual_seed(self.hparams.seed + batch_idx)
        timesteps = torch.full((batch_size,), self.hparams.val_timestep, device=self.device)
        capture = list(range(len(self.blocks))) if self.has_token_grid else None
        out = self.model_step(batch, generator, capture, timesteps)
        self.log("val/loss", out["diffusion"].mean(), batch_size=batch_size, sync_dist=True)
        if batch_idx == 0:
            self._val_batch = {k: v[: self.hparams.val_num_samples] for k, v in batch.items()}

        aligned = batch["mode"] == 0
        if not (aligned.any() and self.has_token_grid):
            return
        enc = self.reference_encoder
        ref_mask = batch["reference_mask"][aligned]
        for index, vectors in out["attention"].items():
            scores = correspondence_scores(vectors[aligned], ref_mask, enc.grid,
                                           enc.num_prefix_tokens, self.hparams.val_threshold)
            for kind in ("mask", "box"):
                self.val_miou[f"{kind}_{index}"].update(scores[kind])
        for name, scores in baseline_scores(batch["mask"][aligned], ref_mask).items():
            for kind in ("mask", "box"):
                self.val_baselines[f"{name}_{kind}"].update(scores[kind])

    def on_validation_epoch_end(self) -> None:
        if not self.has_token_grid:
            self._finish_validation()
            return
        per_block = {
            b.index: {kind: float(self.val_miou[f"{kind}_{b.index}"].compute())
                      for kind in ("mask", "box")}
            for b in self.blocks
        }
        baselines = {
            name: {kind: float(self.val_baselines[f"{name}_{kind}"].compute())
                   for kind in ("mask", "box")}
            for name in BASELINES
        }
        for metric in [*self.val_miou.values(), *self.val_baselines.values()]:
            metric.reset()
        best = max(per_block, key=lambda i: per_block[i]["mask"])
        chosen = per_block[self.hparams.val_block]
        logged = {
            "val/miou_mask": chosen["mask"], "val/miou_box": chosen["box"],
            "val/best_block": float(best), "val/best_miou_mask": per_block[best]["mask"],
            **{f"val/miou_{kind}_block{i}": v[kind] for i, v in per_block.items()
               for kind in ("mask", "box")},
            **{f"val/baseline_{n}_{k}": v[k] for n, v in baselines.items() for k in v},
        }
        self.log_dict(logged)
        self.val_table = val_table_from_metrics(logged, self.hparams.val_timestep)
        self._finish_validation()

    def _finish_validation(self) -> None:
        self.val_step = self.global_step
        if self._val_batch is not None and not self.trainer.sanity_checking:
            self.log_sample_grid(self._val_batch)  # on every rank (a collective under FSDP)
        self._val_batch = None
        self._ema_context.__exit__(None, None, None)

    @torch.no_grad()
    def log_sample_grid(self, batch: dict[str, torch.Tensor]) -> None:
        """Log rows of (target, mask, reference, prediction) to every logger that takes images."""
        from torchvision.utils import make_grid

        pred = self.call_with_full_weights("sample_predictions", batch)
        # float32: under FSDP with bf16 the batch (cast by the root's forward) and pred are bf16
        target, mask, reference, pred = (x.float() for x in (
            batch["target"], batch["mask"], batch["reference"], pred))
        size = target.shape[-2:]
        resize = torch.nn.functional.interpolate
        columns = [
            (target + 1) / 2,
            mask.expand(-1, 3, -1, -1),
            resize(reference, size=size, mode="bilinear", antialias=True),
            (pred + 1) / 2,
        ]
        grid = make_grid(torch.stack(columns, 1).flatten(0, 1), nrow=4).clamp(0, 1)
        for logger in self.loggers:
            log_image = getattr(logger, "log_image", None)
            experiment = getattr(logger, "experiment", None)
            if log_image is not None:
                log_image("val/samples", [grid], step=self.global_step)
            elif hasattr(experiment, "add_image"):
                experiment.add_image("val/samples", grid, self.global_step)
            elif getattr(logger, "log_dir", None):
                from pathlib import Path

                from torchvision.utils import save_image

                out = Path(logger.log_dir) / "samples"
                out.mkdir(parents=True, exist_ok=True)
                save_image(grid, out / f"step{self.global_step:07d}.png")

    @torch.no_grad()
    def sample_predictions(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The sample grid's inpainted targets (in [-1, 1]), with a fixed seed."""
        generator = torch.Generator(device="cpu").manual_seed(self.hparams.seed)
        context = self.reference_encoder(batch["reference"])
        return sample_inpaint(
            self.denoiser, self.autoencoder, self.sampling_scheduler, batch["target"],
            batch["mask"], context, self.reference_encoder.null(len(context)),
            self.hparams.val_sample_steps, self.hparams.val_guidance_scale, generator,
        )

    # --- sharded weights (FSDP) -----------------------------------------------------------
    def fsdp_root(self) -> Any:
        """The FSDP wrapper that shards this module's weights, or None (no trainer, no FSDP)."""
        from torch.distributed.fsdp import FullyShardedDataParallel

        model = self._trainer.strategy.model if self._trainer is not None else None
        return model if isinstance(model, FullyShardedDataParallel) else None

    def call_with_full_weights(self, method: str, *args: Any) -> Any:
        """``getattr(self, method)(*args)`` for code outside a training or validation step.

        Under FSDP the submodules hold only this rank's shards outside a forward of the FSDP
        root, so the call is routed as Lightning routes ``validation_step``: through the root's
        forward (which gathers the weights, in the run's precision) inside the precision
        plugin's step context. That is a collective: every rank must make the same call.
        Without FSDP, a plain call.
        """
        root = self.fsdp_root()
        if root is None:
            return getattr(self, method)(*args)
        strategy = self.trainer.strategy
        with torch.no_grad(), strategy.precision_plugin.val_step_context():
            # Lightning's (private) redirection, the one its FSDP training/validation steps use
            return strategy._forward_redirection(root, self, method, *args)

    # --- optimisation and checkpoints -----------------------------------------------------
    def configure_optimizers(self) -> Any:
        optimizer = self.optimizer_factory(params=self.trainable_parameters())
        if self.lr_scheduler_factory is None:
            return optimizer
        scheduler = self.lr_scheduler_factory(optimizer=optimizer)
        return {"optimizer": optimizer,
                "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.ema is not None:
            checkpoint["ema"] = self.ema.state_dict()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.ema is not None and "ema" in checkpoint:
            self.ema.load_state_dict(checkpoint["ema"])

    def inference_state_dict(self) -> dict[str, torch.Tensor]:
        """Denoiser and reference-encoder weights (EMA if kept) for export.

        Under FSDP a collective that every rank must call: the whole weights are gathered to
        global rank 0 (on the CPU) and the other ranks get an empty dict.
        """
        root = self.fsdp_root()
        gather = nullcontext()
        if root is not None:
            from torch.distributed.fsdp import FullStateDictConfig, StateDictType
            from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

            config = FullStateDictConfig(offload_to_cpu=True, rank0_only=True)
            gather = FSDP.state_dict_type(root, StateDictType.FULL_STATE_DICT, config)
        with self.ema_weights(), gather:
            # copied inside: the state dict's tensors are the parameters, which leaving
            # ema_weights() restores in place to the trained weights
            state = (root or self).state_dict()
            return {k: v.detach().cpu().clone() for k, v in state.items()
                    if k.startswith(("denoiser.", "reference_encoder."))}


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
