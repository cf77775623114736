"""scripts/refine.py: both stages end to end, exact pixels outside the mask, clear errors."""

from __future__ import annotations

import importlib.util
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf
from PIL import Image

from models.export import load_pipeline, preset_alignment, write_alignment
from models.pipeline import AlignmentConfig, read_alignment

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "refine.py"


def _load_script():
    spec = importlib.util.spec_from_file_location("refine_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


refine = _load_script()


def _write_inputs(folder: Path, size: tuple[int, int] = (90, 70), empty: bool = False,
                  mask_size: tuple[int, int] | None = None) -> dict[str, Path]:
    """An image of (width, height) ``size``, an RGB mask and a 150x120 reference as files."""
    rng = np.random.default_rng(0)
    width, height = size
    image = rng.integers(0, 256, (height, width, 3)).astype(np.uint8)
    mw, mh = mask_size or size
    mask = np.zeros((mh, mw, 3), np.uint8)
    if not empty:
        mask[mh // 4: mh // 2, mw // 3: 2 * mw // 3] = (255, 0, 0)  # any nonzero channel counts
    reference = rng.integers(0, 256, (120, 150, 3)).astype(np.uint8)
    paths = {"image": folder / "image.png", "mask": folder / "mask.png",
             "reference": folder / "reference.jpg"}
    Image.fromarray(image).save(paths["image"])
    Image.fromarray(mask).save(paths["mask"])
    Image.fromarray(reference).save(paths["reference"])
    return paths


def _argv(paths: dict[str, Path], out: Path, ckpt: Path, *extra: str) -> list[str]:
    return ["--image", str(paths["image"]), "--mask", str(paths["mask"]), "--reference",
            str(paths["reference"]), "--out", str(out), "--ckpt", str(ckpt), "--steps", "2",
            "--device", "cpu", *extra]


def test_refine_at_non_native_size_keeps_outside(tmp_path: Path, tiny_pipeline_dir: Path) -> None:
    paths = _write_inputs(tmp_path)
    alignment = tmp_path / "alignment.yaml"
    alignment.write_text("timestep: 500\nblock: 2\nthreshold: 0.4\nmargin: 0.2\n")
    out = tmp_path / "out"
    assert refine.main(_argv(paths, out, tiny_pipeline_dir, "--alignment", str(alignment),
                             "--dilate", "2", "--feather", "1")) == 0
    for name in ("refined.png", "correspondence.png", "crop.png"):
        assert (out / name).is_file()
    image = np.asarray(Image.open(paths["image"]).convert("RGB"))
    mask = np.asarray(Image.open(paths["mask"]).convert("RGB")).any(-1)
    refined = np.asarray(Image.open(out / "refined.png"))
    assert refined.shape == image.shape
    from evaluation.refinement import dilated_mask

    outside = ~dilated_mask(mask, 2)
    assert np.array_equal(refined[outside], image[outside])
    assert not np.array_equal(refined[mask], image[mask])
    assert Image.open(out / "correspondence.png").size == (150, 120)


def test_refine_errors(tmp_path: Path, tiny_pipeline_dir: Path, caplog) -> None:
    (tmp_path / "e").mkdir()
    (tmp_path / "m").mkdir()
    empty = _write_inputs(tmp_path / "e", empty=True)
    assert refine.main(_argv(empty, tmp_path / "o1", tiny_pipeline_dir)) == 2
    assert "empty" in caplog.text

    mismatch = _write_inputs(tmp_path / "m", mask_size=(64, 64))
    assert refine.main(_argv(mismatch, tmp_path / "o2", tiny_pipeline_dir)) == 2
    assert "does not match" in caplog.text

    missing = dict(empty, reference=tmp_path / "nope.png")
    assert refine.main(_argv(missing, tmp_path / "o3", tiny_pipeline_dir)) == 2
    assert "not found" in caplog.text

    with pytest.raises(FileNotFoundError):
        read_alignment(tmp_path / "no_alignment.yaml")
    (tmp_path / "odd.yaml").write_text("timestep: 7\nblok: 1\n")
    with pytest.raises(ValueError, match="unknown alignment keys.*blok"):
        read_alignment(tmp_path / "odd.yaml")


def test_alignment_is_the_folders_calibration_unless_given(tmp_path: Path,
                                                          tiny_pipeline_dir: Path) -> None:
    folder = shutil.copytree(tiny_pipeline_dir, tmp_path / "calibrated")
    write_alignment(folder, AlignmentConfig(timestep=42, block=5), "a test calibration")
    pipe, _ = refine.build_pipeline(refine.parse_args(_argv(_write_inputs(tmp_path),
                                                            tmp_path / "o", folder)))
    assert (pipe.alignment.timestep, pipe.alignment.block) == (42, 5) and pipe.calibrated
    explicit = tmp_path / "other.yaml"
    explicit.write_text("timestep: 7\nblock: 1\nthreshold: 0.3\n")
    pipe, _ = refine.build_pipeline(refine.parse_args(_argv(
        _write_inputs(tmp_path), tmp_path / "o", folder, "--alignment", str(explicit))))
    chosen = pipe.alignment
    assert (chosen.timestep, chosen.block, chosen.threshold) == (7, 1, 0.3)


def test_uncalibrated_folder_loads_the_presets_default_loudly(tiny_pipeline_dir: Path,
                                                              caplog) -> None:
    with caplog.at_level(logging.WARNING):
        pipe = load_pipeline(tiny_pipeline_dir)
    model_cfg = OmegaConf.load(tiny_pipeline_dir / "model.yaml")
    assert not pipe.calibrated
    assert (pipe.alignment.timestep, pipe.alignment.block) == (model_cfg.val_timestep,
                                                                model_cfg.val_block)
    assert "UNCALIBRATED" in caplog.text and str(tiny_pipeline_dir) in caplog.text
    sd15_like = OmegaConf.create({"val_timestep": 500, "val_block": 9})
    assert (preset_alignment(sd15_like).timestep, preset_alignment(sd15_like).block) == (500, 9)


def test_refine_a_benchmark_folder(tmp_path: Path, tiny_pipeline_dir: Path) -> None:
    from data.benchmark import write_synthetic_benchmark

    bench = tmp_path / "bench"
    write_synthetic_benchmark(bench, 2, seed=5, image_size=64, reference_size=96)
    (bench / "broken").mkdir()
    out = tmp_path / "out"
    assert refine.main(["--bench-dir", str(bench), "--out", str(out), "--ckpt",
                        str(tiny_pipeline_dir), "--steps", "2"]) == 0
    done = sorted(p.name for p in out.iterdir())
    assert len(done) == 2 and "broken" not in done
    for name in done:
        crop = Image.open(out / name / "crop.png")
        assert crop.size[0] == crop.size[1]  # the square crop training uses
    assert refine.main(["--bench-dir", str(tmp_path / "none"), "--out", str(out)]) == 2


def test_sampling_options_reach_the_pipeline(tmp_path: Path, tiny_pipeline_dir: Path) -> None:
    paths = _write_inputs(tmp_path)
    _, plain = refine.build_pipeline(refine.parse_args(_argv(paths, tmp_path / "o",
                                                             tiny_pipeline_dir)))
    _, early = refine.build_pipeline(refine.parse_args(_argv(
        paths, tmp_path / "o", tiny_pipeline_dir, "--final-x0-timestep", "1000",
        "--padding-mask-crop", "8")))
    assert plain.final_x0_timestep is None and plain.padding_mask_crop is None
    assert (early.final_x0_timestep, early.padding_mask_crop, early.num_steps) == (1000, 8, 2)
