"""Refine-by-Align as a diffusers ``DiffusionPipeline``: a loadable folder, not new inference.

The folder is diffusers' layout (``model_index.json``, one subfolder per component,
safetensors), so the trained UNet alone loads with
``UNet2DConditionModel.from_pretrained(dir, subfolder="unet")``. Next to the components it
carries the calibrated read-out (``alignment.yaml``, see :func:`models.pipeline.load_alignment`)
and the training config (``model.yaml``: provenance, the preset's uncalibrated read-out and the
validation sampler). Inference is :class:`models.pipeline.RefineByAlign`'s; this class only
assembles its :class:`models.export.Components` from the loaded modules.

Loading: ``RefineByAlignPipeline.from_pretrained(dir)``. diffusers' generic
``DiffusionPipeline.from_pretrained(dir)`` cannot find this class by itself: it looks a
string ``_class_name`` up as an attribute of the ``diffusers`` package, and loads any other
class only as remote code. The folder therefore carries a small module,
``refine_by_align_pipeline.py``, that imports this class, so the generic loader works with
diffusers' custom-pipeline arguments (this repository importable, the file executed):
``DiffusionPipeline.from_pretrained(dir, custom_pipeline="refine_by_align_pipeline",
trust_remote_code=True)``. ``model_index.json`` keeps the plain class name, so this class's
own loader, ``load_export``, eval.py and scripts/refine.py never execute code from a folder.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import AutoencoderKL, DiffusionPipeline, UNet2DConditionModel
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from diffusers.schedulers import SchedulerMixin
from hydra.utils import instantiate
from omegaconf import DictConfig, ListConfig, OmegaConf
from transformers import Dinov2Config, Dinov2Model

from models.alignment import Alignment
from models.autoencoder import VAE, PixelSpace
from models.export import CONFIG, Components
from models.pipeline import (
    ALIGNMENT_FILE,
    AlignmentConfig,
    RefineByAlign,
    RefinementConfig,
    load_alignment,
)
from models.reference_encoder import ReferenceEncoder

# the folder's module for DiffusionPipeline.from_pretrained(dir, custom_pipeline=<its stem>, ...)
CUSTOM_PIPELINE_MODULE = "refine_by_align_pipeline.py"
CUSTOM_PIPELINE_SOURCE = '''"""The pipeline class of this folder, for diffusers' generic loader:

    DiffusionPipeline.from_pretrained(folder, custom_pipeline="refine_by_align_pipeline",
                                      trust_remote_code=True)

The refine-by-align repository must be importable.
"""

from models.diffusers_pipeline import RefineByAlignPipeline  # noqa: F401
'''

# Dinov2Config bookkeeping that is not architecture (and would pin a transformers version).
_BACKBONE_META = ("transformers_version", "model_type", "architectures", "_name_or_path",
                  "torch_dtype", "dtype")


class ReferenceEncoderModel(ReferenceEncoder, ModelMixin, ConfigMixin):
    """:class:`ReferenceEncoder` rebuilt from JSON: diffusers saves its config and weights.

    The backbone is described by its ``Dinov2Config`` dict instead of being passed built, so
    ``save_pretrained`` / ``from_pretrained`` round-trip it; state-dict keys are the
    ``ReferenceEncoder``'s, so old exports' weights load unchanged.
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


def _plain_config(part: ConfigMixin) -> None:
    """Hydra-built modules hold OmegaConf lists in their config; JSON needs plain ones."""
    omega = {k: OmegaConf.to_container(v, resolve=True) for k, v in part.config.items()
             if isinstance(v, DictConfig | ListConfig)}
    if omega:
        part.register_to_config(**omega)


class RefineByAlignPipeline(DiffusionPipeline):
    """Align on the whole reference, refine from the aligned crop (Song et al., ICLR 2025).

    Like ``PaintByExamplePipeline``, an image encoder (``reference_encoder``: DINOv2 + MLP +
    null embedding) feeds the inpainting UNet's cross-attention. ``vae`` is None for
    pixel-space models. ``alignment`` (the calibrated read-out), ``refinement`` (sampler,
    steps, guidance) and ``autocast_dtype`` are settings, read at each call.
    """

    model_cpu_offload_seq = "reference_encoder->unet->vae"
    _optional_components = ["vae"]

    def __init__(
        self,
        unet: UNet2DConditionModel,
        vae: AutoencoderKL | None,
        reference_encoder: ReferenceEncoderModel,
        scheduler: SchedulerMixin,
    ) -> None:
        super().__init__()
        self.register_modules(unet=unet, vae=vae, reference_encoder=reference_encoder,
                              scheduler=scheduler)
        self.model_config: DictConfig | None = None
        self.alignment: AlignmentConfig | None = None
        self.refinement = RefinementConfig()
        self.autocast_dtype = torch.float32

    # --- folder I/O ------------------------------------------------------------------------
    @classmethod
    def from_components(cls, components: Components,
                        alignment: AlignmentConfig | None = None) -> RefineByAlignPipeline:
        """Wrap loaded components (e.g. ``load_export``'s); the encoder is re-homed in a
        :class:`ReferenceEncoderModel` (same weights)."""
        encoder = components.reference_encoder
        if not isinstance(encoder, ReferenceEncoderModel):
            encoder = ReferenceEncoderModel.from_encoder(encoder)
        vae = getattr(components.autoencoder, "vae", None)
        for part in (components.denoiser, vae, components.noise_scheduler):
            if part is not None:
                _plain_config(part)
        pipe = cls(unet=components.denoiser, vae=vae, reference_encoder=encoder,
                   scheduler=components.noise_scheduler)
        pipe.model_config, pipe.alignment = components.config, alignment
        return pipe

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike,
                        **kwargs: Any) -> RefineByAlignPipeline:
        """diffusers' loader, then the folder's ``model.yaml`` and calibrated read-out (read
        by :meth:`register_to_config` for a local folder, here for a hub id)."""
        pipe = super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        if not Path(pretrained_model_name_or_path).is_dir():
            pipe.read_folder_settings(Path(cls.download(pretrained_model_name_or_path,
                                                        **kwargs)))
        return pipe

    def register_to_config(self, **kwargs: Any) -> None:
        """diffusers' loaders (this class's and the generic ``DiffusionPipeline``'s) end by
        recording the folder here: the one step both share, so a local folder's settings are
        read here and either loader returns a ready pipeline."""
        super().register_to_config(**kwargs)
        folder = kwargs.get("_name_or_path")
        if folder is not None and Path(folder).is_dir():
            self.read_folder_settings(Path(folder))

    def read_folder_settings(self, folder: Path) -> None:
        """``model.yaml`` and the calibrated read-out (else the preset default, with
        :func:`load_alignment`'s UNCALIBRATED warning) of a pipeline folder."""
        if (folder / CONFIG).is_file():
            self.model_config = OmegaConf.load(folder / CONFIG)
        if (folder / ALIGNMENT_FILE).is_file() or self.model_config is not None:
            self.alignment = load_alignment(export_dir=folder,
                                            components=self.inference_components())

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs: Any) -> None:
        """diffusers' layout (safetensors), plus ``model.yaml``, ``alignment.yaml`` and the
        module that lets ``DiffusionPipeline.from_pretrained`` find this class."""
        kwargs.setdefault("safe_serialization", True)
        super().save_pretrained(save_directory, **kwargs)
        folder = Path(save_directory)
        if self.model_config is not None:
            OmegaConf.save(self.model_config, folder / CONFIG, resolve=True)
        if self.alignment is not None:
            OmegaConf.save(OmegaConf.structured(self.alignment), folder / ALIGNMENT_FILE)
        (folder / CUSTOM_PIPELINE_MODULE).write_text(CUSTOM_PIPELINE_SOURCE)

    # --- inference: delegated --------------------------------------------------------------
    def inference_components(self) -> Components:
        """The modules as :class:`RefineByAlign` takes them (the same objects, not copies)."""
        cfg = self.model_config
        return Components(
            denoiser=self.unet, reference_encoder=self.reference_encoder,
            autoencoder=PixelSpace() if self.vae is None else VAE(self.vae),
            noise_scheduler=self.scheduler,
            sampling_scheduler=instantiate(cfg.sampling_scheduler) if cfg is not None else None,
            config=cfg)

    def runner(self) -> RefineByAlign:
        """Today's inference over this pipeline's modules and current settings."""
        if self.alignment is None:
            raise ValueError("no alignment read-out: set `pipe.alignment` (an AlignmentConfig) "
                             "or load a folder that has alignment.yaml")
        return RefineByAlign(self.inference_components(), self.alignment, self.refinement,
                             self.autocast_dtype)

    def align(self, image: np.ndarray, mask: np.ndarray, reference: np.ndarray,
              seed: int = 0) -> Alignment:
        """Alignment stage (see :meth:`RefineByAlign.align`)."""
        return self.runner().align(image, mask, reference, seed)

    def refine(self, images: list[np.ndarray], masks: list[np.ndarray],
               references: list[torch.Tensor | np.ndarray], seed: int = 0,
               progress: bool = False) -> list[np.ndarray]:
        """Refinement stage on a batch (see :meth:`RefineByAlign.refine`)."""
        return self.runner().refine(images, masks, references, seed, progress)

    def __call__(self, image: np.ndarray, mask: np.ndarray, reference: np.ndarray,
                 seed: int = 0, progress: bool = False) -> tuple[np.ndarray, Alignment]:
        """Both stages: the refined uint8 image at the input's size and the alignment."""
        return self.runner()(image, mask, reference, seed, progress)


def convert_export(export_dir: str | Path, out_dir: str | Path) -> Path:
    """Today's export (``model.safetensors`` + ``model.yaml``) -> the diffusers folder.

    The calibrated ``alignment.yaml`` is copied verbatim when the export has one; an
    uncalibrated export stays uncalibrated (its preset default is not written as calibrated).
    ``training_data.yaml`` and ``tracker.yaml`` travel too, so eval.py's provenance check and
    its wandb logging read either folder.
    """
    from data.provenance import TRAINING_DATA
    from evaluation.tracker import TRACKER
    from models.export import load_export

    export_dir, out_dir = Path(export_dir), Path(out_dir)
    pipe = RefineByAlignPipeline.from_components(load_export(export_dir))
    pipe.save_pretrained(out_dir)
    calibrated = export_dir / ALIGNMENT_FILE
    if calibrated.is_file():
        load_alignment(calibrated)  # refuse a malformed read-out before shipping it
        shutil.copyfile(calibrated, out_dir / ALIGNMENT_FILE)
    for record in (TRAINING_DATA, TRACKER):
        if (export_dir / record).is_file():
            shutil.copyfile(export_dir / record, out_dir / record)
    return out_dir
