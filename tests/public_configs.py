"""Models built from the public checkpoints' own config files (random weights).

Tests of the real-scale path build from ``tests/fixtures/public_configs`` (see its README):
the values of ``runwayml/stable-diffusion-inpainting``, ``runwayml/stable-diffusion-v1-5`` and
``facebook/dinov2-large``. To run on CPU, ``shrink`` changes only fields that do not change
behaviour: UNet and VAE widths (``block_out_channels``) and the depth of the DINOv2 stack.
Block layout and count, ``layers_per_block``, heads, ``in_channels``, ``cross_attention_dim``,
patch size, ``image_size`` and every scheduler value stay as published.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from transformers import BitImageProcessor, Dinov2Config, Dinov2Model

ROOT = Path(__file__).resolve().parent / "fixtures" / "public_configs"
SD15_INPAINTING = ROOT / "sd15_inpainting"
SD15 = ROOT / "sd15"
DINOV2_LARGE = ROOT / "dinov2_large"

SHRUNK_UNET = {"block_out_channels": [32, 64, 128, 128]}  # SD: [320, 640, 1280, 1280]
SHRUNK_VAE = {"block_out_channels": [32, 64, 64, 64]}  # SD: [128, 256, 512, 512]
SHRUNK_DINOV2 = {"num_hidden_layers": 2}  # DINOv2-L: 24


def public_config(path: Path) -> dict[str, Any]:
    """A published config.json without its bookkeeping keys (``_class_name``, ...)."""
    return {k: v for k, v in json.loads(path.read_text()).items() if not k.startswith("_")}


def unet(repo: Path = SD15_INPAINTING, shrink: bool = True, seed: int = 0
         ) -> UNet2DConditionModel:
    cfg = public_config(repo / "unet" / "config.json") | (SHRUNK_UNET if shrink else {})
    torch.manual_seed(seed)
    return UNet2DConditionModel.from_config(cfg)


def vae(shrink: bool = True, seed: int = 0) -> AutoencoderKL:
    cfg = public_config(SD15_INPAINTING / "vae" / "config.json") | (SHRUNK_VAE if shrink else {})
    torch.manual_seed(seed)
    return AutoencoderKL.from_config(cfg)


def scheduler_config(repo: Path = SD15_INPAINTING) -> Any:
    """The published scheduler config as diffusers loads it (class defaults filled in)."""
    return DDIMScheduler.from_pretrained(repo, subfolder="scheduler").config


def dinov2_config(shrink: bool = True) -> Dinov2Config:
    cfg = public_config(DINOV2_LARGE / "config.json") | (SHRUNK_DINOV2 if shrink else {})
    return Dinov2Config(**cfg)


def dinov2(shrink: bool = True, seed: int = 0) -> Dinov2Model:
    torch.manual_seed(seed)
    return Dinov2Model(dinov2_config(shrink)).eval()


def dinov2_processor() -> BitImageProcessor:
    return BitImageProcessor.from_pretrained(DINOV2_LARGE)


def save_sd15_repo(root: Path, repo: Path = SD15_INPAINTING) -> Path:
    """A random SD-1.5 checkpoint folder in diffusers' layout (unet, vae, scheduler)."""
    unet(repo).save_pretrained(root / "unet")
    vae().save_pretrained(root / "vae")
    DDIMScheduler.from_config(scheduler_config(repo)).save_pretrained(root / "scheduler")
    return root


def save_dinov2_repo(root: Path) -> Path:
    """A random DINOv2-L checkpoint folder (shrunk depth) with its image processor."""
    dinov2().save_pretrained(root)
    dinov2_processor().save_pretrained(root)
    return root
