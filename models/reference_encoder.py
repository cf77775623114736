"""Reference encoder: DINOv2 patch tokens through an MLP to the UNet's context width.

The tokens replace the text embedding of the UNet's cross-attention. A learned null
embedding stands in for dropped references (classifier-free guidance).
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn
from transformers import Dinov2Config, Dinov2Model

from models.hub import require_cached

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Dinov2Config bookkeeping that is not architecture (and would pin a transformers version).
_BACKBONE_META = ("transformers_version", "model_type", "architectures", "_name_or_path",
                  "torch_dtype", "dtype")


def build_dinov2(
    pretrained: str | None = None, config: dict[str, Any] | None = None,
    patch_size: int | None = None,
) -> Dinov2Model:
    """DINOv2 from a local directory or hub id, or randomly initialised from ``config``.

    ``patch_size`` states the patch the config expects (14 for DINOv2), so that the reference
    size can be checked before loading; a backbone with another patch is refused.
    """
    if pretrained:
        require_cached("DINOv2", pretrained, "set paths.dinov2=/local/folder")
        model = Dinov2Model.from_pretrained(pretrained)
    elif config is None:
        raise ValueError("build_dinov2 needs either `pretrained` (path or hub id) or `config`")
    else:
        model = Dinov2Model(Dinov2Config(**config))
    if patch_size is not None and model.config.patch_size != patch_size:
        raise ValueError(f"DINOv2 patch size {model.config.patch_size} != the config's "
                         f"patch_size {patch_size} (model.reference_encoder.backbone.patch_size)")
    return model


class ReferenceEncoder(nn.Module):
    """Image in [0,1] -> context tokens [B, T, context_dim] (patch tokens, optionally CLS first).

    The input size is ours to choose, not the backbone config's: the public DINOv2 configs say
    ``image_size: 518`` (their position-embedding grid), and DINOv2 interpolates its position
    embeddings to any multiple of the patch size. At the paper's 224 px with patch 14 the
    reference becomes 16x16 = 256 tokens. Pixels are normalised with the ImageNet mean and
    std, as the public DINOv2 image processor does.
    """

    def __init__(
        self,
        backbone: Dinov2Model,
        context_dim: int,
        image_size: int = 224,
        use_patch_tokens: bool = True,
        use_cls_token: bool = False,
        mlp_hidden_dim: int | None = None,
        trainable_backbone: bool = True,
    ) -> None:
        super().__init__()
        if not (use_patch_tokens or use_cls_token):
            raise ValueError("use at least one of patch tokens and the CLS token")
        self.backbone = backbone
        self.use_patch_tokens = use_patch_tokens
        self.use_cls_token = use_cls_token
        self.trainable_backbone = trainable_backbone
        backbone.requires_grad_(trainable_backbone)
        mask_token = getattr(backbone.embeddings, "mask_token", None)
        if mask_token is not None:  # masked-image pretraining only; unused, it would stop DDP
            mask_token.requires_grad_(False)

        cfg = backbone.config
        patch = int(cfg.patch_size)
        if image_size <= 0 or image_size % patch:
            raise ValueError(f"reference image_size {image_size} must be a positive multiple of "
                             f"the backbone's patch size {patch}")
        self.image_size = int(image_size)
        side = self.image_size // patch
        self.grid = (side, side) if use_patch_tokens else (1, 1)
        self.num_prefix_tokens = int(use_cls_token and use_patch_tokens)
        self.num_tokens = (side * side if use_patch_tokens else 0) + int(use_cls_token)

        width = int(cfg.hidden_size)
        hidden = mlp_hidden_dim or context_dim
        self.mlp = nn.Sequential(
            nn.LayerNorm(width), nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, context_dim)
        )
        self.null_embedding = nn.Parameter(torch.zeros(self.num_tokens, context_dim))
        nn.init.normal_(self.null_embedding, std=0.02)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, reference: torch.Tensor, drop: torch.Tensor | None = None) -> torch.Tensor:
        """Encode ``reference`` [B,3,S,S] in [0,1]; rows where ``drop`` is True get the null."""
        if reference.shape[-2:] != (self.image_size, self.image_size):
            raise ValueError(
                f"reference must be {self.image_size}x{self.image_size}, got "
                f"{tuple(reference.shape[-2:])}"
            )
        pixels = (reference - self.mean) / self.std
        with torch.set_grad_enabled(self.trainable_backbone and torch.is_grad_enabled()):
            hidden = self.backbone(pixel_values=pixels).last_hidden_state  # [B, 1+P(+reg), C]
        n_patches = self.grid[0] * self.grid[1] if self.use_patch_tokens else 0
        parts = []
        if self.use_cls_token:
            parts.append(hidden[:, :1])
        if self.use_patch_tokens:
            parts.append(hidden[:, -n_patches:])
        tokens = self.mlp(torch.cat(parts, dim=1))
        if drop is not None:
            null = self.null_embedding.to(tokens.dtype).expand_as(tokens)
            tokens = torch.where(drop.view(-1, 1, 1), null, tokens)
        return tokens

    def null(self, batch_size: int) -> torch.Tensor:
        """The unconditional context for classifier-free guidance."""
        return self.null_embedding.unsqueeze(0).expand(batch_size, -1, -1)


class ReferenceEncoderModel(ReferenceEncoder, ModelMixin, ConfigMixin):
    """:class:`ReferenceEncoder` rebuilt from JSON: the pipeline folder's ``reference_encoder/``.

    The backbone is described by its ``Dinov2Config`` dict instead of being passed built, so
    ``save_pretrained`` / ``from_pretrained`` round-trip it; state-dict keys are the
    ``ReferenceEncoder``'s, so a trained encoder's weights load unchanged.
    """

    @register_to_config
    def __init__(
        self,
        backbone_config: dict[str, Any],
        context_dim: int,
        image_size: int = 224,
        use_patch_tokens: bool = True,
        use_cls_token: bool = False,
        mlp_hidden_dim: int | None = None,
        trainable_backbone: bool = True,
    ) -> None:
        super().__init__(Dinov2Model(Dinov2Config(**backbone_config)), context_dim, image_size,
                         use_patch_tokens, use_cls_token, mlp_hidden_dim, trainable_backbone)

    @classmethod
    def from_encoder(cls, encoder: ReferenceEncoder) -> ReferenceEncoderModel:
        """The same encoder (config and weights) as a diffusers model."""
        backbone = {k: v for k, v in encoder.backbone.config.to_dict().items()
                    if k not in _BACKBONE_META}
        head = encoder.mlp
        model = cls(backbone, context_dim=head[-1].out_features, image_size=encoder.image_size,
                    use_patch_tokens=encoder.use_patch_tokens,
                    use_cls_token=encoder.use_cls_token, mlp_hidden_dim=head[1].out_features,
                    trainable_backbone=encoder.trainable_backbone)
        model.load_state_dict(encoder.state_dict(), strict=True)
        return model.to(next(encoder.parameters()).device)
