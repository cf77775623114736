"""Paired comparison of two evaluations of one benchmark: B minus A, case by case.

Reads ``refinement_per_case`` of two ``report.json`` files (two exports or settings evaluated
on the same benchmark) and prints, per metric, the mean difference over the cases both
scored, a bootstrap 95% interval of that mean and how many cases B wins. ``--method-b``
compares two methods, e.g. the aligned crop against the whole reference of one report.

    python scripts/compare_reports.py runs/eval/a/report.json runs/eval/b/report.json \
        --method aligned_crop --out results/x/paired.json
    python scripts/compare_reports.py R/report.json R/report.json --method ours_whole_reference \
        --method-b aligned_crop

``--also A B`` adds further pairs of reports (e.g. the same two recipes trained under another
seed) whose cases join the comparison, each paired only within its own pair.

Reports of an older schema are read with today's method names (``whole_reference`` of a
schema-2 report is ``ours_whole_reference``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from evaluation.paired import paired_metrics
from evaluation.report import read_report


def paired(a: dict, b: dict, metric: str, resamples: int, seed: int) -> dict:
    found = paired_metrics(a, b, [metric], resamples, seed)
    if metric not in found:
        raise SystemExit(f"compare_reports: no case has a numeric {metric!r} in both reports")
    return found[metric]


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("report_a", type=Path)
    p.add_argument("report_b", type=Path)
    p.add_argument("--method", default="aligned_crop")
    p.add_argument("--method-b", default=None, help="B's method (default: --method)")
    p.add_argument("--metrics", nargs="+", default=["psnr", "l1", "ssim", "gms"])
    p.add_argument("--resamples", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--also", nargs=2, action="append", default=[], type=Path,
                   metavar=("REPORT_A", "REPORT_B"), help="another pair, pooled with the first")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    method_b = args.method_b or args.method
    pairs = [(args.report_a, args.report_b), *map(tuple, args.also)]
    cases: list[dict] = [{}, {}]
    for k, pair in enumerate(pairs):
        for side, (path, method) in enumerate(zip(pair, (args.method, method_b), strict=True)):
            per_case = read_report(path).get("refinement_per_case", {})
            if method not in per_case:
                raise SystemExit(f"compare_reports: {path} has no per-case scores of {method!r} "
                                 f"(it has {sorted(per_case)}; reports from before "
                                 "refinement_per_case have none)")
            prefix = f"{k}/" if len(pairs) > 1 else ""
            cases[side].update({prefix + case: row for case, row in per_case[method].items()})
    result = {"a": str(args.report_a), "b": str(args.report_b), "method": args.method,
              "also": [[str(a), str(b)] for a, b in args.also],
              "method_b": method_b, "difference": "b - a",
              "metrics": {m: paired(*cases, m, args.resamples, args.seed) for m in args.metrics}}
    for metric, row in result["metrics"].items():
        print(f"{metric:>5}: b - a = {row['mean_difference']:+.3f} "
              f"[{row['ci95'][0]:+.3f}, {row['ci95'][1]:+.3f}], b better on "
              f"{row['b_better_cases']}/{row['cases']} cases")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
