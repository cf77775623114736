"""report.json schema: a good report passes, broken ones are rejected with the reason."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from evaluation.report import (
    SCHEMA_VERSION,
    ReportError,
    read_report,
    render_markdown,
    upgrade_report,
    validate_report,
    write_report_json,
    write_report_md,
)

REPO = Path(__file__).resolve().parents[1]

PAIR = {"miou_mask": 0.4, "miou_box": 0.5}
GAIN_ROW = {"psnr_noisy": 38.9, "psnr_x0": 39.0, "psnr_gain": 0.1, "psnr_gain_se": 0.05,
            "gms_noisy": 0.99, "gms_x0": 0.99, "gms_gain": 0.0, "gms_gain_se": 0.001}


def good_report() -> dict:
    rows = [[0.1, 0.2, 0.3], [0.4, 0.5, 0.6]]
    unknown = "UNKNOWN PROVENANCE: no training_data.yaml"
    return {
        "schema_version": SCHEMA_VERSION,
        "warnings": [unknown],
        "data_provenance": {"status": "unknown", "message": unknown, "training": None,
                            "benchmark": {"generators": [], "not_generated": 4},
                            "overlapping_cases": 0},
        "meta": {"checkpoint": "ckpt", "bench_dir": "bench", "command": "eval.py",
                 "device": "cpu", "date": "2025-01-01T00:00:00", "versions": {"torch": "x"}},
        "counts": {"cases_found": 5, "cases_loaded": 4, "skipped": 1, "with_reference_mask": 4,
                   "without_reference_mask": 0, "with_target": 4, "sweep_cases": 4,
                   "calibration_cases": 2, "report_cases": 2, "feature_matching_failures": 2},
        "skipped": [{"id": "bad", "reason": "missing required file(s): mask"}],
        "correspondence": {
            "num_cases": 4, "timesteps": [667, 334], "layers": [0, 1, 2], "seeds": [0],
            "threshold": 0.5,
            "table": {"mask": rows, "box": rows},
            "curves": {"timestep": {"mask": [0.2, 0.5], "box": [0.2, 0.5]},
                       "layer": {"mask": [0.25, 0.35, 0.45], "box": [0.25, 0.35, 0.45]}},
            "best": {"t": 334, "t_index": 1, "layer": 2, "miou_mask": 0.55, "miou_box": 0.5,
                     "calibration": {"miou_mask": 0.65, "miou_box": 0.7}},
            "in_sample_best": {"t": 334, "t_index": 1, "layer": 2, **PAIR},
            "split": {"held_out": True, "seed": 0, "calibration_fraction": 0.5,
                      "calibration_ids": ["a", "b"], "report_ids": ["c", "d"]},
            "stability": {"resamples": 200, "seed": 0, "chosen_win_frequency": 0.61,
                          "distinct_winners": 3,
                          "wins": [{"t": 334, "t_index": 1, "layer": 2, "frequency": 0.61},
                                   {"t": 667, "t_index": 0, "layer": 2, "frequency": 0.3}],
                          "held_out_of_resampled_choice": {"mean": 0.5, "low": 0.4,
                                                           "high": 0.55},
                          "chosen_held_out": {"mean": 0.55, "low": 0.3, "high": 0.8}},
            "topk": {"ks": [1, 3], "best_cell": PAIR,
                     "in_sample": [{"k": 1, "cells": [[1, 2]], **PAIR},
                                   {"k": 3, "cells": [[1, 2], [1, 1], [1, 0]], **PAIR}],
                     "in_sample_beats_best_cell": False, "held_out": None, "note": "n"},
            "baselines": {"whole_reference": PAIR, "same_position_box": PAIR,
                          "feature_matching": PAIR},
            "baselines_all_cases": {"whole_reference": PAIR, "same_position_box": PAIR,
                                    "feature_matching": PAIR},
            "feature_matching": {"attempts": 4, "failures": 2, "failed": []},
            "deployed": {**PAIR, "num_cases": 4},
            "by_category": {"synthetic": {"num_cases": 4, "ours": PAIR, "whole_reference": PAIR,
                                          "same_position_box": PAIR, "feature_matching": PAIR}},
        },
        "refinement": {"aligned_crop": {"psnr": 20.0, "gms": 0.7,
                                        "clip": "not available (no weights)"}},
        "refinement_by_category": {"synthetic": {"aligned_crop": {"psnr": 20.0}}},
        "refinement_status": {"run": True, "reason": None, "error": None},
        "denoising_gain": {
            "timesteps": [10, 700], "seed": 0, "psnr_cap": 100.0,
            "prediction_type": "v_prediction", "space": "pixel", "image_size": 64,
            "crop_margin": 0.25, "cases_without_target": 0,
            "references": {"whole": {"num_cases": 2, "rows": [{"t": 10, **GAIN_ROW},
                                                               {"t": 700, **GAIN_ROW}]}}},
        "alignment": {"timestep": 334, "block": 2, "threshold": 0.5, "margin": 0.1},
        "figures": {"heatmap_mask": "figures/heatmap_mask.png"},
    }


def test_good_report_validates_and_renders(tmp_path) -> None:
    report = good_report()
    validate_report(report)
    path = write_report_json(report, tmp_path / "report.json")
    assert json.loads(path.read_text())["correspondence"]["best"]["layer"] == 2
    md = write_report_md(report, tmp_path / "report.md").read_text()
    for text in ("whole_reference", "same_position_box", "feature_matching", "aligned_crop",
                 "synthetic", "figures/heatmap_mask.png", "bad", "gms"):
        assert text in md
    # warnings head the report; the held-out headline comes before the in-sample rows
    assert md.index("WARNING:** UNKNOWN PROVENANCE") < md.index("## Cases")
    assert md.index("Headline (held-out report cases, 2 case(s))") < md.index("Secondary")
    assert "wins 61% of them" in md and "0.550 [0.300, 0.800]" in md
    assert "## Denoising gain" in md and "| 700 | 38.90 | 39.00 | +0.10 +- 0.05 |" in md


def test_report_without_correspondence_or_refinement_is_valid() -> None:
    report = good_report()
    report["correspondence"] = None
    report["refinement"], report["refinement_by_category"] = {}, {}
    report["refinement_status"] = {"run": False, "reason": "run_refinement=false", "error": None}
    report["denoising_gain"] = None
    validate_report(report)
    assert "Not run" in render_markdown(report)
    assert "Denoising gain" not in render_markdown(report)


def _broken(path: str, value=None, delete: bool = False) -> dict:
    report = copy.deepcopy(good_report())
    *parents, last = path.split(".")
    node = report
    for key in parents:
        node = node[key]
    if delete:
        del node[last]
    else:
        node[last] = value
    return report


@pytest.mark.parametrize("report, expected", [
    (_broken("correspondence.best", delete=True), "correspondence.best"),
    (_broken("correspondence.best.t_index", 5), "t_index"),
    (_broken("correspondence.best.t", 667), "does not match"),
    (_broken("correspondence.table.mask", [[0.1, 0.2]]), "table.mask"),
    (_broken("correspondence.baselines.feature_matching", {"miou_mask": 0.1}), "miou_box"),
    (_broken("correspondence.baselines.whole_reference.miou_box", 1.5), "outside [0, 1]"),
    (_broken("counts.skipped", 0), "counts.skipped"),
    (_broken("skipped", [{"id": "x"}]), "skipped"),
    (_broken("meta.date", delete=True), "meta.date"),
    (_broken("refinement.aligned_crop", {"psnr": [1, 2]}), "refinement.aligned_crop"),
    (_broken("alignment.block", delete=True), "alignment"),
    (_broken("schema_version", 0), "schema_version"),
    (_broken("warnings", []), "must include data_provenance.message"),
    (_broken("data_provenance.status", "fine"), "data_provenance"),
    (_broken("correspondence.split.report_ids", ["a", "c"]), "overlap"),
    (_broken("correspondence.stability.chosen_win_frequency", 1.5), "chosen_win_frequency"),
    (_broken("correspondence.stability.chosen_held_out", {"mean": 0.5, "low": 0.6,
                                                          "high": 0.4}), "low > high"),
    (_broken("correspondence.best.calibration", delete=True), "best.calibration"),
    (_broken("correspondence.baselines_all_cases", delete=True), "baselines_all_cases"),
    (_broken("refinement_status", {"run": False, "reason": "failed"}), "refinement_status"),
    (_broken("counts.report_cases", delete=True), "counts.report_cases"),
    (_broken("denoising_gain", delete=True), "denoising_gain: missing"),
    (_broken("denoising_gain.timesteps", [10, 50]), "one per timestep"),
    (_broken("denoising_gain.references.whole.rows", [{"t": 10, **GAIN_ROW},
                                                       {"t": 700, "psnr_gain": "x"}]),
     "rows[1]: psnr_noisy"),
])
def test_broken_reports_are_rejected(report: dict, expected: str) -> None:
    with pytest.raises(ReportError, match=expected.replace("[", r"\[")):
        validate_report(report)


def test_compare_reports_pairs_cases_and_refuses_reports_without_per_case(tmp_path):
    from scripts.compare_reports import main as compare

    def write(name, psnr, whole=(9.0, 9.0, 9.0)):
        def scores(values):
            return {f"{i:05d}": {"psnr": p, "l1": 1.0 / p} for i, p in enumerate(values)}
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps({"refinement_per_case": {
            "aligned_crop": scores(psnr), "whole_reference": scores(whole)}}))
        return path

    a, b = write("a", [10.0, 12.0, 14.0]), write("b", [11.0, 11.0, 16.0])
    result = compare([str(a), str(b), "--metrics", "psnr", "l1"])["metrics"]
    assert result["psnr"]["mean_difference"] == pytest.approx(2.0 / 3)
    assert result["psnr"]["b_better_cases"] == 2 and result["l1"]["b_better_cases"] == 2
    low, high = result["psnr"]["ci95"]
    assert -1.0 <= low <= 2.0 / 3 <= high <= 2.0
    within = compare([str(b), str(b), "--method", "ours_whole_reference", "--method-b",
                      "aligned_crop", "--metrics", "psnr"])
    assert within["metrics"]["psnr"]["mean_difference"] == pytest.approx(38.0 / 3 - 9.0)
    assert within["method_b"] == "aligned_crop"
    # a second pair (another seed) joins case by case, paired within itself only
    c, d = write("c", [10.0, 10.0, 10.0]), write("d", [10.0, 10.0, 13.0])
    pooled = compare([str(a), str(b), "--also", str(c), str(d), "--metrics", "psnr"])
    assert pooled["metrics"]["psnr"]["cases"] == 6
    assert pooled["metrics"]["psnr"]["mean_difference"] == pytest.approx((2.0 + 3.0) / 6)
    assert pooled["metrics"]["psnr"]["b_better_cases"] == 3
    old = tmp_path / "old.json"
    old.write_text(json.dumps({"refinement": {}}))
    with pytest.raises(SystemExit, match="no per-case scores"):
        compare([str(old), str(b)])


def test_old_reports_are_read_with_todays_method_names() -> None:
    """Schema 2 called the refinement method ours_whole_reference by the correspondence
    baseline's name; its committed reports are read with today's names, the baseline kept."""
    old = REPO / "results" / "recipe_gpu" / "eval_default" / "report.json"
    raw = json.loads(old.read_text())
    assert raw["schema_version"] == 2 and "whole_reference" in raw["refinement"]
    report = read_report(old)
    assert report["schema_version"] == SCHEMA_VERSION and report["upgraded_from"] == 2
    for node in (report["refinement"], report["refinement_per_case"],
                 report["refinement_by_category"]["synthetic"],
                 report["refinement_counts"]["scored"]):
        assert "whole_reference" not in node and "ours_whole_reference" in node
    assert report["refinement"]["ours_whole_reference"] == raw["refinement"]["whole_reference"]
    assert list(report["refinement"]) == [
        "input", "telea", "ours_whole_reference", "aligned_crop", "oracle_crop",
        "copy_from_reference"]
    assert report["correspondence"]["baselines"] == raw["correspondence"]["baselines"]
    assert upgrade_report(good_report()) == good_report()  # a current report is as it is


def test_paired_difference_counts_wins_by_direction_and_refuses_unpaired_scores() -> None:
    from evaluation.paired import paired_difference

    higher = paired_difference([1.0, 2.0, 3.0, 4.0], [2.0, 2.5, 2.0, 5.0])
    assert higher["mean_difference"] == pytest.approx(0.375)
    assert higher["b_better_cases"] == 3 and higher["cases"] == 4
    lower = paired_difference([1.0, 2.0, 3.0, 4.0], [2.0, 2.5, 2.0, 5.0], lower_is_better=True)
    assert lower["b_better_cases"] == 1
    low, high = higher["ci95"]
    assert -1.0 <= low <= 0.375 <= high <= 1.0
    with pytest.raises(ValueError, match="same, non-zero number"):
        paired_difference([1.0, 2.0], [1.0])


def test_the_sampling_line_says_where_sampling_stopped() -> None:
    from dataclasses import asdict

    from evaluation.report import sampling_line
    from models.pipeline import RefinementConfig

    plain = sampling_line(asdict(RefinementConfig()))
    early = sampling_line(asdict(RefinementConfig(num_steps=10, final_x0_timestep=1000,
                                                  padding_mask_crop=16)))
    assert "ddpm, 25 steps, guidance 1, to the end" in plain and "padded crop off" in plain
    assert "10 steps" in early and "at or below t = 1000" in early and "16 px" in early
