"""Autoencoder interface: the diffusers VAE, or pixel space (identity) for tiny models."""

from __future__ import annotations

import logging
from typing import Any

import torch
from diffusers import AutoencoderKL
from torch import nn

from models.hub import require_cached

log = logging.getLogger(__name__)


class PixelSpace(nn.Module):
    """Identity 'autoencoder': the diffusion runs on pixels in [-1, 1]."""

    latent_channels = 3
    downsample = 1

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return images

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return latents

    def fingerprint(self) -> dict[str, Any]:
        """What a latent depends on (stored with precomputed latents)."""
        return autoencoder_fingerprint(self)


class VAE(nn.Module):
    """``AutoencoderKL`` with its scaling factor; encodes to the posterior mean (deterministic)."""

    def __init__(self, vae: AutoencoderKL) -> None:
        super().__init__()
        self.vae = vae.requires_grad_(False)
        self.latent_channels = int(vae.config.latent_channels)
        self.downsample = 2 ** (len(vae.config.block_out_channels) - 1)
        self.scaling_factor = float(vae.config.scaling_factor)

    @classmethod
    def from_pretrained(cls, pretrained: str, subfolder: str | None = "vae") -> VAE:
        require_cached("VAE", pretrained, "set paths.sd15_inpainting=/local/folder",
                       subfolder=subfolder)
        return cls(AutoencoderKL.from_pretrained(pretrained, subfolder=subfolder or None))

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> VAE:
        """Random weights in a given layout: benchmarks and tests at real scale, no files."""
        return cls(AutoencoderKL(**config))

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return self.vae.encode(images).latent_dist.mode() * self.scaling_factor

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(latents / self.scaling_factor).sample.clamp(-1, 1)

    def fingerprint(self) -> dict[str, Any]:
        """What a latent depends on (stored with precomputed latents)."""
        return autoencoder_fingerprint(self)


def build_vae(
    pretrained: str | None = None, subfolder: str | None = "vae",
    config: dict[str, Any] | None = None, downsample: int | None = None,
) -> VAE:
    """The VAE from a local directory or hub id, or randomly initialised from ``config``.

    ``downsample`` states the pixel-to-latent factor the config expects (8 for the SD VAE), so
    that data resolution can be checked before loading; a VAE with another factor is refused.
    """
    if pretrained:
        vae = VAE.from_pretrained(pretrained, subfolder)
    elif config is None:
        raise ValueError("build_vae needs either `pretrained` (path or hub id) or `config`")
    else:
        vae = VAE.from_config(dict(config))
    if downsample is not None and vae.downsample != downsample:
        raise ValueError(f"VAE downsamples by {vae.downsample}, the config's downsample is "
                         f"{downsample} (model.autoencoder.downsample)")
    return vae


Autoencoder = PixelSpace | VAE


def autoencoder_fingerprint(autoencoder: Autoencoder) -> dict[str, Any]:
    """What a latent depends on: the autoencoder's kind, shape, scale and weights' origin."""
    vae = getattr(autoencoder, "vae", None)
    return {
        "kind": type(autoencoder).__name__,
        "latent_channels": int(autoencoder.latent_channels),
        "downsample": int(autoencoder.downsample),
        "scaling_factor": float(getattr(autoencoder, "scaling_factor", 1.0)),
        "name_or_path": str(vae.config.get("_name_or_path", "")) if vae is not None else "",
    }


def check_autoencoder(made_by: dict[str, Any], autoencoder: Autoencoder) -> None:
    """Refuse latents made by an autoencoder of another shape or scale; warn on another origin.

    ``made_by`` is the fingerprint stored with precomputed latents.
    """
    ours = autoencoder_fingerprint(autoencoder)
    for field in ("kind", "latent_channels", "downsample", "scaling_factor"):
        if made_by[field] != ours[field]:
            raise ValueError(
                f"latent shards were made with {field}={made_by[field]!r} but the model's "
                f"autoencoder has {field}={ours[field]!r}; rewrite them with "
                "scripts/make_latent_shards.py and the same model config")
    if made_by["name_or_path"] != ours["name_or_path"]:
        log.warning("latent shards come from autoencoder %r, the model uses %r",
                    made_by["name_or_path"], ours["name_or_path"])
