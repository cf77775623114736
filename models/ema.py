"""Exponential moving average of the trained weights, as a Lightning callback.

:class:`EMA` updates once per optimizer step (not per micro-batch under gradient
accumulation), is saved in and restored from checkpoints under ``checkpoint["ema"]``, and is
swapped into the module for validation and test; :func:`ema_weights` swaps it in anywhere
else (the export at the end of training). Every swap is a context manager that puts the
trained weights back on leaving, error or not, so a failed validation cannot leave the EMA
weights to be trained on.

The module asks for it (``RefineByAlignModule.configure_callbacks``, from ``model.ema_decay``),
so any Trainer that runs the module averages, with or without train.py.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager, nullcontext
from typing import Any

import pytorch_lightning as pl
from diffusers.training_utils import EMAModel

CHECKPOINT_KEY = "ema"


class EMA(pl.Callback):
    """EMA of ``pl_module.trainable_parameters()`` with diffusers' warm-up decay; a warm start
    from an export (:meth:`restart`) averages on at the full decay unless ``restart_warmup``.

    The weights it averages are taken when the trainer sets up (before a checkpoint is
    restored), or by :meth:`track` for use without a trainer (``models.checkpoint``).
    """

    def __init__(self, decay: float, restart_warmup: bool = False) -> None:
        self.decay = decay
        self.restart_warmup = restart_warmup
        self.ema: EMAModel | None = None
        self._swapped = False
        self._open: ExitStack | None = None  # the swap of the running validation or test
        self._seen_step = 0

    def track(self, pl_module: pl.LightningModule) -> EMAModel:
        """Start averaging ``pl_module``'s trainable weights (once); returns the average."""
        if self.ema is None:
            # foreach: one multi-tensor kernel per step instead of ~3 per parameter tensor
            self.ema = EMAModel(pl_module.trainable_parameters(), decay=self.decay,
                                use_ema_warmup=True, foreach=True)
        return self.ema

    def restart(self, pl_module: pl.LightningModule) -> EMAModel:
        """Average afresh from ``pl_module``'s weights as they are now (a warm start).

        With ``restart_warmup`` the decay climbs again from 0 (diffusers' warm-up), so for
        the first thousand steps the average follows the trained weights closely; without
        it, weights that are already an average (an export) are averaged on at the full
        decay from the first step.
        """
        self.ema = None
        average = self.track(pl_module)
        if not self.restart_warmup:
            average.min_decay = self.decay
            average.optimization_step = 1  # step() would give its first update decay 0
        return average

    @contextmanager
    def swapped_in(self, pl_module: pl.LightningModule) -> Iterator[None]:
        """The EMA weights in ``pl_module`` inside the block, the trained ones back after it,
        error or not. A no-op before :meth:`track` and inside another swap."""
        if self.ema is None or self._swapped:
            yield
            return
        params = pl_module.trainable_parameters()
        self.ema.to(pl_module.device)
        self.ema.store(params)
        self.ema.copy_to(params)
        self._swapped = True
        try:
            yield
        finally:
            self._swapped = False
            self.ema.restore(params)

    # --- Lightning hooks ------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.track(pl_module)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.ema.to(pl_module.device)
        # process-private copies: a CPU ddp_spawn launch shares them between ranks
        self.ema.shadow_params = [p.clone() for p in self.ema.shadow_params]

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._seen_step = trainer.global_step  # restored by now when resuming

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        # after each optimizer step, not each micro-batch; before ModelCheckpoint's batch-end
        # save (Lightning runs checkpoint callbacks last), so a step checkpoint holds this
        # step's average
        if trainer.global_step != self._seen_step:
            self._seen_step = trainer.global_step
            self.ema.step(pl_module.trainable_parameters())

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._enter(pl_module)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._leave()

    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._enter(pl_module)

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._leave()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                     exception: BaseException) -> None:
        self._leave()  # a validation that raised: the trained weights go back

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        if self.ema is not None:
            checkpoint[CHECKPOINT_KEY] = self.ema.state_dict()

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        if CHECKPOINT_KEY in checkpoint:
            self.track(pl_module).load_state_dict(checkpoint[CHECKPOINT_KEY])

    def _enter(self, pl_module: pl.LightningModule) -> None:
        self._leave()
        self._open = ExitStack()
        self._open.enter_context(self.swapped_in(pl_module))

    def _leave(self) -> None:
        if self._open is not None:
            self._open, stack = None, self._open
            stack.close()


def ema_callback(trainer: pl.Trainer | None) -> EMA | None:
    """The trainer's :class:`EMA` callback, or None (no trainer, or no EMA kept)."""
    callbacks = trainer.callbacks if trainer is not None else []
    return next((c for c in callbacks if isinstance(c, EMA)), None)


def ema_weights(trainer: pl.Trainer | None, pl_module: pl.LightningModule):
    """Context manager: the EMA weights in ``pl_module`` when the trainer keeps an EMA (a no-op
    otherwise, and inside validation, where they are in place already)."""
    callback = ema_callback(trainer)
    return callback.swapped_in(pl_module) if callback is not None else nullcontext()
