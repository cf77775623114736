"""Alignment stage: where on the reference does the masked content live?

One denoiser forward at timestep t with the whole reference as context; the masked-query
cross-attention of block l becomes a map over the reference tokens, then a region and a box.
The same forward captures any set of blocks, so the calibration sweep costs one forward per
(case batch, timestep), never one per block. The pipeline (models/pipeline.py) composes the
steps for one case: :func:`attention_vectors`, then :func:`from_vector` (:func:`postprocess`,
:func:`crop`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel
from diffusers.schedulers import SchedulerMixin

from data.modes import INFERENCE_CROP_MARGIN, square_crop
from models.attention_capture import capture_cross_attention
from models.autoencoder import Autoencoder
from models.correspondence import (
    boxes_to_masks,
    heatmap,
    mask_boxes,
    threshold_region,
    tokens_to_grid,
)
from models.refinement import build_sampler, denoiser_input, latent_mask

READOUTS = ("forward_noise", "trajectory")


def case_noise_seed(seed: int, case_id: str | int) -> int:
    """The noise seed of case ``case_id`` under seed ``seed`` (the sweep, refinement, the
    denoising gain): a function of the case alone, so it does not depend on batching, on run
    order or on the other cases."""
    digest = hashlib.sha256(f"{int(seed)}/{case_id}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1  # < 2**63


def case_noise(
    shape: torch.Size, generator: torch.Generator | None = None,
    noise_seeds: Sequence[int] | None = None,
) -> torch.Tensor:
    """Standard normal noise of ``shape`` [B, ...] on the CPU: from ``generator``, or row by
    row from ``noise_seeds`` so that a case's noise does not depend on its batch."""
    if noise_seeds is None:
        return torch.randn(shape, generator=generator, dtype=torch.float32)
    if len(noise_seeds) != shape[0]:
        raise ValueError(f"{len(noise_seeds)} noise seeds for a batch of {shape[0]}")
    return torch.stack([torch.randn(shape[1:], generator=torch.Generator().manual_seed(int(s)))
                        for s in noise_seeds])


@torch.no_grad()
def attention_vectors(
    unet: UNet2DConditionModel,
    autoencoder: Autoencoder,
    scheduler: SchedulerMixin,
    image: torch.Tensor,
    mask: torch.Tensor,
    context: torch.Tensor,
    timesteps: Sequence[int],
    blocks: Sequence[int] | None = None,
    generator: torch.Generator | None = None,
    noise_seeds: Sequence[int] | None = None,
    readout: str = "forward_noise",
    num_steps: int = 50,
) -> dict[int, dict[int, torch.Tensor]]:
    """Masked-query attention over reference tokens: {timestep: {block: [B, tokens]}}.

    ``scheduler`` is the training noise schedule (a pipeline's ``scheduler``). Two read-outs
    of A[t, l], one denoiser forward per requested timestep either way:

    - ``forward_noise`` (DIFT-like): ``image`` [B,3,H,W] in [-1,1] is noised to each timestep
      with the same noise, so timesteps differ only by noise level.
    - ``trajectory`` (Algorithm 1): DDIM sampling from z_T ~ N(0, I) with the masked-image
      conditioning and ``context``, over a ``num_steps`` schedule (the sampler's, noisiest
      first); the maps are read along the way and sampling stops at the cleanest requested
      timestep. Every requested timestep must lie on that schedule.
    """
    if readout not in READOUTS:
        raise ValueError(f"unknown read-out {readout!r}; choose one of {READOUTS}")
    ae = autoencoder
    masked_latent = ae.encode(image * (1 - mask))
    mask_lat = latent_mask(mask, masked_latent.shape[-2:])
    noise = case_noise(masked_latent.shape, generator, noise_seeds).to(masked_latent.device,
                                                                       masked_latent.dtype)
    wanted = {int(t) for t in timesteps}
    out: dict[int, dict[int, torch.Tensor]] = {}

    def forward(noisy: torch.Tensor, t: int, maps: dict[int, torch.Tensor]) -> torch.Tensor:
        t_batch = torch.full((image.shape[0],), t, device=image.device, dtype=torch.long)
        pred = unet(denoiser_input(noisy, masked_latent, mask_lat), t_batch,
                    encoder_hidden_states=context).sample
        if t in wanted:
            out[t] = {b: v.clone() for b, v in maps.items()}
        return pred

    with capture_cross_attention(unet, mask, blocks) as maps:
        if readout == "forward_noise":
            latents = ae.encode(image)
            for t in dict.fromkeys(int(t) for t in timesteps):
                t_batch = torch.full((image.shape[0],), t, device=image.device)
                forward(scheduler.add_noise(latents, noise, t_batch), t, maps)
        else:
            sampler = build_sampler("ddim", scheduler.config, ae)
            sampler.set_timesteps(num_steps, device=image.device)
            schedule = [int(t) for t in sampler.timesteps]
            off = sorted(wanted - set(schedule))
            if off:
                raise ValueError(f"timesteps {off} are not on the {num_steps}-step DDIM "
                                 f"trajectory {schedule}")
            z = noise * sampler.init_noise_sigma
            for t in schedule[: schedule.index(min(wanted)) + 1]:
                pred = forward(sampler.scale_model_input(z, t), t, maps)
                z = sampler.step(pred, t, z).prev_sample
    return {int(t): out[int(t)] for t in timesteps}


@dataclass
class Alignment:
    """The alignment stage's answer for one case, on the reference's own pixel grid."""

    vector: torch.Tensor  # [tokens] attention over reference tokens
    heat: torch.Tensor  # [H, W] normalised map in [0, 1]
    region: torch.Tensor  # [H, W] bool, thresholded map
    box: tuple[int, int, int, int]  # (x0, y0, x1, y1) square crop box around the region
    crop: torch.Tensor  # [3, h, w] the reference inside ``box``, in [0, 1]


def postprocess(
    vectors: torch.Tensor,
    grid: tuple[int, int],
    num_prefix_tokens: int,
    size: tuple[int, int],
    threshold: float = 0.5,
    margin: float = INFERENCE_CROP_MARGIN,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[B, tokens] -> heat [B,H,W], region [B,H,W] and crop box [B,4] at ``size``.

    The crop box is training's square crop (:func:`data.modes.square_crop`) around the
    region's box; an empty region gives the whole reference.
    """
    heat = heatmap(tokens_to_grid(vectors, grid, num_prefix_tokens), size)
    region = threshold_region(heat, threshold)
    boxes = torch.tensor([reference_crop_box(r, margin) for r in region], dtype=torch.long)
    return heat, region, boxes.view(-1, 4)


def reference_crop_box(region: torch.Tensor, margin: float = INFERENCE_CROP_MARGIN
                       ) -> tuple[int, int, int, int]:
    """Square crop box (x0, y0, x1, y1) around a bool [H, W] region of the reference."""
    height, width = region.shape[-2:]
    box = mask_boxes(region[None].bool())[0].tolist()
    if box[2] <= box[0] or box[3] <= box[1]:
        return 0, 0, width, height
    return square_crop(tuple(box), (height, width), margin)


def crop(image: torch.Tensor, box: Sequence[int]) -> torch.Tensor:
    """[3,H,W] inside ``box`` (x0, y0, x1, y1)."""
    x0, y0, x1, y1 = (int(v) for v in box)
    return image[:, y0:y1, x0:x1]


def resize_reference(reference: torch.Tensor, size: int) -> torch.Tensor:
    """Any-size reference [B,3,h,w] in [0,1] -> the encoder's square input."""
    return F.interpolate(reference, size=(size, size), mode="bilinear", antialias=True,
                         align_corners=False).clamp(0, 1)


def from_vector(vector: torch.Tensor, reference: torch.Tensor, grid: tuple[int, int],
                num_prefix_tokens: int, threshold: float = 0.5,
                margin: float = INFERENCE_CROP_MARGIN) -> Alignment:
    """The alignment of one case from its attention ``vector`` [tokens] and ``reference``
    [1,3,h,w]: map -> region -> square box on the reference's own grid -> crop (what the
    pipeline's alignment stage returns, also rebuilt from a stored vector)."""
    heat, region, boxes = postprocess(vector[None], grid, num_prefix_tokens,
                                      tuple(reference.shape[-2:]), threshold, margin)
    box = tuple(int(v) for v in boxes[0])
    return Alignment(vector, heat[0], region[0], box, crop(reference[0], box))


def region_mask(box: Sequence[int], size: tuple[int, int]) -> torch.Tensor:
    """Boolean [H, W] mask of a box, for scoring a box against ground truth."""
    return boxes_to_masks(torch.tensor([list(box)]), size)[0]
