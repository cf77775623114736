"""Golden tests: our stages against the libraries' own reference code, on models built from
the public checkpoints' configs (tests/public_configs.py).

(a) Refinement sampling equals diffusers' ``StableDiffusionInpaintPipeline`` given the same
    UNet, VAE, scheduler, noise, guidance and steps, with our reference tokens as
    ``prompt_embeds`` and the null embedding as ``negative_prompt_embeds``.
(b) The reference encoder on DINOv2-L equals transformers' ``Dinov2Model`` run by hand on
    the public image processor's normalisation: 224 px -> 256 patch tokens.
"""

from __future__ import annotations

import pytest
import torch
from diffusers import StableDiffusionInpaintPipeline
from hydra.utils import instantiate

from models.autoencoder import VAE
from models.reference_encoder import ReferenceEncoder
from models.refinement import SAMPLERS, build_sampler, sample_inpaint
from tests import public_configs
from tests.conftest import compose_config

SIZE = 64  # px; latents 8x8, the smallest the SD-1.5 UNet's three downsamplings allow


@pytest.fixture(scope="module")
def sd15_parts():
    unet = public_configs.unet().eval()
    vae = public_configs.vae().eval()
    encoder = ReferenceEncoder(public_configs.dinov2(), context_dim=768, image_size=224).eval()
    cfg = compose_config(["model=sd15_dinov2"])
    training_scheduler = instantiate(cfg.model.noise_scheduler)
    return unet, vae, encoder, training_scheduler


def _case(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    image = torch.rand(1, 3, SIZE, SIZE, generator=g)  # [0, 1]
    mask = torch.zeros(1, 1, SIZE, SIZE)
    mask[..., 16:40, 24:48] = 1  # on the 8 px latent grid: nearest and cover resizing agree
    reference = torch.rand(1, 3, 224, 224, generator=g)
    return image, mask, reference


@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
def test_refinement_matches_diffusers_inpaint_pipeline(sd15_parts, sampler):
    unet, vae, encoder, training_scheduler = sd15_parts
    image, mask, reference = _case()
    steps, guidance, seed = 4, 3.0, 11
    with torch.no_grad():
        context = encoder(reference)
        null = encoder.null(1)

    ours_scheduler = build_sampler(sampler, training_scheduler.config, VAE(vae))
    ours = sample_inpaint(unet, VAE(vae), ours_scheduler, image * 2 - 1, mask, context, null,
                          steps, guidance, torch.Generator().manual_seed(seed))

    # the user's way: the checkpoint's scheduler config, turned into the chosen sampler
    reference_scheduler = SAMPLERS[sampler].from_config(public_configs.scheduler_config())
    pipe = StableDiffusionInpaintPipeline(
        vae=vae, text_encoder=None, tokenizer=None, unet=unet, scheduler=reference_scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(seed)
    latents = torch.randn((1, 4, SIZE // 8, SIZE // 8), generator=generator)  # as ours draws
    # ours encodes the masked image to the posterior mode; diffusers samples it unless given
    # latents, so it gets the mode through its own helper
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_inpaint import (
        retrieve_latents,
    )

    init = pipe.image_processor.preprocess(image, height=SIZE, width=SIZE)
    masked = init * (pipe.mask_processor.preprocess(mask, height=SIZE, width=SIZE) < 0.5)
    with torch.no_grad():
        masked_latents = retrieve_latents(vae.encode(masked), sample_mode="argmax")
    theirs = pipe(
        prompt_embeds=context, negative_prompt_embeds=null, image=image, mask_image=mask,
        masked_image_latents=masked_latents * vae.config.scaling_factor, height=SIZE,
        width=SIZE, num_inference_steps=steps, guidance_scale=guidance, latents=latents,
        generator=generator, output_type="pt",
    ).images
    torch.testing.assert_close((ours + 1) / 2, theirs, atol=1e-5, rtol=1e-4)


def test_samplers_follow_sd15_scheduler_conventions(sd15_parts):
    """What the golden test relies on, stated directly: no latent clipping, SD's offsets."""
    *_, training_scheduler = sd15_parts
    ddim = build_sampler("ddim", training_scheduler.config, VAE(public_configs.vae()))
    published = public_configs.scheduler_config()
    for key in ("clip_sample", "set_alpha_to_one", "steps_offset", "beta_schedule"):
        assert ddim.config[key] == published[key], key


def test_reference_encoder_matches_dinov2_by_hand():
    backbone = public_configs.dinov2()
    assert backbone.config.image_size == 518  # the published value the encoder must not copy
    encoder = ReferenceEncoder(backbone, context_dim=768, image_size=224).eval()
    g = torch.Generator().manual_seed(0)
    reference = torch.randint(0, 256, (2, 224, 224, 3), generator=g, dtype=torch.uint8)

    processor = public_configs.dinov2_processor()  # already 224 px: no resize, no crop
    pixels = processor(list(reference.numpy()), do_resize=False, do_center_crop=False,
                       return_tensors="pt").pixel_values
    with torch.no_grad():
        by_hand = backbone(pixel_values=pixels).last_hidden_state[:, 1:]  # patch tokens
        expected = encoder.mlp(by_hand)
        ours = encoder(reference.permute(0, 3, 1, 2).float() / 255)
    assert by_hand.shape[1] == 256 and ours.shape == (2, 256, 768)
    torch.testing.assert_close(ours, expected, atol=1e-4, rtol=1e-4)
