"""benchmarks/lineage_curve.py: the points it reads and the projection it makes from them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import lineage_curve


def _report(aligned: float, gain50: float, gain100: float) -> dict:
    rows = {"input": (16.0, 0.70), "telea": (16.5, 0.66), "aligned_crop": (aligned, 0.69),
            "ours_whole_reference": (aligned + 0.1, 0.69), "oracle_crop": (aligned + 0.2, 0.70)}
    return {"refinement": {k: {"psnr": p, "gms": g} for k, (p, g) in rows.items()},
            "denoising_gain": {"references": {"whole": {"rows": [
                {"t": 10, "psnr_gain": 0.1}, {"t": 50, "psnr_gain": gain50},
                {"t": 100, "psnr_gain": gain100}]}}}}


def test_samples_to_reach_follows_the_fitted_line() -> None:
    # 0.5 dB per 1,000 samples exactly; from 15.0 at 2,000 samples, 16.0 is 2,000 away
    row = lineage_curve.samples_to_reach([0, 1000, 2000], [14.0, 14.5, 15.0], 16.0)
    assert row["rate_per_1k_samples"] == pytest.approx(0.5)
    assert row["samples_needed"] == pytest.approx(2000)
    assert lineage_curve.samples_to_reach([0, 1000], [16.0, 16.2], 16.1)["samples_needed"] == 0
    assert lineage_curve.samples_to_reach([0, 1000], [15.0, 14.9], 16.0)["samples_needed"] is None
    with pytest.raises(ValueError, match="at least 2 stages"):
        lineage_curve.samples_to_reach([0], [15.0], 16.0)


def test_main_fits_only_the_marked_stages(tmp_path: Path) -> None:
    reports = {"a": _report(10.0, 0.0, 0.0), "b": _report(15.0, 1.0, 2.0),
               "c": _report(15.5, 2.0, 3.0)}
    for name, report in reports.items():
        (tmp_path / f"{name}.json").write_text(json.dumps(report))
    (tmp_path / "stages.yaml").write_text(
        "- {label: a, samples: 0, report: a.json}\n"
        "- {label: b, samples: 1000, report: b.json, fit: true}\n"
        "- {label: c, samples: 2000, report: c.json, fit: true}\n")
    assert lineage_curve.main(["--stages", str(tmp_path / "stages.yaml"),
                               "--out", str(tmp_path / "out")]) == 0
    result = json.loads((tmp_path / "out" / "lineage.json").read_text())
    assert (tmp_path / "out" / "lineage.png").stat().st_size > 0
    projection = result["projection"]
    # fitted on b and c only (0.5 dB per 1k samples), not on a's far lower point
    assert projection["aligned_crop_psnr>input"]["samples_needed"] == pytest.approx(1000)
    assert projection["aligned_crop_psnr>telea"]["samples_needed"] == pytest.approx(2000)
    assert projection["gain_t50>=4"]["samples_needed"] == pytest.approx(2000)
    assert projection["gain_t100>=6"]["samples_needed"] == pytest.approx(3000)
    assert projection["aligned_crop_gms>telea"]["samples_needed"] == 0
    assert [s["aligned_crop_psnr"] for s in result["stages"]] == [10.0, 15.0, 15.5]


def test_stages_out_of_order_are_refused(tmp_path: Path) -> None:
    (tmp_path / "r.json").write_text(json.dumps(_report(15.0, 1.0, 2.0)))
    (tmp_path / "stages.yaml").write_text(
        "- {label: b, samples: 1000, report: r.json, fit: true}\n"
        "- {label: a, samples: 0, report: r.json, fit: true}\n")
    with pytest.raises(ValueError, match="order of samples"):
        lineage_curve.main(["--stages", str(tmp_path / "stages.yaml"), "--out", str(tmp_path)])
