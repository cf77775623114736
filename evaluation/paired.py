"""Paired differences with a bootstrap interval: is B better than A on the same cases?"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np


def paired_difference(a: Sequence[float], b: Sequence[float], lower_is_better: bool = False,
                      resamples: int = 2000, seed: int = 0) -> dict[str, Any]:
    """Mean of ``b - a`` over cases, its bootstrap 95% interval (cases resampled) and how many
    cases B wins; ``a[i]`` and ``b[i]`` must score the same case."""
    if len(a) != len(b) or not len(a):
        raise ValueError(f"paired scores need the same, non-zero number of cases: "
                         f"{len(a)} and {len(b)}")
    diff = np.asarray(b, dtype=np.float64) - np.asarray(a, dtype=np.float64)
    means = np.random.default_rng(seed).choice(diff, (resamples, len(diff))).mean(1)
    better = diff < 0 if lower_is_better else diff > 0
    return {"cases": len(diff), "mean_difference": float(diff.mean()),
            "ci95": [float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))],
            "b_better_cases": int(better.sum())}


LOWER_IS_BETTER = frozenset({"l1"})
PAIRED_METRICS = ("psnr", "ssim", "l1", "gms", "clip", "dino")


def paired_methods(per_case: Mapping[str, Mapping[str, Mapping[str, Any]]],
                   pairs: Sequence[tuple[str, str]], metrics: Sequence[str] = PAIRED_METRICS,
                   resamples: int = 2000, seed: int = 0) -> dict[str, dict[str, Any]]:
    """Methods of one report compared case by case: {"B vs A": {metric: difference}}.

    ``per_case`` is ``{method: {case_id: {metric: value}}}``; each metric uses the cases where
    both methods have a finite number (notes such as "not available" and PSNR's inf are left
    out), and a metric with no such case is absent.
    """
    out: dict[str, dict[str, Any]] = {}
    for a, b in pairs:
        rows: dict[str, Any] = {}
        for metric in metrics:
            ids = [i for i in per_case[a] if i in per_case[b]
                   and all(_finite(per_case[m][i].get(metric)) for m in (a, b))]
            if ids:
                rows[metric] = paired_difference(
                    [per_case[a][i][metric] for i in ids], [per_case[b][i][metric] for i in ids],
                    metric in LOWER_IS_BETTER, resamples, seed)
        out[f"{b} vs {a}"] = rows
    return out


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)


def paired_table(paired: Mapping[str, Mapping[str, Mapping[str, Any]]]
                 ) -> tuple[list[str], list[list[Any]]]:
    """Rows of :func:`paired_methods`'s result for a report table."""
    rows = [[pair, metric, d["mean_difference"], f"[{d['ci95'][0]:.4g}, {d['ci95'][1]:.4g}]",
             f"{d['b_better_cases']}/{d['cases']}"]
            for pair, metrics in paired.items() for metric, d in metrics.items()]
    return ["B vs A", "metric", "mean B - A", "95% interval", "B better (cases)"], rows
