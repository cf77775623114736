"""Other systems' outputs (external_methods.NAME=DIR): read, scored like ours, paired with ours,
missing cases named."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from data.benchmark import load_benchmark, write_synthetic_benchmark
from evaluation import metrics as M
from evaluation.external import ExternalError, load_external, load_external_methods
from evaluation.refinement import METHODS, evaluate_refinement
from evaluation.sweep import split_ids
from models.export import load_pipeline
from tests.conftest import compose_config, save_random_pipeline


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_random_pipeline(Path(tmp_path_factory.mktemp("export")))


@pytest.fixture(scope="module")
def cases(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("bench")
    write_synthetic_benchmark(root, 3, seed=0)
    cases, _ = load_benchmark(root)
    cases[2].meta["category"] = "try_on"
    return cases


def _write(directory: Path, images: dict[str, np.ndarray]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for case_id, image in images.items():
        Image.fromarray(image).save(directory / f"{case_id}.png")
    return directory


def _noisy(image: np.ndarray, seed: int) -> np.ndarray:
    noise = np.random.default_rng(seed).integers(-40, 41, image.shape)
    return np.clip(image.astype(int) + noise, 0, 255).astype(np.uint8)


def test_outputs_are_read_resized_and_missing_cases_named(cases, tmp_path, caplog) -> None:
    small = np.asarray(Image.fromarray(cases[1].image).resize((40, 40)))
    folder = _write(tmp_path / "sys", {"00000": cases[0].image, "00001": small})
    (folder / "notes.txt").write_text("not an output")
    with caplog.at_level(logging.WARNING):
        found = load_external("sys", folder, cases)
    assert sorted(found.outputs) == ["00000", "00001"] and found.missing == ["00002"]
    assert found.resized == ["00001"] and found.outputs["00001"].shape == cases[1].image.shape
    np.testing.assert_array_equal(found.outputs["00000"], cases[0].image)
    assert found.summary()["unused_files"] == 1
    assert "00002" in found.warning(3) and "00002" in caplog.text and "00001" in caplog.text

    with pytest.raises(ExternalError, match="none of the 3 case"):
        load_external("empty", _write(tmp_path / "empty", {}), cases)
    with pytest.raises(ExternalError, match="is not a folder"):
        load_external("gone", tmp_path / "gone", cases)
    with pytest.raises(ExternalError, match="aligned_crop"):
        load_external_methods({"aligned_crop": str(folder)}, cases, METHODS)


def test_external_scores_are_the_metrics_and_an_input_copy_scores_as_input(
        cases, export_dir, tmp_path) -> None:
    noisy = {c.id: _noisy(c.target, i) for i, c in enumerate(cases)}
    external = {
        "noisy": load_external("noisy", _write(tmp_path / "noisy", noisy), cases).outputs,
        "copy": load_external("copy", _write(tmp_path / "copy", {c.id: c.image for c in cases}),
                              cases).outputs,
    }
    cfg = OmegaConf.create({"methods": ["input"], "batch_size": 2})
    result = evaluate_refinement(cases, load_pipeline(export_dir), None, cfg, progress=False,
                                 external=external)
    for case in cases:
        got = result["per_case"]["noisy"][case.id]
        assert got["psnr"] == M.psnr_in_box(noisy[case.id], case.target, case.mask)
        assert got["ssim"] == M.ssim_in_box(noisy[case.id], case.target, case.mask)
        assert got["l1"] == M.masked_l1(noisy[case.id], case.target, case.mask)
        assert got["gms"] == M.gradient_similarity(noisy[case.id], case.target, case.mask)
        assert got["clip"] == M.NOT_CACHED
    assert result["methods"]["noisy"]["l1"] == pytest.approx(
        np.mean([M.masked_l1(noisy[c.id], c.target, c.mask) for c in cases]))
    # outputs equal to the input: the input row, exactly, in every table
    assert result["methods"]["copy"] == result["methods"]["input"]
    assert result["per_case"]["copy"] == result["per_case"]["input"]
    for methods in result["by_category"].values():
        assert methods["copy"] == methods["input"]
    assert result["counts"]["scored"] == {"input": 3, "noisy": 3, "copy": 3}


def test_external_methods_parse_without_a_plus_and_are_not_fingerprinted() -> None:
    from evaluation.cache import result_settings

    cfg = compose_config(["external_methods.pbe=/x/pbe", "external_methods.anydoor=rel/out"],
                         config_name="eval")
    assert OmegaConf.to_container(cfg.external_methods) == {"pbe": "/x/pbe",
                                                            "anydoor": "rel/out"}
    assert compose_config([], config_name="eval").external_methods == {}
    assert not any(k.startswith("external_methods") for k in result_settings(cfg))


def test_eval_names_a_missing_case_and_pairs_on_the_cases_both_have(
        export_dir, tmp_path, caplog) -> None:
    import eval as eval_script

    bench = tmp_path / "bench"
    write_synthetic_benchmark(bench, 4, seed=0)
    all_cases, _ = load_benchmark(bench)
    _, report_ids = split_ids([c.id for c in all_cases], 0.5, 0)
    missing = report_ids[0]
    _write(tmp_path / "sys", {c.id: _noisy(c.target, 1) for c in all_cases if c.id != missing})
    cfg = compose_config([f"bench_dir={bench}", f"ckpt_path={export_dir}",
                          f"external_methods.sys={tmp_path / 'sys'}",
                          "refinement.methods=[input,telea]", "sweep.num_timesteps=2",
                          "sweep.topk=[1]", "sweep.bootstrap=0", "sweep.compare_readouts=[]",
                          "qualitative.num_cases=1", "progress=false", "num_threads=1"],
                         config_name="eval")
    previous = torch.get_num_threads()
    try:
        with caplog.at_level(logging.WARNING):
            path = eval_script.evaluate(cfg, tmp_path / "run")
    finally:
        torch.set_num_threads(previous)
    report = json.loads(path.read_text())
    assert report["external_methods"]["sys"]["missing"] == [missing]
    assert any(missing in w and w.startswith("EXTERNAL sys") for w in report["warnings"])
    assert missing in caplog.text and missing in (tmp_path / "run" / "report.md").read_text()
    assert report["refinement_counts"]["scored"]["sys"] == len(report_ids) - 1
    assert set(report["refinement"]) == {"input", "telea", "sys"}
    per_case = report["refinement_per_case"]
    both = sorted(set(per_case["sys"]) & set(per_case["telea"]))
    assert both == sorted(set(report_ids) - {missing})
    l1 = report["refinement_paired"]["sys"]["vs"]["telea"]["l1"]
    assert l1["cases"] == len(both)
    assert l1["mean_difference"] == pytest.approx(
        np.mean([per_case["telea"][i]["l1"] - per_case["sys"][i]["l1"] for i in both]))
    assert "External method `sys` vs ours" in (tmp_path / "run" / "report.md").read_text()
