"""Shared fixtures: tiny random components in the real layouts, composed configs."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

# Tests never download and never read the user's caches: offline mode, and empty Hugging Face
# and torch.hub caches (pretrained weights load by hub id otherwise; models/hub.py). Set before
# huggingface_hub is imported, which reads them once.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_HOME"] = tempfile.mkdtemp(prefix="rba-test-hf-home-")
os.environ["TORCH_HOME"] = tempfile.mkdtemp(prefix="rba-test-torch-home-")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see train.py
os.environ.setdefault("WANDB_MODE", "offline")

import pytest
import torch
from diffusers import UNet2DConditionModel

import models.config
from tests import public_configs

for _cache in ("HF_HOME", "TORCH_HOME"):
    atexit.register(shutil.rmtree, os.environ[_cache], ignore_errors=True)
CONFIG_DIR = str(Path(__file__).resolve().parents[1] / "configs")


def compose_config(overrides: list[str] | None = None, config_name: str = "train"):
    """Compose a Hydra config outside @hydra.main, with an output dir that needs no run."""
    cfg = models.config.compose_config(overrides or [], config_name)
    cfg.paths.output_dir = str(Path(os.environ.get("PYTEST_TMP", "/tmp")) / "rba-test-run")
    return cfg


def sd15_layout_unet(in_channels: int = 9) -> UNet2DConditionModel:
    """A random UNet from SD-1.5's published config (inpainting: 9 inputs, text-to-image: 4),
    widths shrunk (tests/public_configs.py): 16 cross-attention blocks, context width 768."""
    repo = public_configs.SD15_INPAINTING if in_channels == 9 else public_configs.SD15
    unet = public_configs.unet(repo)
    if unet.config.in_channels != in_channels:
        raise ValueError(f"no public SD-1.5 UNet config with {in_channels} inputs")
    return unet


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


def save_random_pipeline(out: Path, overrides: list[str] | None = None, seed: int = 0) -> Path:
    """A random-weight tiny model written as a pipeline folder (train.py's export path)."""
    from hydra.utils import instantiate

    from models.export import save_pretrained

    cfg = compose_config(overrides)
    torch.manual_seed(seed)
    module = instantiate(cfg.model)
    return save_pretrained(module.inference_state_dict(), cfg.model, out)


@pytest.fixture(scope="session")
def tiny_pipeline_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-weight tiny pipeline folder, uncalibrated (read-only: copy it to change it)."""
    return save_random_pipeline(tmp_path_factory.mktemp("tiny_pipeline"))

