"""Exported models: EMA weights (safetensors) + the resolved model config that rebuilds them.

This is what train.py writes at the end, what ships in ``checkpoints/`` and what eval.py,
scripts/refine.py and the notebook load.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel
from diffusers.schedulers import SchedulerMixin
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from safetensors.torch import load_file, save_file

from models.autoencoder import Autoencoder
from models.reference_encoder import ReferenceEncoder

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_EXPORT = REPO_ROOT / "checkpoints" / "tiny_synthetic"
WEIGHTS, CONFIG = "model.safetensors", "model.yaml"


@dataclass
class Components:
    """Everything inference needs, built and loaded."""

    denoiser: UNet2DConditionModel
    reference_encoder: ReferenceEncoder
    autoencoder: Autoencoder
    noise_scheduler: SchedulerMixin
    sampling_scheduler: SchedulerMixin
    config: DictConfig

    @property
    def image_size(self) -> int:
        """Pixel size the denoiser was built for (latent sample size x autoencoder factor)."""
        sample = int(self.denoiser.config.sample_size)
        return sample * int(getattr(self.autoencoder, "downsample", 1))

    def to(self, device: torch.device | str) -> Components:
        for part in (self.denoiser, self.reference_encoder, self.autoencoder):
            part.to(device)
        return self

    def eval(self) -> Components:
        for part in (self.denoiser, self.reference_encoder, self.autoencoder):
            part.eval().requires_grad_(False)
        return self


def save_export(state_dict: dict[str, torch.Tensor], model_cfg: DictConfig, out_dir: Path) -> Path:
    """Write ``model.safetensors`` and ``model.yaml`` (interpolations resolved) to ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state_dict.items()}, str(out_dir / WEIGHTS))
    OmegaConf.save(model_cfg, out_dir / CONFIG, resolve=True)
    return out_dir


def load_export(path: str | Path | None = None, device: str | torch.device = "cpu") -> Components:
    """Rebuild the components of an export directory (default: the shipped tiny checkpoint)."""
    path = Path(path) if path else DEFAULT_EXPORT
    if not (path / WEIGHTS).is_file() or not (path / CONFIG).is_file():
        raise FileNotFoundError(f"{path} is not an export: expected {WEIGHTS} and {CONFIG} in it")
    cfg = OmegaConf.load(path / CONFIG)
    parts = {name: instantiate(cfg[name]) for name in
             ("denoiser", "reference_encoder", "autoencoder", "noise_scheduler",
              "sampling_scheduler")}
    weights = load_file(str(path / WEIGHTS))
    for name in ("denoiser", "reference_encoder"):
        prefix = f"{name}."
        own = {k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)}
        parts[name].load_state_dict(own, strict=True)
    return Components(**parts, config=cfg).to(device).eval()
