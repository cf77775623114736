"""Alignment stage: where on the reference does the masked content live?

One denoiser forward at timestep t with the whole reference as context; the masked-query
cross-attention of block l becomes a map over the reference tokens, then a region and a box.
The same forward captures any set of blocks, so the calibration sweep costs one forward per
(case batch, timestep), never one per block.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from models.attention_capture import capture_cross_attention
from models.correspondence import (
    boxes_to_masks,
    expand_boxes,
    heatmap,
    mask_boxes,
    threshold_region,
    tokens_to_grid,
)
from models.export import Components
from models.refinement import denoiser_input, latent_mask


@torch.no_grad()
def attention_vectors(
    components: Components,
    image: torch.Tensor,
    mask: torch.Tensor,
    context: torch.Tensor,
    timesteps: Sequence[int],
    blocks: Sequence[int] | None = None,
    generator: torch.Generator | None = None,
    noise_seeds: Sequence[int] | None = None,
) -> dict[int, dict[int, torch.Tensor]]:
    """Masked-query attention over reference tokens: {timestep: {block: [B, tokens]}}.

    ``image`` [B,3,H,W] in [-1,1] is noised to each timestep with the same noise, so timesteps
    differ only by noise level, as in Algorithm 1. The noise comes from ``generator``, or
    row by row from ``noise_seeds`` so that a case's noise does not depend on its batch.
    """
    ae, unet, scheduler = components.autoencoder, components.denoiser, components.noise_scheduler
    latents = ae.encode(image)
    masked_latent = ae.encode(image * (1 - mask))
    mask_lat = latent_mask(mask, latents.shape[-2:])
    if noise_seeds is not None:
        if len(noise_seeds) != len(image):
            raise ValueError(f"{len(noise_seeds)} noise seeds for a batch of {len(image)}")
        noise = torch.stack([
            torch.randn(latents.shape[1:], generator=torch.Generator().manual_seed(int(s)))
            for s in noise_seeds
        ])
    else:
        noise = torch.randn(latents.shape, generator=generator, dtype=torch.float32)
    noise = noise.to(latents.device, latents.dtype)
    out: dict[int, dict[int, torch.Tensor]] = {}
    with capture_cross_attention(unet, mask, blocks) as maps:
        for t in timesteps:
            t_batch = torch.full((image.shape[0],), int(t), device=image.device, dtype=torch.long)
            noisy = scheduler.add_noise(latents, noise, t_batch)
            unet(denoiser_input(noisy, masked_latent, mask_lat), t_batch,
                 encoder_hidden_states=context)
            out[int(t)] = {b: v.clone() for b, v in maps.items()}
    return out


@dataclass
class Alignment:
    """The alignment stage's answer for one case, on the reference's own pixel grid."""

    vector: torch.Tensor  # [tokens] attention over reference tokens
    heat: torch.Tensor  # [H, W] normalised map in [0, 1]
    region: torch.Tensor  # [H, W] bool, thresholded map
    box: tuple[int, int, int, int]  # (x0, y0, x1, y1) of the region, grown by the margin
    crop: torch.Tensor  # [3, h, w] the reference inside ``box``, in [0, 1]


def postprocess(
    vectors: torch.Tensor,
    grid: tuple[int, int],
    num_prefix_tokens: int,
    size: tuple[int, int],
    threshold: float = 0.5,
    margin: float = 0.1,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[B, tokens] -> heat [B,H,W], region [B,H,W] and margin-grown box [B,4] at ``size``."""
    heat = heatmap(tokens_to_grid(vectors, grid, num_prefix_tokens), size)
    region = threshold_region(heat, threshold)
    boxes = expand_boxes(mask_boxes(region), margin, size)
    return heat, region, boxes


def crop_box(image: torch.Tensor, box: Sequence[int], min_side: int = 8) -> torch.Tensor:
    """Crop [3,H,W] to ``box``, grown to at least ``min_side`` pixels (never empty)."""
    height, width = image.shape[-2:]
    x0, y0, x1, y1 = (int(v) for v in box)
    if x1 - x0 < min_side:
        cx = (x0 + x1) // 2
        x0, x1 = max(0, cx - min_side // 2), min(width, cx + min_side // 2)
    if y1 - y0 < min_side:
        cy = (y0 + y1) // 2
        y0, y1 = max(0, cy - min_side // 2), min(height, cy + min_side // 2)
    return image[:, y0:y1, x0:x1]


def resize_reference(reference: torch.Tensor, size: int) -> torch.Tensor:
    """Any-size reference [B,3,h,w] in [0,1] -> the encoder's square input."""
    return F.interpolate(reference, size=(size, size), mode="bilinear", antialias=True,
                         align_corners=False).clamp(0, 1)


@torch.no_grad()
def align(
    components: Components,
    image: torch.Tensor,
    mask: torch.Tensor,
    reference: torch.Tensor,
    timestep: int,
    block: int,
    threshold: float = 0.5,
    margin: float = 0.1,
    generator: torch.Generator | None = None,
) -> Alignment:
    """Run the alignment stage on one case.

    ``image`` [1,3,H,W] in [-1,1], ``mask`` [1,1,H,W], ``reference`` [1,3,h,w] in [0,1] at
    any size; the map, region, box and crop are on the reference's own grid.
    """
    encoder = components.reference_encoder
    context = encoder(resize_reference(reference, encoder.image_size))
    vector = attention_vectors(components, image, mask, context, [timestep], [block],
                               generator)[timestep][block]
    heat, region, boxes = postprocess(vector, encoder.grid, encoder.num_prefix_tokens,
                                      tuple(reference.shape[-2:]), threshold, margin)
    box = tuple(int(v) for v in boxes[0])
    return Alignment(vector[0], heat[0], region[0], box, crop_box(reference[0], box))


def region_mask(box: Sequence[int], size: tuple[int, int]) -> torch.Tensor:
    """Boolean [H, W] mask of a box, for scoring a box against ground truth."""
    return boxes_to_masks(torch.tensor([list(box)]), size)[0]
