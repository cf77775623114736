"""Denoiser: a diffusers inpainting UNet (noisy latent + masked-image latent + mask)."""

from __future__ import annotations

from typing import Any

import torch
from diffusers import UNet2DConditionModel

from models.hub import require_cached


def build_denoiser(
    pretrained: str | None = None,
    subfolder: str | None = "unet",
    config: dict[str, Any] | None = None,
    in_channels: int = 9,
    cross_attention_dim: int | None = None,
    gradient_checkpointing: bool = False,
    sample_size: int | None = None,
) -> UNet2DConditionModel:
    """Load (local dir or hub id) or randomly initialise the UNet, then fit its inputs.

    A text-to-image checkpoint (4 input channels) is widened to ``in_channels``: the new
    ``conv_in`` weights are zero so the widened model starts as the original one.
    ``sample_size`` states the latent size the config expects of the weights (64 for SD-1.5),
    so that data resolution can be checked before loading (models/resolution.py); loaded
    weights of another size are refused.
    """
    if pretrained:
        require_cached("UNet", pretrained, "set paths.sd15_inpainting=/local/folder",
                       subfolder=subfolder)
        unet = UNet2DConditionModel.from_pretrained(pretrained, subfolder=subfolder or None)
    elif config is not None:
        unet = UNet2DConditionModel(**config)
    else:
        raise ValueError("build_denoiser needs either `pretrained` (path or hub id) or `config`")
    if sample_size is not None and unet.config.sample_size != sample_size:
        raise ValueError(f"UNet sample_size {unet.config.sample_size} != the config's "
                         f"sample_size {sample_size} (model.denoiser.sample_size)")
    if unet.config.in_channels != in_channels:
        widen_conv_in(unet, in_channels)
    if cross_attention_dim is not None and unet.config.cross_attention_dim != cross_attention_dim:
        raise ValueError(
            f"UNet context width {unet.config.cross_attention_dim} != requested "
            f"{cross_attention_dim}; the reference MLP must project to the UNet's width"
        )
    if gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    return unet


def widen_conv_in(unet: UNet2DConditionModel, in_channels: int) -> None:
    """Give ``conv_in`` ``in_channels`` inputs, keeping the old weights and zeroing the new."""
    old = unet.conv_in
    if in_channels < old.in_channels:
        raise ValueError(f"cannot narrow conv_in from {old.in_channels} to {in_channels}")
    new = torch.nn.Conv2d(
        in_channels, old.out_channels, old.kernel_size, old.stride, old.padding
    ).to(old.weight)
    with torch.no_grad():
        new.weight.zero_()
        new.weight[:, : old.in_channels] = old.weight
        new.bias.copy_(old.bias)
    unet.conv_in = new
    unet.register_to_config(in_channels=in_channels)


COMPILE_SCOPES = ("full", "regional")


def compile_denoiser(unet: UNet2DConditionModel, scope: str = "full", **options: Any) -> None:
    """``torch.compile`` the UNet in place (parameter names stay the eager ones).

    ``full`` compiles the whole forward; ``regional`` only the repeated transformer blocks
    (diffusers' ``compile_repeated_blocks``): one compile serves all 16 blocks of an SD UNet,
    so it starts in a fraction of the time, while resnets and up/down sampling stay eager.
    """
    if scope == "full":
        unet.compile(**options)
    elif scope == "regional":
        unet.compile_repeated_blocks(**options)
    else:
        raise ValueError(f"compile scope {scope!r} is not one of {COMPILE_SCOPES}")
