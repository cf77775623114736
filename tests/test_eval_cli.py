"""eval.py end to end on a tiny random export: report, figures, alignment.yaml, skipped cases."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import hydra
import pytest
import torch
from omegaconf import OmegaConf

from data.benchmark import write_synthetic_benchmark
from evaluation.report import validate_report
from models.export import save_export
from models.pipeline import AlignmentConfig
from tests.conftest import compose_config

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    cfg = compose_config([])
    module = hydra.utils.instantiate(cfg.model)
    return save_export(module.inference_state_dict(), cfg.model,
                       Path(tmp_path_factory.mktemp("export")))


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
           "progress=false", f"hydra.run.dir={run_dir}"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    last = proc.stdout.strip().splitlines()[-1]
    assert last == f"report: {run_dir / 'report.json'}"

    report = json.loads((run_dir / "report.json").read_text())
    validate_report(report)
    assert report["counts"]["skipped"] == 1 and report["counts"]["cases_loaded"] == 4
    assert report["skipped"][0]["id"] == "99999_broken"
    assert "mask" in report["skipped"][0]["reason"]
    corr = report["correspondence"]
    assert len(corr["table"]["mask"]) == 3 and corr["num_cases"] == 4
    assert report["refinement_status"]["run"] is True
    assert set(report["refinement"]) == {"input", "telea"}
    for rel in report["figures"].values():
        assert (run_dir / rel).is_file()
    assert {"timestep_curve", "layer_curve", "heatmap_mask", "qualitative"} <= set(
        report["figures"])
    md = (run_dir / "report.md").read_text()
    assert "99999_broken" in md and "feature_matching" in md
    chosen = AlignmentConfig(**OmegaConf.load(run_dir / "alignment.yaml"))
    assert chosen.timestep == corr["best"]["t"] and chosen.block == corr["best"]["layer"]


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
    assert report["refinement_status"] == {"run": False, "reason": "run_refinement=false"}
