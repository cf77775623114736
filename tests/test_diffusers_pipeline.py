"""The diffusers pipeline folder: conversion, loading, and the same pixels as today's path."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel
from omegaconf import OmegaConf
from safetensors.torch import load_file

from data.benchmark import load_benchmark, write_synthetic_benchmark
from models.diffusers_pipeline import ReferenceEncoderModel, RefineByAlignPipeline
from models.export import DEFAULT_EXPORT, load_export
from models.pipeline import (
    ALIGNMENT_FILE,
    AlignmentConfig,
    RefineByAlign,
    RefinementConfig,
    load_alignment,
)
from scripts.convert_export import main as convert_main

# not the defaults: a read-out that did not travel would show
CALIBRATED = AlignmentConfig(timestep=200, block=2, threshold=0.3, margin=0.05)
FAST = RefinementConfig(num_steps=2, guidance_scale=2.0)  # guided: the null tokens travel too


@pytest.fixture(scope="module")
def old_export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-weight export of the tiny model with a calibrated read-out beside it."""
    import hydra

    from models.export import save_export
    from tests.conftest import compose_config

    cfg = compose_config([])
    torch.manual_seed(0)
    module = hydra.utils.instantiate(cfg.model)
    out = save_export(module.inference_state_dict(), cfg.model, tmp_path_factory.mktemp("old"))
    OmegaConf.save(OmegaConf.structured(CALIBRATED), out / ALIGNMENT_FILE)
    return out


@pytest.fixture(scope="module")
def converted(old_export: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("new") / "diffusers"
    convert_main([str(old_export), "--out", str(out)])
    return out


@pytest.fixture(scope="module")
def case(tmp_path_factory: pytest.TempPathFactory):
    """One synthetic case, the image at a non-native size (80x96; the model runs at 64)."""
    root = tmp_path_factory.mktemp("bench")
    write_synthetic_benchmark(root, 1, seed=3)
    (found,), _ = load_benchmark(root)
    image = np.repeat(np.repeat(found.image, 2, axis=0), 2, axis=1)[:80, :96]
    mask = np.repeat(np.repeat(found.mask, 2, axis=0), 2, axis=1)[:80, :96]
    return image, mask, found.reference


def test_layout_is_diffusers(converted: Path) -> None:
    for part in ("unet", "reference_encoder"):
        assert (converted / part / "diffusion_pytorch_model.safetensors").is_file()
        assert (converted / part / "config.json").is_file()
    assert (converted / "scheduler" / "scheduler_config.json").is_file()
    index = OmegaConf.load(converted / "model_index.json")
    assert index["_class_name"] == "RefineByAlignPipeline"
    assert list(index["vae"]) == [None, None]  # pixel-space: no autoencoder


def test_refines_identically_to_todays_path(old_export: Path, converted: Path, case) -> None:
    image, mask, reference = case
    today = RefineByAlign(load_export(old_export), load_alignment(export_dir=old_export), FAST)
    expected, expected_found = today(image, mask, reference, seed=7)

    pipe = RefineByAlignPipeline.from_pretrained(converted)
    pipe.refinement = FAST
    refined, found = pipe(image, mask, reference, seed=7)

    assert refined.shape == image.shape and refined.dtype == np.uint8
    assert not np.array_equal(refined[mask], image[mask])  # it did generate
    np.testing.assert_array_equal(refined, expected)
    assert found.box == expected_found.box

    # the pipeline's own save_pretrained keeps every pixel (__call__ refines from found.crop)
    pipe.save_pretrained(converted.parent / "resaved")
    again = RefineByAlignPipeline.from_pretrained(converted.parent / "resaved")
    again.refinement = FAST
    np.testing.assert_array_equal(again.refine([image], [mask], [found.crop], seed=7)[0],
                                  refined)


def test_unet_and_encoder_load_alone(old_export: Path, converted: Path) -> None:
    old = load_file(str(old_export / "model.safetensors"))
    unet = UNet2DConditionModel.from_pretrained(converted, subfolder="unet")
    encoder = ReferenceEncoderModel.from_pretrained(converted, subfolder="reference_encoder")
    for prefix, model in (("denoiser.", unet), ("reference_encoder.", encoder)):
        mine = model.state_dict()
        theirs = {k[len(prefix):]: v for k, v in old.items() if k.startswith(prefix)}
        assert mine.keys() == theirs.keys()
        for key, value in theirs.items():
            assert torch.equal(mine[key], value), f"{prefix}{key} changed in conversion"


def test_alignment_read_out_travels(old_export: Path, converted: Path, case) -> None:
    pipe = RefineByAlignPipeline.from_pretrained(converted)
    assert asdict(pipe.alignment) == asdict(CALIBRATED)
    image, mask, reference = case
    today = RefineByAlign(load_export(old_export), load_alignment(export_dir=old_export))
    assert pipe.align(image, mask, reference, seed=2).box == today.align(
        image, mask, reference, seed=2).box


def test_uncalibrated_export_stays_uncalibrated(old_export: Path, tmp_path: Path) -> None:
    """No alignment.yaml in the export: none in the folder, the preset default with a warning."""
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("model.safetensors", "model.yaml"):
        (bare / name).write_bytes((old_export / name).read_bytes())
    convert_main([str(bare), "--out", str(tmp_path / "out")])
    assert not (tmp_path / "out" / ALIGNMENT_FILE).exists()
    pipe = RefineByAlignPipeline.from_pretrained(tmp_path / "out")
    model_cfg = OmegaConf.load(bare / "model.yaml")
    assert (pipe.alignment.timestep, pipe.alignment.block) == (model_cfg.val_timestep,
                                                                model_cfg.val_block)


def test_generic_diffusers_loader_needs_the_folders_module(converted: Path, case) -> None:
    """DiffusionPipeline.from_pretrained: not by class name alone (diffusers looks names up in
    its own package), but through the folder's module as a custom pipeline, ready to refine
    exactly like this class's own loader."""
    from diffusers import DiffusionPipeline

    from models.diffusers_pipeline import CUSTOM_PIPELINE_MODULE

    with pytest.raises(AttributeError, match="RefineByAlignPipeline"):
        DiffusionPipeline.from_pretrained(converted)
    stem = CUSTOM_PIPELINE_MODULE.removesuffix(".py")
    with pytest.raises(ValueError, match="trust_remote_code"):  # never runs folder code silently
        DiffusionPipeline.from_pretrained(converted, custom_pipeline=stem)

    pipe = DiffusionPipeline.from_pretrained(converted, custom_pipeline=stem,
                                             trust_remote_code=True)
    assert type(pipe) is RefineByAlignPipeline
    assert pipe.alignment == CALIBRATED and pipe.model_config is not None
    own = RefineByAlignPipeline.from_pretrained(converted)
    image, mask, reference = case
    pipe.refinement = own.refinement = FAST
    refined, found = pipe(image, mask, reference, seed=7)
    expected, expected_found = own(image, mask, reference, seed=7)
    np.testing.assert_array_equal(refined, expected)
    assert found.box == expected_found.box


def test_load_export_reads_the_pipeline_folder(old_export: Path, converted: Path) -> None:
    """eval.py, scripts/refine.py and the notebook take either layout."""
    old, new = load_export(old_export), load_export(converted)
    assert torch.equal(old.denoiser.conv_in.weight, new.denoiser.conv_in.weight)
    assert torch.equal(old.reference_encoder.null_embedding, new.reference_encoder.null_embedding)
    assert new.config.val_block == old.config.val_block


def test_shipped_pipeline_folder_holds_the_shipped_weights() -> None:
    """checkpoints/tiny_synthetic/diffusers is the conversion of the export beside it."""
    folder = DEFAULT_EXPORT / "diffusers"
    old = load_file(str(DEFAULT_EXPORT / "model.safetensors"))
    for prefix, part in (("denoiser.", "unet"), ("reference_encoder.", "reference_encoder")):
        new = load_file(str(folder / part / "diffusion_pytorch_model.safetensors"))
        theirs = {k[len(prefix):]: v for k, v in old.items() if k.startswith(prefix)}
        assert new.keys() == theirs.keys()
        assert all(torch.equal(new[k], v) for k, v in theirs.items()), part
    assert (folder / ALIGNMENT_FILE).read_text() == (DEFAULT_EXPORT / ALIGNMENT_FILE).read_text()
    from models.diffusers_pipeline import CUSTOM_PIPELINE_MODULE, CUSTOM_PIPELINE_SOURCE

    assert (folder / CUSTOM_PIPELINE_MODULE).read_text() == CUSTOM_PIPELINE_SOURCE


def test_latent_model_saves_its_vae(old_export: Path, tmp_path: Path) -> None:
    """A latent model's autoencoder is the `vae` component, loaded back as the same VAE."""
    from dataclasses import replace

    from diffusers import AutoencoderKL

    from models.autoencoder import VAE

    torch.manual_seed(1)
    vae = VAE.from_config({"block_out_channels": [8, 16], "norm_num_groups": 4,
                           "down_block_types": ["DownEncoderBlock2D"] * 2,
                           "up_block_types": ["UpDecoderBlock2D"] * 2, "latent_channels": 4})
    components = replace(load_export(old_export), autoencoder=vae)
    RefineByAlignPipeline.from_components(components, CALIBRATED).save_pretrained(tmp_path)
    assert list(OmegaConf.load(tmp_path / "model_index.json")["vae"]) == ["diffusers",
                                                                          "AutoencoderKL"]
    loaded = RefineByAlignPipeline.from_pretrained(tmp_path).inference_components().autoencoder
    assert isinstance(loaded, VAE) and loaded.downsample == vae.downsample == 2
    alone = AutoencoderKL.from_pretrained(tmp_path, subfolder="vae").state_dict()
    assert all(torch.equal(alone[k], v) for k, v in vae.vae.state_dict().items())
