"""The EMA callback's restart from an export: with diffusers' decay warm-up or at full decay."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from models.ema import CHECKPOINT_KEY, EMA


class Weights(nn.Module):
    """The one method of the LightningModule that the EMA reads."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(3))

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [self.w]


def _train_to(module: Weights, value: float, ema: EMA) -> None:
    with torch.no_grad():
        module.w.fill_(value)
    ema.ema.step(module.trainable_parameters())


def _average(ema: EMA) -> torch.Tensor:
    (shadow,) = ema.ema.shadow_params
    return shadow


def test_full_decay_restart_keeps_the_exported_weights_in_the_average() -> None:
    module, ema = Weights(), EMA(0.9, restart_warmup=False)
    ema.restart(module)  # the export's weights: zeros
    _train_to(module, 1.0, ema)
    _train_to(module, 2.0, ema)
    torch.testing.assert_close(_average(ema), torch.full((3,), 0.9 * 0.1 + 0.1 * 2.0))


def test_warmup_restart_follows_the_trained_weights_at_first() -> None:
    module, ema = Weights(), EMA(0.9, restart_warmup=True)
    ema.restart(module)
    _train_to(module, 1.0, ema)  # decay 0 at the first update: the export is dropped
    _train_to(module, 2.0, ema)
    decay = 1 - 2 ** (-2 / 3)  # diffusers' warm-up at its second update
    torch.testing.assert_close(_average(ema), torch.full((3,), decay * 1.0 + (1 - decay) * 2.0))


@pytest.mark.parametrize("resumed_with_warmup", [True, False])
def test_a_resumed_full_decay_average_stays_at_full_decay(resumed_with_warmup: bool) -> None:
    module, ema = Weights(), EMA(0.9, restart_warmup=False)
    ema.restart(module)
    _train_to(module, 1.0, ema)
    checkpoint: dict = {}
    ema.on_save_checkpoint(None, module, checkpoint)
    resumed = EMA(0.9, restart_warmup=resumed_with_warmup)
    resumed.on_load_checkpoint(None, module, {CHECKPOINT_KEY: {
        k: [t.clone() for t in v] if k == "shadow_params" else v
        for k, v in checkpoint[CHECKPOINT_KEY].items()}})
    _train_to(module, 2.0, resumed)
    torch.testing.assert_close(_average(resumed), torch.full((3,), 0.9 * 0.1 + 0.1 * 2.0))
