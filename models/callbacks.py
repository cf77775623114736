"""Training callbacks that keep failures loud: a diverged step stops the run (naming the step,
its samples and the loss terms), and samples skipped from bad shards are counted and logged.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import TQDMProgressBar
from pytorch_lightning.callbacks.progress.tqdm_progress import convert_inf
from torch.nn.utils import get_total_norm

from data.modes import MODE_NAMES

log = logging.getLogger(__name__)


class NonFiniteError(RuntimeError):
    """Training produced a NaN or inf loss or gradient."""


def describe_samples(batch: dict[str, Any], limit: int = 16) -> str:
    """'id (mode), ...' for the first `limit` samples: shard keys, else synthetic item numbers."""
    modes = [MODE_NAMES.get(int(m), str(int(m))) for m in batch["mode"]]
    if "__key__" in batch:
        ids = [str(k) for k in batch["__key__"]]
    elif "index" in batch:
        ids = [f"item {int(i)}" for i in batch["index"]]
    else:
        ids = ["(no sample key)"] * len(modes)
    shown = ", ".join(f"{i} ({m})" for i, m in zip(ids[:limit], modes[:limit], strict=True))
    more = len(modes) - limit
    return shown + (f", ... {more} more" if more > 0 else "")


def nonfinite_gradients(module: torch.nn.Module) -> list[str]:
    """Names of parameters whose gradient holds NaN or inf; when all are finite, one fused
    max-norm pass (NaN and inf propagate through it; no overflow) and one device sync."""
    named = [(n, p.grad) for n, p in module.named_parameters() if p.grad is not None]
    if not named or get_total_norm([g for _, g in named], norm_type=math.inf).isfinite():
        return []
    return [n for n, g in named if not g.isfinite().all()]


class StopOnNonFinite(pl.Callback):
    """Stop at the first optimizer step whose loss or gradients are not finite.

    With ``max_skipped_steps`` > 0, up to that many such steps are skipped first (gradients
    dropped, so the optimizer leaves the weights alone) with a warning each. The error names
    the step, the loss terms (``module.loss_terms``), the parameters with bad gradients and
    the batch's samples and modes; the last checkpoint is left as it was, to resume from.
    The decision is taken on every rank at once. Under fp16 loss scaling the scaler already
    skips overflowing steps, so only the loss is checked there.
    """

    def __init__(self, max_skipped_steps: int = 0) -> None:
        if max_skipped_steps < 0:
            raise ValueError(f"max_skipped_steps must be >= 0, got {max_skipped_steps}")
        self.max_skipped_steps = max_skipped_steps
        self.skipped = 0
        self._batch: dict[str, Any] | None = None
        self._bad_loss: str | None = None

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                             batch: dict[str, Any], batch_idx: int) -> None:
        self._batch = batch

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           loss: torch.Tensor) -> None:
        if self._bad_loss is None and not torch.isfinite(loss).all():
            terms = getattr(pl_module, "loss_terms", {})
            named = ", ".join(f"{k}={float(v):.4g}" for k, v in terms.items())
            self._bad_loss = (f"loss {float(loss.detach()):.4g} ({named or 'no terms recorded'}); "
                              f"samples (mode): {describe_samples(self._batch)}")

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                                 optimizer: torch.optim.Optimizer) -> None:
        scaled = getattr(trainer.precision_plugin, "scaler", None) is not None
        grads = [] if scaled or self._bad_loss else nonfinite_gradients(pl_module)
        mine = self._bad_loss is not None or bool(grads)
        if not trainer.strategy.reduce_boolean_decision(mine, all=False):
            return
        parts = []
        if self._bad_loss:
            parts.append(self._bad_loss)
        if grads:
            shown = ", ".join(grads[:5]) + (", ..." if len(grads) > 5 else "")
            parts.append(f"non-finite gradients in {len(grads)} parameters ({shown}); "
                         f"samples (mode): {describe_samples(self._batch)}")
        if not mine:
            parts.append(f"on another rank (this rank, {trainer.global_rank}, was finite)")
        message = f"non-finite training step at global step {trainer.global_step}: " + \
            "; ".join(parts)
        self._bad_loss = None
        self.skipped += 1
        if self.skipped > self.max_skipped_steps:
            raise NonFiniteError(
                f"{message}. Stopped after {self.skipped} such step(s) "
                f"(callbacks.nonfinite.max_skipped_steps={self.max_skipped_steps}); lower "
                "model.optimizer.lr or resume from the last checkpoint (ckpt_path=...)")
        log.warning("skipping %s (%d of at most %d)", message, self.skipped,
                    self.max_skipped_steps)
        if not scaled:  # the scaler skips a non-finite step itself and needs the gradients
            optimizer.zero_grad(set_to_none=True)

    def state_dict(self) -> dict[str, Any]:
        return {"skipped": self.skipped}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.skipped = state_dict["skipped"]


class LogShardSkips(pl.Callback):
    """Log how many shard samples this rank read and skipped (``data.shards.ShardErrors``);
    a no-op for synthetic data."""

    @staticmethod
    def _errors(trainer: pl.Trainer):
        return getattr(trainer.datamodule, "shard_errors", None)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        errors = self._errors(trainer)
        if errors is not None:
            pl_module.log("train/data_skipped", float(errors.skipped), batch_size=1)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        errors = self._errors(trainer)
        if errors is not None and errors.skipped:
            log.warning("rank %d skipped %d unreadable shard sample(s) or shard(s); read %d "
                        "samples (warnings above name them)", trainer.global_rank,
                        errors.skipped, errors.read)


class ResumableProgressBar(TQDMProgressBar):
    """Lightning's bar, which on a mid-epoch resume showed no total and counted the batches
    before the checkpoint as done in this process's first seconds (a rate of thousands of
    batches per second); here it starts at the restored batch with the epoch's total."""

    def on_train_start(self, trainer: pl.Trainer, *args: Any) -> None:
        super().on_train_start(trainer, *args)
        done = trainer.fit_loop.epoch_loop.batch_progress.current.ready
        bar = self.train_progress_bar
        if done and bar is not None:  # Lightning skips on_train_epoch_start here
            whole = trainer.num_training_batches  # the remaining steps may end it earlier:
            bar.reset(total=convert_inf(min(whole, done + self.total_train_batches)))
            bar.initial = bar.n = bar.last_print_n = done  # the rate counts from `initial`
            bar.set_description(f"Epoch {trainer.current_epoch}")
