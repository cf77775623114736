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
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from yaml import YAMLError

from models.autoencoder import Autoencoder
from models.reference_encoder import ReferenceEncoder

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_EXPORT = REPO_ROOT / "checkpoints" / "tiny_synthetic"
WEIGHTS, CONFIG = "model.safetensors", "model.yaml"
PIPELINE_INDEX = "model_index.json"
# where an export keeps its diffusers pipeline folder (train.py writes it; eval.py updates its
# alignment.yaml with the export's; the shipped one is checkpoints/tiny_synthetic/diffusers)
DIFFUSERS_SUBDIR = "diffusers"


class ExportError(ValueError):
    """An export that is unreadable, corrupt or non-finite; the message names the file."""


def check_finite(weights: dict[str, torch.Tensor], file: Path) -> None:
    """Refuse NaN or inf weights (a diverged run): they would refine into garbage silently."""
    bad = [k for k, v in weights.items() if v.is_floating_point() and not v.isfinite().all()]
    if bad:
        shown = ", ".join(bad[:5]) + (", ..." if len(bad) > 5 else "")
        raise ExportError(f"{file}: non-finite (NaN/inf) values in {len(bad)} of {len(weights)} "
                          f"tensors ({shown}); the training run diverged")


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
    """Write ``model.safetensors`` and ``model.yaml`` (interpolations resolved) to ``out_dir``;
    refuses non-finite weights."""
    out_dir = Path(out_dir)
    check_finite(state_dict, out_dir / WEIGHTS)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state_dict.items()}, str(out_dir / WEIGHTS))
    OmegaConf.save(model_cfg, out_dir / CONFIG, resolve=True)
    return out_dir


def load_export(path: str | Path | None = None, device: str | torch.device = "cpu") -> Components:
    """Rebuild the components of an export directory (default: the shipped tiny checkpoint):
    ``model.safetensors`` + ``model.yaml``, or a diffusers pipeline folder."""
    path = Path(path) if path else DEFAULT_EXPORT
    if (path / PIPELINE_INDEX).is_file():  # the diffusers folder of scripts/convert_export.py
        from models.diffusers_pipeline import RefineByAlignPipeline

        pipe = RefineByAlignPipeline.from_pretrained(path)
        return pipe.inference_components().to(device).eval()
    if not (path / WEIGHTS).is_file() or not (path / CONFIG).is_file():
        raise FileNotFoundError(f"{path} is not an export: expected {WEIGHTS} and {CONFIG} in it")
    try:
        cfg = OmegaConf.load(path / CONFIG)
    except (YAMLError, UnicodeDecodeError) as err:
        raise ExportError(f"{path / CONFIG}: not a readable model config ({err})") from err
    parts = {name: instantiate(cfg[name]) for name in
             ("denoiser", "reference_encoder", "autoencoder", "noise_scheduler",
              "sampling_scheduler")}
    try:
        weights = load_file(str(path / WEIGHTS))
    except SafetensorError as err:
        raise ExportError(f"{path / WEIGHTS}: unreadable, truncated or corrupt ({err})") from err
    check_finite(weights, path / WEIGHTS)
    for name in ("denoiser", "reference_encoder"):
        prefix = f"{name}."
        own = {k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)}
        try:
            parts[name].load_state_dict(own, strict=True)
        except RuntimeError as err:
            raise ExportError(f"{path / WEIGHTS}: its {name} weights do not fit the model of "
                              f"{path / CONFIG} ({err})") from err
    return Components(**parts, config=cfg).to(device).eval()
