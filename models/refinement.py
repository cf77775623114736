"""Refinement stage: guided inpainting sampling from a reference, and blending into the mask."""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    UNet2DConditionModel,
)
from diffusers.schedulers import SchedulerMixin
from diffusers.utils.torch_utils import randn_tensor

from models.autoencoder import Autoencoder, PixelSpace

SAMPLERS: dict[str, type[SchedulerMixin]] = {
    "ddpm": DDPMScheduler, "ddim": DDIMScheduler, "dpm_solver": DPMSolverMultistepScheduler,
}


def resize_mask_tensor(mask: torch.Tensor, size: tuple[int, int], cover: bool) -> torch.Tensor:
    """Binary mask [B,1,H,W] at ``size``, one policy per purpose.

    ``cover=True`` (model inputs): a cell is masked if any pixel under it is, so generated
    content spans the whole original mask. ``cover=False`` (scoring): a cell is masked if at
    least half covered, the faithful shape; a thin mask that would vanish keeps any coverage.
    """
    size = tuple(size)
    if tuple(mask.shape[-2:]) == size:
        return (mask > 0.5).to(mask.dtype)
    m = mask.float()
    if cover:
        shrinking = m.shape[-2] >= size[0] and m.shape[-1] >= size[1]
        m = F.adaptive_max_pool2d(m, size) if shrinking else F.interpolate(m, size=size)
        return (m > 0.5).to(mask.dtype)
    soft = F.interpolate(m, size=size, mode="area")
    half = soft >= 0.5
    return (half if half.any() else soft > 0).to(mask.dtype)


def latent_mask(mask: torch.Tensor, latent_hw: tuple[int, int]) -> torch.Tensor:
    """Pixel mask -> latent grid; a latent cell is masked if any of its pixels is."""
    return resize_mask_tensor(mask, latent_hw, cover=True)


def denoiser_input(
    noisy: torch.Tensor, masked_latent: torch.Tensor, mask_latent: torch.Tensor
) -> torch.Tensor:
    """The 9-channel (for SD) input in SD inpainting's order: noisy latent, mask, masked image.

    The order is the one SD inpainting checkpoints were trained on (and diffusers'
    ``StableDiffusionInpaintPipeline`` builds), so a pretrained ``conv_in`` reads each channel
    as it learned to.
    """
    return torch.cat([noisy, mask_latent.to(noisy.dtype), masked_latent], dim=1)


def build_sampler(
    name: str, training_config: Any, autoencoder: Autoencoder | None = None, **overrides: Any
) -> SchedulerMixin:
    """An inference sampler over the training noise schedule, with sampling conventions.

    The training ``DDPMScheduler`` config carries training defaults (``clip_sample=True``,
    and for DDIM ``set_alpha_to_one=True``, ``steps_offset=0``) that are wrong for SD-1.5
    latents. Samplers here follow SD-1.5's scheduler config: no clipping (latents are not in
    [-1, 1]), the final alpha from the schedule, steps offset by one. Pixel-space models keep
    clipping: their clean sample does live in [-1, 1]. ``overrides`` (scheduler config keys)
    win over both, for sampler experiments.
    """
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; choose one of {sorted(SAMPLERS)}")
    cls = SAMPLERS[name]
    conventions = {
        "clip_sample": isinstance(autoencoder, PixelSpace),
        "set_alpha_to_one": False,
        "steps_offset": 1,
    }
    accepted = inspect.signature(cls.__init__).parameters
    return cls.from_config(
        training_config, **{k: v for k, v in conventions.items() if k in accepted} | overrides
    )


def generators(seed: int | Sequence[int], batch: int
               ) -> torch.Generator | list[torch.Generator]:
    """One CPU generator seeded with ``seed`` for the batch, or one per case from ``batch``
    seeds."""
    if not isinstance(seed, Sequence):
        return torch.Generator().manual_seed(int(seed))
    if len(seed) != batch:
        raise ValueError(f"{len(seed)} seeds for a batch of {batch}")
    return [torch.Generator().manual_seed(int(s)) for s in seed]


@torch.no_grad()
def sample_inpaint(
    denoiser: UNet2DConditionModel,
    autoencoder: Autoencoder,
    scheduler: SchedulerMixin,
    image: torch.Tensor,
    mask: torch.Tensor,
    context: torch.Tensor,
    null_context: torch.Tensor | None = None,
    num_steps: int = 50,
    guidance_scale: float = 1.0,
    generator: torch.Generator | list[torch.Generator] | None = None,
    progress: bool = False,
    final_x0_timestep: int | None = None,
) -> torch.Tensor:
    """Regenerate the masked region of ``image`` [B,3,H,W] in [-1,1] from ``context`` tokens.

    With ``guidance_scale`` != 1 and a ``null_context``, uses classifier-free guidance.
    ``final_x0_timestep`` (None = off, the plain sampler): at the first step whose timestep is
    at or below it, return the denoiser's clean-sample prediction instead of sampling on, for
    a denoiser too weak to remove the last steps' noise.
    ``generator``: one for the batch, or a list of B (CPU) generators, one per case, so that a
    case's noise does not depend on which cases share its batch.
    Returns the full decoded image in [-1,1]; blend it with :func:`blend` to keep the rest.
    """
    masked_latent = autoencoder.encode(image * (1 - mask))
    mask_latent = latent_mask(mask, masked_latent.shape[-2:])
    guided = guidance_scale != 1.0 and null_context is not None
    if guided:
        context = torch.cat([null_context.to(context), context])
        masked_latent_in = torch.cat([masked_latent] * 2)
        mask_in = torch.cat([mask_latent] * 2)
    else:
        masked_latent_in, mask_in = masked_latent, mask_latent

    scheduler.set_timesteps(num_steps, device=image.device)
    latents = randn_tensor(tuple(masked_latent.shape), generator=generator,
                           device=torch.device("cpu"), dtype=torch.float32)
    latents = latents.to(image.device, masked_latent.dtype) * scheduler.init_noise_sigma
    steps = scheduler.timesteps
    if progress:
        from tqdm.auto import tqdm

        steps = tqdm(steps, desc="sampling", leave=False)
    stochastic = "generator" in inspect.signature(scheduler.step).parameters
    for t in steps:
        model_in = scheduler.scale_model_input(latents, t)
        model_in = torch.cat([model_in] * 2) if guided else model_in
        pred = denoiser(
            denoiser_input(model_in, masked_latent_in, mask_in), t, encoder_hidden_states=context
        ).sample
        if guided:
            uncond, cond = pred.chunk(2)
            pred = uncond + guidance_scale * (cond - uncond)
        extra = {"generator": generator} if stochastic else {}
        out = scheduler.step(pred, t, latents, **extra)
        if final_x0_timestep is not None:
            if getattr(out, "pred_original_sample", None) is None:
                raise ValueError(f"final_x0_timestep needs a sampler that returns its clean-"
                                 f"sample prediction; {type(scheduler).__name__} does not")
            if int(t) <= final_x0_timestep:
                latents = out.pred_original_sample
                break
        latents = out.prev_sample
    return autoencoder.decode(latents).clamp(-1, 1)


def blend_weights(mask: torch.Tensor, dilate: int = 0, feather: int = 0) -> torch.Tensor:
    """Soft blending weights in [0,1] that are exactly 0 outside the dilated mask."""
    hard = (mask > 0.5).float()
    if dilate > 0:
        hard = F.max_pool2d(hard, 2 * dilate + 1, stride=1, padding=dilate)
    if feather <= 0:
        return hard
    kernel = 2 * feather + 1
    soft = F.avg_pool2d(F.pad(hard, [feather] * 4, mode="replicate"), kernel, stride=1)
    return torch.where(hard > 0, soft.clamp(min=0.5), torch.zeros_like(soft))


def blend(
    original: torch.Tensor,
    generated: torch.Tensor,
    mask: torch.Tensor,
    dilate: int = 0,
    feather: int = 0,
) -> torch.Tensor:
    """Paste ``generated`` into ``original`` inside the (dilated, feathered) mask only.

    Pixels with zero weight are copied from ``original`` bit for bit.
    """
    weights = blend_weights(mask, dilate, feather).to(original.dtype)
    mixed = original * (1 - weights) + generated.to(original.dtype) * weights
    return torch.where(weights > 0, mixed, original)
