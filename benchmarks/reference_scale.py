"""Does the ground-truth crop give the denoiser detail the whole reference does not?

Reads a ``scripts/validate_export.py`` result measured with ``--references whole crop other``
and the benchmark it scored, and splits the cases by how many reference tokens span the
matching region in the whole reference (its box's longer side over the encoder's patch).
Per third of the cases (and for all) and per timestep it pairs, case by case, the one-step
gain with the crop minus with the whole reference (what zooming in adds) and with the own whole
reference minus another case's (what the reference is worth at all). Also reports how many reference
pixels and tokens fall on each target pixel of the region, whole and cropped. With
``--report`` (an eval.py report.json on the same benchmark), the refinement PSNR of the
oracle and aligned crops minus the whole reference's, per third of its report cases.

    python benchmarks/reference_scale.py --gain GAIN.json --bench-dir BENCH [--report REPORT]
        --out scale.json
"""

from __future__ import annotations

import argparse
import datetime
import json
from pathlib import Path
from typing import Any

import numpy as np

from data.benchmark import load_benchmark
from data.masks import mask_bbox
from data.modes import square_crop
from evaluation.paired import paired_difference

DEFAULT_GRID = 16  # reference tokens per side (DINOv2 patches at 224 px)


def region_scale(reference_mask: np.ndarray, target_mask: np.ndarray, margin: float,
                 grid: int) -> dict[str, float]:
    """Longer sides (px) of the region in the reference and of the mask in the target, and the
    tokens across the region, whole and in the square crop the oracle uses."""
    ref_box, target_box = mask_bbox(reference_mask), mask_bbox(target_mask)
    if ref_box is None or target_box is None:
        raise ValueError("a case with an empty mask or reference_mask")
    size = reference_mask.shape[0]
    region = max(ref_box[2] - ref_box[0], ref_box[3] - ref_box[1])
    x0, _, x1, _ = square_crop(ref_box, reference_mask.shape[:2], margin)
    target = max(target_box[2] - target_box[0], target_box[3] - target_box[1])
    return {"region_px": region, "target_px": target, "crop_px": x1 - x0,
            "tokens_whole": region / size * grid, "tokens_crop": region / (x1 - x0) * grid,
            "px_per_target_px_whole": region / target,
            "px_per_target_px_crop": region * size / (x1 - x0) / target}


def gains(node: dict[str, Any], case: str) -> np.ndarray:
    scores = node["per_case"][case]
    return np.asarray(scores["psnr_x0"]) - np.asarray(scores["psnr_noisy"])


def refinement_by_scale(report: dict[str, Any], thirds: list[list[str]]) -> list[dict]:
    """Per third of the cases (by tokens across the region) and for all, refinement PSNR of
    the oracle and aligned crops minus the whole reference's, paired over the report cases."""
    per_case = report["refinement_per_case"]
    whole = per_case["ours_whole_reference"]
    out = []
    for name, part in [*((f"third {k + 1}", p) for k, p in enumerate(thirds)),
                       ("all", [c for p in thirds for c in p])]:
        row: dict[str, Any] = {"group": name, "minus_whole": {}}
        for method in ("oracle_crop", "aligned_crop"):
            cases = [c for c in part if c in whole and c in per_case.get(method, {})]
            row["cases"] = len(cases)
            row["minus_whole"][method] = paired_difference(
                [whole[c]["psnr"] for c in cases], [per_case[method][c]["psnr"] for c in cases])
        out.append(row)
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gain", type=Path, required=True)
    parser.add_argument("--bench-dir", type=Path, required=True)
    parser.add_argument("--report", type=Path, default=None)
    parser.add_argument("--grid", type=int, default=DEFAULT_GRID)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)

    section = json.loads(args.gain.read_text())["denoising_gain"]
    refs = section["references"]
    missing = {"whole", "crop", "other"} - set(refs)
    if missing or any("per_case" not in refs[r] for r in refs):
        raise SystemExit(f"{args.gain}: needs per-case whole, crop and other references "
                         f"(validate_export.py --references whole crop other); missing {missing}")
    cases, _ = load_benchmark(args.bench_dir)
    scored = [c for c in cases if c.id in refs["crop"]["per_case"]]
    if len(scored) < 6:
        raise SystemExit(f"{args.bench_dir}: {len(scored)} case(s) of {args.gain}; need 6")
    scale = {c.id: region_scale(c.reference_mask, c.mask, section["crop_margin"], args.grid)
             for c in scored}
    order = sorted(scale, key=lambda c: scale[c]["tokens_whole"])
    thirds = [order[k * len(order) // 3: (k + 1) * len(order) // 3] for k in range(3)]
    rows = []
    for part in [*thirds, order]:
        whole = {c: gains(refs["whole"], c) for c in part}
        crop = {c: gains(refs["crop"], c) for c in part}
        other = {c: gains(refs["other"], c) for c in part}
        means = {k: float(np.mean([scale[c][k] for c in part])) for k in scale[part[0]]}
        for i, t in enumerate(section["timesteps"]):
            rows.append({
                "group": "all" if part is order else f"third {thirds.index(part) + 1}",
                "tokens_whole": [scale[part[0]]["tokens_whole"], scale[part[-1]]["tokens_whole"]],
                **{f"mean_{k}": v for k, v in means.items()}, "t": t,
                "crop_minus_whole": paired_difference([whole[c][i] for c in part],
                                                      [crop[c][i] for c in part]),
                "own_minus_other": paired_difference([other[c][i] for c in part],
                                                     [whole[c][i] for c in part])})
    print(f"{len(scored)} cases; PSNR gain differences, paired per case, bootstrap 95%")
    print("| cases | tokens across region (whole) | ref px per target px, whole / crop | t "
          "| crop - whole | own - other |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        lo, hi = r["tokens_whole"]
        c, o = r["crop_minus_whole"], r["own_minus_other"]
        print(f"| {r['group']} | {lo:.1f}-{hi:.1f} | {r['mean_px_per_target_px_whole']:.1f} / "
              f"{r['mean_px_per_target_px_crop']:.1f} | {r['t']} "
              f"| {c['mean_difference']:+.3f} [{c['ci95'][0]:+.3f}, {c['ci95'][1]:+.3f}] "
              f"| {o['mean_difference']:+.3f} [{o['ci95'][0]:+.3f}, {o['ci95'][1]:+.3f}] |")
    refinement = (refinement_by_scale(json.loads(args.report.read_text()), thirds)
                  if args.report else [])
    for r in refinement:
        print(f"refinement PSNR, {r['group']} ({r['cases']} report cases): " + ", ".join(
            f"{m} - whole {d['mean_difference']:+.3f} [{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}]"
            for m, d in r["minus_whole"].items()))
    now = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    result = {"gain": str(args.gain), "bench_dir": str(args.bench_dir), "grid": args.grid,
              "cases": len(scored), "rows": rows, "report": args.report and str(args.report),
              "refinement": refinement, "per_case_scale": scale, "date_utc": now}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
