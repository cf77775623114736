"""Training losses: the diffusion objective and the optional attention-alignment loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler


def diffusion_target(
    scheduler: DDPMScheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
) -> torch.Tensor:
    """What the UNet predicts: the noise ('epsilon') or the velocity ('v_prediction')."""
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    raise ValueError(f"unsupported prediction_type {kind!r}")


def diffusion_loss(
    prediction: torch.Tensor,
    target: torch.Tensor,
    mask: torch.Tensor,
    masked_region_weight: float = 1.0,
) -> torch.Tensor:
    """Per-sample MSE [B]; pixels inside the (latent-size) mask weigh ``masked_region_weight``."""
    weights = 1.0 + (masked_region_weight - 1.0) * mask
    err = (prediction.float() - target.float()).pow(2) * weights
    return err.flatten(1).sum(1) / weights.expand_as(err).flatten(1).sum(1)


def reference_token_target(
    reference_mask: torch.Tensor, grid: tuple[int, int], num_prefix_tokens: int = 0
) -> torch.Tensor:
    """Ground-truth reference region pooled to the token grid, as a distribution [B, T]."""
    pooled = F.adaptive_avg_pool2d(reference_mask.float(), grid).flatten(1)
    if num_prefix_tokens:
        pooled = F.pad(pooled, (num_prefix_tokens, 0))
    return pooled / pooled.sum(1, keepdim=True).clamp_min(1e-8)


def attention_alignment_loss(
    attention: torch.Tensor, token_target: torch.Tensor, eps: float = 1e-6
) -> torch.Tensor:
    """Per-sample cross-entropy between the target token distribution and the attention [B]."""
    return -(token_target * torch.log(attention.float() + eps)).sum(1)
