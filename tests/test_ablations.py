"""scripts/run_ablations.py: statistics, loud report reading, configs, and a smoke run."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _script():
    spec = importlib.util.spec_from_file_location("run_ablations",
                                                  REPO / "scripts" / "run_ablations.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


abl = _script()


def test_t_quantiles_match_the_tables():
    for df, want in [(1, 12.7062), (2, 4.3027), (4, 2.7764), (9, 2.2622), (30, 2.0423)]:
        assert abl.t_quantile(0.975, df) == pytest.approx(want, abs=1e-4)


def test_t_interval_of_three_seeds():
    cell = abl.t_interval([1.0, 2.0, 3.0])
    assert cell["mean"] == 2.0 and cell["n"] == 3
    assert cell["half_width"] == pytest.approx(4.3027 / math.sqrt(3), abs=1e-4)
    assert abl.t_interval([0.5])["half_width"] is None


def _report(**refinement_extra) -> dict:
    cell = {"miou_mask": 0.3, "miou_box": 0.4}
    return {
        "correspondence": {"best": dict(cell), "in_sample_best": {"miou_mask": 0.35,
                                                                  "miou_box": 0.45},
                           "baselines": {"same_position_box": {"miou_mask": 0.1,
                                                               "miou_box": 0.2}}},
        "refinement_status": {"run": True, "reason": None},
        "refinement": {"aligned_crop": {"psnr": 14.0, "ssim": 0.3, "l1": 0.2, "clip": "n/a",
                                        **refinement_extra},
                       "input": {"psnr": 15.0, "ssim": 0.4, "l1": 0.1}},
    }


def test_run_values_reads_metrics_and_correspondence_and_extra_metrics():
    values = abl.run_values(_report(detail=0.7), ["aligned_crop", "input"], "x")
    assert values["aligned_crop"]["miou_mask_calibrated"] == 0.3
    assert values["aligned_crop"]["miou_box_in_sample"] == 0.45
    assert values["aligned_crop"]["detail"] == 0.7 and "clip" not in values["aligned_crop"]
    assert "miou_mask_calibrated" not in values["input"]


@pytest.mark.parametrize("breakage, message", [
    (lambda r: r["correspondence"].pop("in_sample_best"), "correspondence.in_sample_best"),
    (lambda r: r["refinement"]["aligned_crop"].update(psnr="not available"), "psnr"),
    (lambda r: r["refinement"].pop("aligned_crop"), "aligned_crop"),
    (lambda r: r.update(refinement_status={"run": False, "reason": "boom"}), "boom"),
])
def test_run_values_fails_loudly_naming_what_is_missing(breakage, message):
    report = _report()
    breakage(report)
    with pytest.raises(abl.AblationError, match=message) as err:
        abl.run_values(report, ["aligned_crop", "input"], "mixed seed 2 (r.json)")
    assert "mixed seed 2" in str(err.value)


@pytest.mark.parametrize("preset", ["cpu", "gpu", "smoke"])
def test_every_training_composes_and_the_benchmark_seed_is_no_training_seed(preset):
    cfg = abl.load_config([f"preset={preset}"])
    jobs = abl.plan(cfg)
    assert len(jobs) == len(cfg.trainings) * len(cfg.seeds)
    assert {j.training: j.methods for j in jobs}["mixed"] == [
        "aligned_crop", "ours_whole_reference", "oracle_crop", "input", "telea"]
    assert abl.check_jobs(cfg, jobs)[1] == 224
    clash = abl.load_config([f"preset={preset}", f"bench_seed={cfg.seeds[0]}"])
    with pytest.raises(abl.AblationError, match="bench_seed"):
        abl.check_jobs(clash, abl.plan(clash))


def test_summary_marks_mIoU_na_off_the_aligned_crop_and_averages_seeds():
    cfg = abl.load_config(["preset=smoke", "seeds=[1,2]", "only=[mixed]"])
    values = {("mixed", s): abl.run_values(_report(), ["aligned_crop", "input"], "x")
              for s in (1, 2)}
    values[("mixed", 2)]["aligned_crop"]["psnr"] = 16.0
    for v in values.values():
        v["ours_whole_reference"] = v["oracle_crop"] = v["telea"] = v["input"]
    table = abl.summarize(cfg, values)
    rows = {r["name"]: r["cells"] for r in table["rows"]}
    assert rows["aligned crop"]["psnr"]["mean"] == 15.0
    assert rows["aligned crop"]["psnr"]["half_width"] == pytest.approx(12.7062, abs=1e-3)
    assert rows["whole reference"]["miou_mask_calibrated"] is None
    assert rows["aligned crop"]["miou_mask_calibrated"]["mean"] == 0.3


def test_baselines_must_agree_across_evaluations():
    same = {("mixed", 1): _report(), ("mixed", 2): _report()}
    assert abl.correspondence_baselines(same)["same_position_box"]["miou_mask"] == 0.1
    other = _report()
    other["correspondence"]["baselines"]["same_position_box"]["miou_mask"] = 0.2
    with pytest.raises(abl.AblationError, match="cls_token seed 3: correspondence baselines"):
        abl.correspondence_baselines({**same, ("cls_token", 3): other})


@pytest.mark.slow
def test_smoke_run_end_to_end_resumes_and_fails_loudly(tmp_path, capsys):
    """2 trainings x 2 seeds x 2 steps, 4 cases: table from the reports, rerun skips all."""
    out, results = tmp_path / "runs", tmp_path / "results"
    args = ["preset=smoke", "seeds=[1,2]", f"out_dir={out}", f"results_dir={results}"]
    abl.main([*args, "only=[mixed,cls_token]"])
    printed = capsys.readouterr().out
    assert printed.strip().splitlines()[-1] == f"table: {results / 'table.md'}"
    assert "[4/4] cls_token seed 2: evaluated in" in printed

    table = json.loads((results / "table.json").read_text())
    rows = {r["name"]: r for r in table["rows"]}
    reports = {s: json.loads((out / "mixed" / f"seed{s}" / "eval" / "report.json").read_text())
               for s in (1, 2)}
    psnr = [reports[s]["refinement"]["oracle_crop"]["psnr"] for s in (1, 2)]
    assert rows["oracle crop"]["cells"]["psnr"]["values"] == psnr
    assert rows["oracle crop"]["cells"]["psnr"]["mean"] == pytest.approx(sum(psnr) / 2)
    best = [reports[s]["correspondence"]["best"]["miou_mask"] for s in (1, 2)]
    assert rows["aligned crop"]["cells"]["miou_mask_calibrated"]["values"] == best
    baselines = reports[1]["correspondence"]["baselines"]
    assert table["meta"]["correspondence_baselines"] == baselines
    assert f"{baselines['whole_reference']['miou_mask']:.3f}" in (results / "table.md").read_text()
    assert all(r["cells"]["miou_mask_calibrated"] is None for r in table["rows"]
               if r["training"] == "cls_token")
    bench = {json.loads((out / t / f"seed{s}" / "eval" / "report.json").read_text())["meta"][
        "bench_dir"] for t in ("mixed", "cls_token") for s in (1, 2)}
    assert bench == {str(out / "benchmark")}
    assert sorted(p.name for p in (results / "reports").iterdir()) == [
        "cls_token_seed1.json", "cls_token_seed2.json", "mixed_seed1.json", "mixed_seed2.json"]
    assert "n/a" in (results / "table.md").read_text()
    first, last = table["meta"]["evaluations_finished"]
    assert first <= last <= table["meta"]["date"]

    weights = out / "mixed" / "seed1" / "export" / "unet" / "diffusion_pytorch_model.safetensors"
    stamp = weights.stat().st_mtime_ns
    abl.main([*args, "only=[mixed,cls_token]"])
    printed = capsys.readouterr().out
    assert printed.count("trained already") == 4 and printed.count("evaluated already") == 4
    assert weights.stat().st_mtime_ns == stamp

    broken = ["preset=smoke", "seeds=[1,2]", f"out_dir={tmp_path / 'broken'}",
              f"results_dir={tmp_path / 'broken_results'}", "only=[cls_token]",
              "trainings.cls_token=['experiment=ablation_cls_token','model.val_block=99']"]
    with pytest.raises(SystemExit, match="training of cls_token seed 1 failed") as err:
        abl.main(broken)
    assert "val_block 99" in str(err.value)
    assert not (tmp_path / "broken_results").exists()
