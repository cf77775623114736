"""Shared fixtures: tiny random components in the real layouts, composed configs."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")

import pytest
import torch
from diffusers import UNet2DConditionModel

CONFIG_DIR = str(Path(__file__).resolve().parents[1] / "configs")


def compose_config(overrides: list[str] | None = None, config_name: str = "train"):
    """Compose a Hydra config outside @hydra.main, with an output dir that needs no run."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name, overrides=overrides or [])
    cfg.paths.output_dir = str(Path(os.environ.get("PYTEST_TMP", "/tmp")) / "rba-test-run")
    return cfg


def sd15_layout_unet(in_channels: int = 9, cross_attention_dim: int = 32) -> UNet2DConditionModel:
    """A tiny random UNet with SD-1.5's block layout (16 cross-attention blocks)."""
    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=16,
        in_channels=in_channels,
        out_channels=4,
        block_out_channels=(16, 16, 32, 32),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        layers_per_block=2,
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=2,
        norm_num_groups=8,
    )


@pytest.fixture
def tiny_batch() -> dict[str, torch.Tensor]:
    """A random batch in the data contract, at 32 px with a 224 px reference."""
    g = torch.Generator().manual_seed(0)
    b = 4
    mask = torch.zeros(b, 1, 32, 32)
    mask[:, :, 8:20, 10:22] = 1
    ref_mask = torch.zeros(b, 1, 224, 224)
    ref_mask[:, :, 40:120, 60:150] = 1
    return {
        "target": torch.rand(b, 3, 32, 32, generator=g) * 2 - 1,
        "mask": mask,
        "reference": torch.rand(b, 3, 224, 224, generator=g),
        "reference_mask": ref_mask,
        "mode": torch.tensor([0, 1, 0, 1]),
    }
