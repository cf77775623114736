"""The inference pipeline and its folder: the shipped model's recorded outputs, the folder's
layout and conversions, diffusers' loaders, and the padded-crop option."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel
from omegaconf import OmegaConf
from safetensors.torch import save_file

from data.benchmark import load_benchmark, write_synthetic_benchmark
from models.export import (
    DEFAULT_EXPORT,
    PIPELINE_INDEX,
    ExportError,
    load_pipeline,
    read_weights,
    write_alignment,
)
from models.image_processor import MaskProcessor
from models.pipeline import (
    CUSTOM_PIPELINE_MODULE,
    CUSTOM_PIPELINE_SOURCE,
    AlignmentConfig,
    RefineByAlignPipeline,
    RefinementConfig,
)
from models.reference_encoder import ReferenceEncoderModel
from scripts.export_checkpoint import main as export_main
from tests.conftest import compose_config

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "refine_shipped.npz"
# not the defaults: a read-out that did not travel would show
CALIBRATED = AlignmentConfig(timestep=200, block=2, threshold=0.3, margin=0.05)
FAST = RefinementConfig(num_steps=2, guidance_scale=2.0)  # guided: the null tokens travel too
OFF = RefinementConfig(padding_mask_crop=None)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: on a shared 2-core machine, spin-waiting threads are much slower."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def shipped() -> RefineByAlignPipeline:
    return load_pipeline(DEFAULT_EXPORT)


def refine_recorded_cases(pipe: RefineByAlignPipeline, rec: Mapping[str, np.ndarray]
                          ) -> dict[str, np.ndarray]:
    """The recorded cases' outputs: default settings at the model's size; 80x96 with DDIM 10
    steps, guidance 2, dilate 1, feather 2; a two-case batch with whole references. The crop
    option is off."""
    a = pipe(rec["a_image"], rec["a_mask"], rec["a_reference"], OFF, seed=0)
    settings = RefinementConfig("ddim", 10, 2.0, dilate=1, feather=2, padding_mask_crop=None)
    b = pipe(rec["b_image"], rec["b_mask"], rec["b_reference"], settings, seed=7)
    c = pipe([rec["a_image"], rec["c_image"]], [rec["a_mask"], rec["c_mask"]],
             [rec["a_reference"], rec["c_reference"]], OFF, align=False, seed=11)
    assert c.alignments is None
    return {"a_refined": a.images[0], "a_box": np.array(a.alignments[0].box),
            "b_refined": b.images[0], "b_box": np.array(b.alignments[0].box),
            "c_batch_refined": np.stack(c.images)}


def test_shipped_model_reproduces_the_recorded_outputs(shipped: RefineByAlignPipeline) -> None:
    """Bit for bit what the shipped weights gave when they were recorded
    (tests/fixtures/, ``python -m tests.test_pipeline`` records them again)."""
    rec = np.load(FIXTURE)
    for key, value in refine_recorded_cases(shipped, rec).items():
        np.testing.assert_array_equal(value, rec[key], err_msg=key)


def test_shipped_folder_is_calibrated_and_complete() -> None:
    index = json.loads((DEFAULT_EXPORT / PIPELINE_INDEX).read_text())
    assert index["_class_name"] == "RefineByAlignPipeline"
    assert (index["alignment"]["timestep"], index["alignment"]["block"]) == (901, 5)
    assert index["calibration"].startswith("calibrated by eval.py")
    for record in ("model.yaml", "training_data.yaml", "MODEL_CARD.md"):
        assert (DEFAULT_EXPORT / record).is_file(), record
    assert (DEFAULT_EXPORT / CUSTOM_PIPELINE_MODULE).read_text() == CUSTOM_PIPELINE_SOURCE
    assert not list(DEFAULT_EXPORT.glob("*.safetensors"))  # one copy of the weights


# ----------------------------------------------------------------------------- the folder
@pytest.fixture(scope="module")
def old_export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-weight export of the older layout (one flat state dict, model.yaml, a
    calibrated alignment.yaml, training_data.yaml)."""
    import hydra

    cfg = compose_config([])
    torch.manual_seed(0)
    module = hydra.utils.instantiate(cfg.model)
    out = tmp_path_factory.mktemp("old")
    save_file({k: v.contiguous() for k, v in module.inference_state_dict().items()},
              str(out / "model.safetensors"))
    OmegaConf.save(cfg.model, out / "model.yaml", resolve=True)
    (out / "alignment.yaml").write_text("# calibrated by a test\n" + OmegaConf.to_yaml(
        OmegaConf.structured(CALIBRATED)))
    (out / "training_data.yaml").write_text("train: {namespace: train, seed: 0}\n")
    return out


@pytest.fixture(scope="module")
def converted(old_export: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("new") / "pipeline"
    export_main([str(old_export), "--out", str(out)])
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
    index = json.loads((converted / PIPELINE_INDEX).read_text())
    assert index["_class_name"] == "RefineByAlignPipeline"
    assert index["vae"] == [None, None]  # pixel-space: no autoencoder
    assert index["alignment"] == asdict(CALIBRATED)


def test_older_export_converts_with_its_weights_read_out_and_records(old_export: Path,
                                                                     converted: Path) -> None:
    from safetensors.torch import load_file

    old = load_file(str(old_export / "model.safetensors"))
    new = read_weights(converted)
    assert new.keys() == old.keys()
    assert all(torch.equal(new[k], v) for k, v in old.items())
    pipe = load_pipeline(converted)
    assert pipe.alignment == CALIBRATED and pipe.config.calibration == "calibrated by a test"
    for record in ("training_data.yaml", "model.yaml"):
        assert (converted / record).read_text() == (old_export / record).read_text()
    with pytest.raises(ExportError, match="export_checkpoint.py"):
        load_pipeline(old_export)  # the older layout itself is not loaded, but named


def test_uncalibrated_export_stays_uncalibrated(old_export: Path, tmp_path: Path,
                                                caplog) -> None:
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("model.safetensors", "model.yaml"):
        (bare / name).write_bytes((old_export / name).read_bytes())
    export_main([str(bare), "--out", str(tmp_path / "out")])
    with caplog.at_level(logging.WARNING):
        pipe = load_pipeline(tmp_path / "out")
    model_cfg = OmegaConf.load(bare / "model.yaml")
    assert not pipe.calibrated and "UNCALIBRATED" in caplog.text
    assert (pipe.alignment.timestep, pipe.alignment.block) == (model_cfg.val_timestep,
                                                                model_cfg.val_block)


def test_unet_and_encoder_load_alone(old_export: Path, converted: Path) -> None:
    from safetensors.torch import load_file

    old = load_file(str(old_export / "model.safetensors"))
    unet = UNet2DConditionModel.from_pretrained(converted, subfolder="unet")
    encoder = ReferenceEncoderModel.from_pretrained(converted, subfolder="reference_encoder")
    for prefix, model in (("denoiser.", unet), ("reference_encoder.", encoder)):
        mine = model.state_dict()
        theirs = {k[len(prefix):]: v for k, v in old.items() if k.startswith(prefix)}
        assert mine.keys() == theirs.keys()
        assert all(torch.equal(mine[k], v) for k, v in theirs.items()), prefix


def test_save_pretrained_round_trip_keeps_every_pixel(converted: Path, tmp_path: Path,
                                                      case) -> None:
    image, mask, reference = case
    pipe = load_pipeline(converted)
    out = pipe(image, mask, reference, FAST, seed=7)
    assert out.images[0].shape == image.shape and out.images[0].dtype == np.uint8
    assert not np.array_equal(out.images[0][mask], image[mask])  # it did generate
    pipe.set_alignment(replace(CALIBRATED, threshold=0.4), "changed by a test")
    pipe.save_pretrained(tmp_path / "resaved")
    again = load_pipeline(tmp_path / "resaved")
    assert again.alignment.threshold == 0.4 and again.config.calibration == "changed by a test"
    np.testing.assert_array_equal(again(image, mask, reference, FAST, seed=7,
                                        alignment=CALIBRATED).images[0], out.images[0])
    write_alignment(tmp_path / "resaved", CALIBRATED, "written back")
    assert load_pipeline(tmp_path / "resaved").alignment == CALIBRATED


def test_generic_diffusers_loader_needs_the_folders_module(converted: Path, case) -> None:
    """DiffusionPipeline.from_pretrained: not by class name alone (diffusers looks names up in
    its own package), but through the folder's module as a custom pipeline, ready to refine
    exactly like this class's own loader."""
    from diffusers import DiffusionPipeline

    with pytest.raises(AttributeError, match="RefineByAlignPipeline"):
        DiffusionPipeline.from_pretrained(converted)
    stem = CUSTOM_PIPELINE_MODULE.removesuffix(".py")
    with pytest.raises(ValueError, match="trust_remote_code"):  # never runs folder code silently
        DiffusionPipeline.from_pretrained(converted, custom_pipeline=stem)

    pipe = DiffusionPipeline.from_pretrained(converted, custom_pipeline=stem,
                                             trust_remote_code=True)
    assert type(pipe) is RefineByAlignPipeline and pipe.alignment == CALIBRATED
    own = load_pipeline(converted)
    image, mask, reference = case
    refined = pipe(image, mask, reference, FAST, seed=7)
    expected = own(image, mask, reference, FAST, seed=7)
    np.testing.assert_array_equal(refined.images[0], expected.images[0])
    assert refined.alignments[0].box == expected.alignments[0].box


def test_latent_model_saves_its_vae(tmp_path: Path) -> None:
    """A latent model's autoencoder is the `vae` component, loaded back as the same VAE."""
    from diffusers import AutoencoderKL
    from hydra.utils import instantiate

    from models.autoencoder import VAE

    cfg = compose_config([])
    torch.manual_seed(1)
    vae = VAE.from_config({"block_out_channels": [8, 16], "norm_num_groups": 4,
                           "down_block_types": ["DownEncoderBlock2D"] * 2,
                           "up_block_types": ["UpDecoderBlock2D"] * 2, "latent_channels": 4})
    parts = {k: instantiate(cfg.model[k]) for k in ("denoiser", "reference_encoder",
                                                    "noise_scheduler")}
    pipe = RefineByAlignPipeline.from_modules(**parts, autoencoder=vae, alignment=CALIBRATED)
    pipe.save_pretrained(tmp_path)
    index = json.loads((tmp_path / PIPELINE_INDEX).read_text())
    assert index["vae"] == ["diffusers", "AutoencoderKL"]
    loaded = RefineByAlignPipeline.from_pretrained(tmp_path)
    assert isinstance(loaded.autoencoder, VAE) and loaded.autoencoder.downsample == 2
    assert loaded.image_size == 2 * int(parts["denoiser"].config.sample_size)
    alone = AutoencoderKL.from_pretrained(tmp_path, subfolder="vae").state_dict()
    assert all(torch.equal(alone[k], v) for k, v in vae.vae.state_dict().items())


# ----------------------------------------------------------------------------- padded crop
def test_crop_region_is_a_padded_square_inside_the_image() -> None:
    get = MaskProcessor.get_crop_region
    mask = np.zeros((300, 400), bool)
    mask[100:120, 380:395] = True  # near the right edge
    x0, y0, x1, y1 = get(mask, pad=8, min_size=64)
    assert x1 - x0 == y1 - y0 == 64 and x1 == 400  # at least the model's size, kept inside
    assert x0 <= 380 - 8 and y0 <= 100 - 8 and y1 >= 120 + 8
    x0, y0, x1, y1 = get(mask, pad=40, min_size=64)
    assert x1 - x0 == y1 - y0 == 100  # 20 px high + 2 x 40: the longer side, square
    wide = np.zeros((50, 400), bool)
    wide[20:30, 10:390] = True
    assert get(wide, pad=4, min_size=64) == (6, 0, 394, 50)  # cannot be square: cut to image
    with pytest.raises(ValueError, match="empty"):
        get(np.zeros((8, 8), bool), 2, 4)


@pytest.fixture(scope="module")
def large_case(tmp_path_factory: pytest.TempPathFactory):
    """A synthetic case at 192 px (3x the model's size) with a small mask."""
    root = tmp_path_factory.mktemp("large")
    write_synthetic_benchmark(root, 1, seed=4, image_size=192, namespace="validation")
    (found,), _ = load_benchmark(root)
    mask = np.zeros(found.mask.shape, bool)
    mask[80:100, 90:110] = True
    return found.image, mask, found.reference


def test_padded_crop_changes_only_the_mask(shipped: RefineByAlignPipeline, large_case) -> None:
    image, mask, reference = large_case
    settings = RefinementConfig(num_steps=3, dilate=2, feather=2, padding_mask_crop=16)
    region = shipped.crop_region(mask, settings)
    assert region is not None and region[2] - region[0] == 64  # the crop, at model size
    out = shipped(image, mask, reference, settings, seed=1).images[0]
    from evaluation.refinement import dilated_mask

    inside = dilated_mask(mask, settings.dilate)
    assert np.array_equal(out[~inside], image[~inside])  # bit for bit outside
    assert not np.array_equal(out[mask], image[mask])
    whole = shipped(image, mask, reference, replace(settings, padding_mask_crop=None),
                    seed=1).images[0]
    assert not np.array_equal(out[mask], whole[mask])  # the crop is what the model saw


def test_padded_crop_of_an_image_at_model_size_is_the_whole_image(
        shipped: RefineByAlignPipeline) -> None:
    rec = np.load(FIXTURE)
    settings = RefinementConfig(num_steps=3, padding_mask_crop=4)
    assert shipped.crop_region(rec["a_mask"], settings) is None
    on = shipped(rec["a_image"], rec["a_mask"], rec["a_reference"], settings, seed=3)
    off = shipped(rec["a_image"], rec["a_mask"], rec["a_reference"],
                  replace(settings, padding_mask_crop=None), seed=3)
    np.testing.assert_array_equal(on.images[0], off.images[0])


if __name__ == "__main__":  # record the shipped model's outputs on the fixed cases again
    torch.set_num_threads(1)
    recorded = dict(np.load(FIXTURE))
    recorded.update(refine_recorded_cases(load_pipeline(DEFAULT_EXPORT), recorded))
    np.savez_compressed(FIXTURE, **recorded)
    print(f"recorded {FIXTURE}")
