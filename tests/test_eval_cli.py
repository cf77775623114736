"""eval.py end to end on a tiny random export: report, figures, alignment.yaml, skipped cases,
held-out calibration, the training-data check, and loud failures."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from data.benchmark import write_synthetic_benchmark
from data.provenance import write_training_data
from evaluation.report import validate_report
from models.pipeline import AlignmentConfig, RefinementConfig
from tests.conftest import compose_config, save_random_pipeline

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_random_pipeline(Path(tmp_path_factory.mktemp("export")))


def test_eval_cli_end_to_end(tmp_path: Path, export_dir: Path) -> None:
    bench = tmp_path / "bench"
    write_synthetic_benchmark(bench, 4, seed=0, image_size=64, reference_size=224)
    broken = bench / "99999_broken"
    broken.mkdir()
    (broken / "image.png").write_bytes((bench / "00000" / "image.png").read_bytes())
    (broken / "reference.png").write_bytes((bench / "00000" / "reference.png").read_bytes())
    run_dir = tmp_path / "run"
    cmd = [sys.executable, str(REPO / "eval.py"), f"bench_dir={bench}",
           f"ckpt_path={export_dir}", "sweep.num_timesteps=3", "sweep.topk=[1,3]",
           "refinement.methods=[input,telea]", "qualitative.num_cases=2", "num_threads=1",
           "denoising_gain.timesteps=[50,700]", "progress=false", f"hydra.run.dir={run_dir}"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    last = proc.stdout.strip().splitlines()[-1]
    assert last == f"report: {run_dir / 'report.json'}"
    assert "%|" not in proc.stderr + proc.stdout  # progress=false: no bar of any stage

    report = json.loads((run_dir / "report.json").read_text())
    validate_report(report)
    assert report["counts"]["skipped"] == 1 and report["counts"]["cases_loaded"] == 4
    assert report["skipped"][0]["id"] == "99999_broken"
    assert "mask" in report["skipped"][0]["reason"]
    corr = report["correspondence"]
    assert len(corr["table"]["mask"]) == 3 and corr["num_cases"] == 4
    # calibrated on one half, every headline row measured on the other
    cal, rep = corr["split"]["calibration_ids"], corr["split"]["report_ids"]
    assert corr["split"]["held_out"] and len(cal) == len(rep) == 2
    assert sorted(cal + rep) == ["00000", "00001", "00002", "00003"]
    assert report["counts"]["calibration_cases"] == 2 and report["counts"]["report_cases"] == 2
    assert corr["deployed"]["num_cases"] == 2 and corr["by_category"]["synthetic"]["num_cases"] == 2
    assert report["refinement_counts"]["cases"] == 2
    assert corr["stability"]["resamples"] == 200 and corr["stability"]["wins"]
    sampling = report["refinement_status"].pop("sampling")
    assert report["refinement_status"] == {"run": True, "reason": None, "error": None}
    assert sampling == asdict(RefinementConfig())  # the config group's defaults are the class's
    assert "ddpm, 25 steps, guidance 1, to the end" in (run_dir / "report.md").read_text()
    assert set(report["refinement"]) == {"input", "telea"}
    assert isinstance(report["refinement"]["telea"]["gms"], float)
    per_case = report["refinement_per_case"]["telea"]
    assert sorted(per_case) == sorted(rep)  # the report cases, not the calibration ones
    assert report["refinement"]["telea"]["l1"] == pytest.approx(
        sum(v["l1"] for v in per_case.values()) / len(per_case))
    # the export has no training_data.yaml: said first, not hidden
    assert report["data_provenance"]["status"] == "unknown"
    assert report["warnings"][0].startswith("UNKNOWN PROVENANCE")
    for rel in report["figures"].values():
        assert (run_dir / rel).is_file()
    assert {"timestep_curve", "layer_curve", "heatmap_mask", "qualitative"} <= set(
        report["figures"])
    md = (run_dir / "report.md").read_text()
    assert "99999_broken" in md and "feature_matching" in md and "UNKNOWN PROVENANCE" in md
    # both read-outs swept on the same split; the deployed one is what alignment.yaml says
    readouts = corr["readouts"]
    assert set(readouts) == {"forward_noise", "trajectory"}
    assert readouts["forward_noise"]["deployed"] and not readouts["trajectory"]["deployed"]
    assert readouts["forward_noise"]["layer"] == corr["best"]["layer"]
    assert report["alignment"]["readout"] == "forward_noise" and "Read-outs side by side" in md
    chosen = AlignmentConfig(**OmegaConf.load(run_dir / "alignment.yaml"))
    assert chosen.timestep == corr["best"]["t"] and chosen.block == corr["best"]["layer"]
    # the denoising gain on the report cases, both references, its table and figure
    gain = report["denoising_gain"]
    assert gain["timesteps"] == [50, 700] and gain["prediction_type"] == "v_prediction"
    for ref in ("whole", "crop"):
        node = gain["references"][ref]
        assert node["num_cases"] == 2 and [r["t"] for r in node["rows"]] == [50, 700]
    assert "## Denoising gain" in md and "ground-truth crop (2 case(s))" in md
    assert report["figures"]["denoising_gain"] == "figures/denoising_gain.png"


def test_eval_generates_benchmark_when_bench_dir_is_null(tmp_path: Path,
                                                         export_dir: Path) -> None:
    import eval as eval_script

    cfg = compose_config([f"ckpt_path={export_dir}", "bench_cases=2", "sweep.num_timesteps=2",
                          "sweep.topk=[1]", "run_refinement=false", "progress=false",
                          "num_threads=1", "qualitative.num_cases=1"], config_name="eval")
    previous = torch.get_num_threads()
    try:
        path = eval_script.evaluate(cfg, tmp_path / "run")
    finally:
        torch.set_num_threads(previous)
    report = json.loads(path.read_text())
    validate_report(report)
    assert report["counts"]["cases_loaded"] == 2 and report["counts"]["skipped"] == 0
    assert Path(report["meta"]["bench_dir"]) == tmp_path / "run" / "benchmark"
    assert report["refinement_status"] == {"run": False, "reason": "run_refinement=false",
                                           "error": None}
    generators = report["data_provenance"]["benchmark"]["generators"]
    assert generators == [{"namespace": "benchmark", "seed": 0, "cases": 2}]


QUICK = ["sweep.num_timesteps=2", "sweep.topk=[1]", "sweep.bootstrap=20", "progress=false",
         "num_threads=1", "qualitative.num_cases=1", "denoising_gain.timesteps=[400]"]


def _evaluate(overrides: list[str], run_dir: Path) -> Path:
    import eval as eval_script

    cfg = compose_config([*QUICK, *overrides], config_name="eval")
    previous = torch.get_num_threads()
    try:
        return eval_script.evaluate(cfg, run_dir)
    finally:
        torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def recorded_export(export_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same export with the training_data.yaml train.py writes (train seed 0)."""
    import shutil

    out = Path(tmp_path_factory.mktemp("recorded")) / "export"
    shutil.copytree(export_dir, out)
    write_training_data(compose_config([]).data, out)
    return out


def test_eval_refuses_a_benchmark_drawn_from_the_training_data(
        tmp_path: Path, recorded_export: Path) -> None:
    import eval as eval_script

    leaked = tmp_path / "leaked"
    write_synthetic_benchmark(leaked, 2, seed=0, namespace="train")  # = training items 0, 1
    base = [f"ckpt_path={recorded_export}", f"bench_dir={leaked}", "run_refinement=false"]
    with pytest.raises(eval_script.EvalError, match="provenance.*OVERLAP.*train/seed 0"):
        _evaluate(base, tmp_path / "refused")
    report = json.loads(_evaluate([*base, "train_overlap=warn"], tmp_path / "warned").read_text())
    assert report["data_provenance"]["status"] == "overlap"
    assert report["data_provenance"]["overlapping_cases"] == 2
    assert report["warnings"][0].startswith("OVERLAP")
    assert "OVERLAP" in (tmp_path / "warned" / "report.md").read_text()

    clean = tmp_path / "clean"
    write_synthetic_benchmark(clean, 2, seed=0)  # same seed, benchmark namespace
    report = json.loads(_evaluate([f"ckpt_path={recorded_export}", f"bench_dir={clean}",
                                   "run_refinement=false"], tmp_path / "ok").read_text())
    assert report["data_provenance"]["status"] == "disjoint" and report["warnings"] == []


def test_a_failed_refinement_fails_the_run_after_writing_the_report(
        tmp_path: Path, export_dir: Path) -> None:
    import eval as eval_script

    bench = tmp_path / "bench"
    write_synthetic_benchmark(bench, 2, seed=0)
    with pytest.raises(eval_script.EvalError, match="stage 'refinement'.*unknown methods") as err:
        _evaluate([f"ckpt_path={export_dir}", f"bench_dir={bench}",
                   "refinement.methods=[input,no_such_method]"], tmp_path / "run")
    report = json.loads(err.value.report.read_text())
    assert report["refinement_status"]["run"] is False
    assert "unknown methods" in report["refinement_status"]["error"]
    assert report["warnings"][-1].startswith("REFINEMENT FAILED")


def test_eval_exits_nonzero_when_no_case_is_valid(tmp_path: Path, export_dir: Path) -> None:
    bench = tmp_path / "bench"
    write_synthetic_benchmark(bench, 2, seed=0)
    (bench / "00000" / "mask.png").unlink()
    (bench / "00001" / "reference.png").write_bytes(b"not an image")
    cmd = [sys.executable, str(REPO / "eval.py"), f"bench_dir={bench}",
           f"ckpt_path={export_dir}", "progress=false", f"hydra.run.dir={tmp_path / 'run'}"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "stage 'load'" in proc.stderr
    assert "00000: missing required file(s): mask" in proc.stderr
    assert "00001: unreadable reference.png" in proc.stderr
    assert not (tmp_path / "run" / "report.json").exists()


def test_eval_writes_the_calibrated_read_out_into_the_pipeline_folder(
        tmp_path: Path, export_dir: Path) -> None:
    """write_alignment_to_export=true: the evaluated folder deploys the new (t*, block*), with
    what calibrated it; off by default (the default export is tracked)."""
    import shutil

    from models.export import load_pipeline
    from models.pipeline import read_alignment

    assert compose_config([], config_name="eval").write_alignment_to_export is False
    export = shutil.copytree(export_dir, tmp_path / "export")
    assert not load_pipeline(export).calibrated
    bench = tmp_path / "bench"
    write_synthetic_benchmark(bench, 2, seed=0)
    _evaluate([f"bench_dir={bench}", "run_refinement=false", "write_alignment_to_export=true",
               f"ckpt_path={export}"], tmp_path / "run")
    calibrated = tmp_path / "run" / "alignment.yaml"
    assert calibrated.read_text().startswith("# calibrated by eval.py")
    pipe = load_pipeline(export)
    assert pipe.alignment == read_alignment(calibrated)
    assert pipe.calibrated and pipe.config.calibration.startswith("calibrated by eval.py")
