"""scripts/alignment_noise.py reproduces both of an eval's numbers from their noise seeds."""

from __future__ import annotations

import json
from pathlib import Path

import hydra
import numpy as np
import pytest
import torch
import yaml

from data.benchmark import load_benchmark, write_synthetic_benchmark
from evaluation.sweep import collect_vectors, normalised_grids, score_grids
from models.export import load_export, save_export
from tests.conftest import compose_config


def test_runs_reproduce_the_sweep_cell_and_the_deployed_row(tmp_path) -> None:
    from scripts.alignment_noise import main

    torch.manual_seed(0)
    cfg = compose_config([])
    export = tmp_path / "export"
    save_export(hydra.utils.instantiate(cfg.model).inference_state_dict(), cfg.model, export)
    bench = tmp_path / "bench"
    ids = write_synthetic_benchmark(bench, 4, seed=5)
    timestep, block = 501, 2
    eval_dir = tmp_path / "eval"
    eval_dir.mkdir()
    (eval_dir / "alignment.yaml").write_text(yaml.safe_dump({"timestep": timestep,
                                                             "block": block}))
    report_ids = ids[1:3]
    (eval_dir / "report.json").write_text(json.dumps({"correspondence": {
        "split": {"report_ids": report_ids}, "best": {"miou_mask": 0.5},
        "deployed": {"miou_mask": 0.4}}}))

    result = main(["--export", str(export), "--eval-dir", str(eval_dir), "--benchmark",
                   str(bench), "--seeds", "2"])
    assert torch.is_grad_enabled()  # in-process callers (these tests) keep autograd

    # per-case noise, seed 0: the sweep's own cell, computed here the sweep's way
    components = load_export(export)
    cases = [c for c in load_benchmark(bench)[0] if c.reference_mask is not None]
    vectors = collect_vectors(components, cases, [timestep], [block], [0], progress=False)
    encoder = components.reference_encoder
    grids = normalised_grids(vectors, encoder.grid, encoder.num_prefix_tokens)
    swept = [float(score_grids(grids[i, 0, 0], torch.from_numpy(
        np.array(c.reference_mask, dtype=np.float32)), 0.5)[0][0])
        for i, c in enumerate(cases) if c.id in report_ids]
    assert result["miou_mask"]["per_case"][0] == pytest.approx(np.mean(swept), abs=1e-4)
    assert result["num_cases"] == 2 and len(result["miou_mask"]["shared"]) == 2
    assert result["eval_swept_cell"] == 0.5 and result["eval_deployed"] == 0.4


def test_refuses_a_benchmark_that_is_not_the_evals(tmp_path) -> None:
    from scripts.alignment_noise import main

    bench = tmp_path / "bench"
    write_synthetic_benchmark(bench, 2, seed=5)
    eval_dir = tmp_path / "eval"
    eval_dir.mkdir()
    (eval_dir / "alignment.yaml").write_text("timestep: 501\nblock: 2\n")
    (eval_dir / "report.json").write_text(json.dumps({"correspondence": {
        "split": {"report_ids": ["no-such-case"]}, "best": {"miou_mask": 0},
        "deployed": {"miou_mask": 0}}}))
    with pytest.raises(SystemExit, match="not the benchmark that eval scored"):
        main(["--export", str(Path("unused")), "--eval-dir", str(eval_dir), "--benchmark",
              str(bench)])
