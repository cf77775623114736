"""Whether the data's image sizes fit the model, read from the configs before anything is built.

A denoiser is made for one latent size (``sample_size``, 64 for SD-1.5) and sees the data's
pixels through its autoencoder (/8 for the SD VAE, /1 in pixel space); the reference encoder
turns ``image_size`` px into a grid of patch tokens (224 px / patch 14 = 16x16 for DINOv2).
The UNet is convolutional and runs at other sizes too, so a 64 px run of an SD-1.5 preset
would train on 8x8 latents without a word: train.py calls :func:`check_data_fits_model` first.

Pretrained parts state what they expect in the config (``denoiser.sample_size``,
``autoencoder.downsample``, ``reference_encoder.backbone.patch_size``) and the builders refuse
weights that disagree, so the check never needs the weights themselves.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from omegaconf import DictConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelResolution:
    """What a model config expects of its inputs; None where the config does not say."""

    latent_size: int | None  # the denoiser's sample_size
    downsample: int | None  # pixels per latent along a side
    reference_size: int | None  # the reference encoder's input, px
    patch_size: int | None  # the reference backbone's patch, px

    @property
    def image_size(self) -> int | None:
        """Pixel size of the data the denoiser was made for."""
        if self.latent_size is None or self.downsample is None:
            return None
        return self.latent_size * self.downsample


def _part(node: DictConfig | None, key: str) -> int | None:
    """``node.key``, else ``node.config.key``; None when neither is set."""
    if not node:
        return None
    if node.get(key) is not None:
        return int(node[key])
    config = node.get("config")
    if config and config.get(key) is not None:
        return int(config[key])
    return None


def autoencoder_downsample(node: DictConfig | None) -> int | None:
    """The autoencoder's pixel-to-latent factor: stated, from its VAE layout, or 1 in pixels."""
    if not node:
        return None
    if node.get("downsample") is not None:
        return int(node.downsample)
    if str(node.get("_target_", "")).endswith("PixelSpace"):
        return 1
    config = node.get("config")
    if config and config.get("block_out_channels"):
        return 2 ** (len(config.block_out_channels) - 1)  # AutoencoderKL halves per extra level
    return None


def model_resolution(model_cfg: DictConfig) -> ModelResolution:
    """The input sizes ``model_cfg`` expects (interpolations resolved against its root)."""
    encoder = model_cfg.get("reference_encoder")
    return ModelResolution(
        latent_size=_part(model_cfg.get("denoiser"), "sample_size"),
        downsample=autoencoder_downsample(model_cfg.get("autoencoder")),
        reference_size=int(encoder.image_size) if encoder and encoder.get("image_size") else None,
        patch_size=_part(encoder.get("backbone") if encoder else None, "patch_size"),
    )


def check_data_fits_model(model_cfg: DictConfig, data_cfg: DictConfig) -> None:
    """Refuse, in one line naming both values, data whose image or reference size does not fit
    the model; what the config does not state is skipped with a warning."""
    want = model_resolution(model_cfg)
    image_size, reference_size = int(data_cfg.image_size), int(data_cfg.reference_size)
    if want.image_size is None:
        log.warning("model config states no denoiser sample_size or autoencoder downsampling: "
                    "data.image_size=%d not checked", image_size)
    elif image_size != want.image_size:
        raise ValueError(
            f"data.image_size={image_size} px does not fit the model: its denoiser expects "
            f"{want.latent_size}x{want.latent_size} latents (sample_size) through a "
            f"/{want.downsample} autoencoder, i.e. {want.image_size} px; set "
            f"data.image_size={want.image_size} or pick a model made for {image_size} px")
    if want.reference_size is None:
        log.warning("model config states no reference_encoder.image_size: data.reference_size=%d "
                    "not checked", reference_size)
        return
    if reference_size != want.reference_size:
        raise ValueError(
            f"data.reference_size={reference_size} px does not fit the model: its reference "
            f"encoder takes {want.reference_size} px (model.reference_encoder.image_size); set "
            f"data.reference_size={want.reference_size}")
    if want.patch_size is not None and want.reference_size % want.patch_size:
        raise ValueError(
            f"model.reference_encoder.image_size={want.reference_size} px is not a multiple of "
            f"the backbone's patch size {want.patch_size} px: no whole token grid (224 px / "
            f"14 = 16x16 tokens for DINOv2)")
