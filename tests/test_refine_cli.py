"""scripts/refine.py: both stages end to end, exact pixels outside the mask, clear errors."""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from omegaconf import OmegaConf
from PIL import Image

from models.pipeline import load_alignment
from tests.test_refinement import tiny_export  # noqa: F401  (session fixture)

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


def test_refine_at_non_native_size_keeps_outside(tmp_path: Path, tiny_export: Path) -> None:  # noqa: F811
    paths = _write_inputs(tmp_path)
    alignment = tmp_path / "alignment.yaml"
    alignment.write_text("timestep: 500\nblock: 2\nthreshold: 0.4\nmargin: 0.2\n")
    out = tmp_path / "out"
    assert refine.main(_argv(paths, out, tiny_export, "--alignment", str(alignment),
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


def test_refine_errors(tmp_path: Path, tiny_export: Path, caplog) -> None:  # noqa: F811
    (tmp_path / "e").mkdir()
    (tmp_path / "m").mkdir()
    empty = _write_inputs(tmp_path / "e", empty=True)
    assert refine.main(_argv(empty, tmp_path / "o1", tiny_export)) == 2
    assert "empty" in caplog.text

    mismatch = _write_inputs(tmp_path / "m", mask_size=(64, 64))
    assert refine.main(_argv(mismatch, tmp_path / "o2", tiny_export)) == 2
    assert "does not match" in caplog.text

    missing = dict(empty, reference=tmp_path / "nope.png")
    assert refine.main(_argv(missing, tmp_path / "o3", tiny_export)) == 2
    assert "not found" in caplog.text

    with pytest.raises(FileNotFoundError):
        load_alignment(tmp_path / "no_alignment.yaml")


def test_alignment_prefers_the_exports_calibration(tmp_path: Path) -> None:
    (tmp_path / "alignment.yaml").write_text("timestep: 42\nblock: 5\n")
    chosen = load_alignment(export_dir=tmp_path)
    assert (chosen.timestep, chosen.block) == (42, 5)
    explicit = tmp_path / "other.yaml"
    explicit.write_text("timestep: 7\nblock: 1\nthreshold: 0.3\n")
    chosen = load_alignment(explicit, export_dir=tmp_path)
    assert (chosen.timestep, chosen.block, chosen.threshold) == (7, 1, 0.3)



def test_uncalibrated_export_is_refused_or_loudly_defaulted(tmp_path: Path, caplog) -> None:
    with pytest.raises(FileNotFoundError, match="no calibrated alignment.yaml"):
        load_alignment(export_dir=tmp_path)
    sd15_like = SimpleNamespace(config=OmegaConf.create({"val_timestep": 500, "val_block": 9}))
    with caplog.at_level(logging.WARNING):
        chosen = load_alignment(export_dir=tmp_path, components=sd15_like)
    assert (chosen.timestep, chosen.block) == (500, 9)
    assert "UNCALIBRATED" in caplog.text and str(tmp_path) in caplog.text


def test_refine_a_benchmark_folder(tmp_path: Path, tiny_export: Path) -> None:  # noqa: F811
    from data.benchmark import write_synthetic_benchmark

    bench = tmp_path / "bench"
    write_synthetic_benchmark(bench, 2, seed=5, image_size=64, reference_size=96)
    (bench / "broken").mkdir()
    out = tmp_path / "out"
    assert refine.main(["--bench-dir", str(bench), "--out", str(out), "--ckpt",
                        str(tiny_export), "--steps", "2"]) == 0
    done = sorted(p.name for p in out.iterdir())
    assert len(done) == 2 and "broken" not in done
    for name in done:
        crop = Image.open(out / name / "crop.png")
        assert crop.size[0] == crop.size[1]  # the square crop training uses
    assert refine.main(["--bench-dir", str(tmp_path / "none"), "--out", str(out)]) == 2
