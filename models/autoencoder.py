"""Autoencoder interface: the diffusers VAE, or pixel space (identity) for tiny models."""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL
from torch import nn


class PixelSpace(nn.Module):
    """Identity 'autoencoder': the diffusion runs on pixels in [-1, 1]."""

    latent_channels = 3
    downsample = 1

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return images

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return latents


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
        return cls(AutoencoderKL.from_pretrained(pretrained, subfolder=subfolder or None))

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return self.vae.encode(images).latent_dist.mode() * self.scaling_factor

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(latents / self.scaling_factor).sample.clamp(-1, 1)


Autoencoder = PixelSpace | VAE
