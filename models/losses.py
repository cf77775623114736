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


def sample_timesteps(
    batch_size: int, num_train_timesteps: int, device: torch.device,
    low_fraction: float = 0.0, low_max: int = 200, generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Training timesteps: uniform, with ``low_fraction`` of the batch drawn below ``low_max``.

    The last sampling steps decide the final pixels; under uniform sampling only
    ``low_max / T`` of the samples train them.
    """
    if not 0.0 <= low_fraction <= 1.0:
        raise ValueError(f"timestep low_fraction {low_fraction} is not in [0, 1]")
    if not 0 < low_max <= num_train_timesteps:
        raise ValueError(f"timestep low_max {low_max} is not in 1..{num_train_timesteps}")
    uniform = torch.randint(0, num_train_timesteps, (batch_size,), device=device,
                            generator=generator)
    if low_fraction == 0.0:
        return uniform
    low = torch.randint(0, low_max, (batch_size,), device=device, generator=generator)
    pick = torch.rand(batch_size, device=device, generator=generator) < low_fraction
    return torch.where(pick, low, uniform)


def min_snr_weights(scheduler: DDPMScheduler, timesteps: torch.Tensor, gamma: float
                    ) -> torch.Tensor:
    """Min-SNR-gamma loss weights (Hang et al. 2023) for the scheduler's prediction target [B].

    In x0 terms the weight is min(SNR, gamma); divided by what the target's MSE already
    carries (SNR for epsilon, SNR + 1 for v).
    """
    alphas = scheduler.alphas_cumprod.to(timesteps.device)[timesteps].float()
    snr = alphas / (1 - alphas)
    clipped = snr.clamp(max=gamma)
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return clipped / snr
    if kind == "v_prediction":
        return clipped / (snr + 1)
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
