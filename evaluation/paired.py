"""Paired differences with a bootstrap interval: is B better than A on the same cases?"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

# the direction of each metric (every other one: higher is better)
LOWER_IS_BETTER = frozenset({"l1", "fid", "lpips"})


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


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def paired_cases(a: Mapping[str, Mapping[str, Any]], b: Mapping[str, Mapping[str, Any]],
                 metric: str) -> list[str]:
    """The cases both per-case tables score with a finite ``metric`` (an identical region's
    infinite PSNR or a note has no difference), sorted."""
    return sorted(i for i in set(a) & set(b)
                  if _finite(a[i].get(metric)) and _finite(b[i].get(metric)))


def paired_metrics(a: Mapping[str, Mapping[str, Any]], b: Mapping[str, Mapping[str, Any]],
                   metrics: Sequence[str], resamples: int = 2000, seed: int = 0
                   ) -> dict[str, dict[str, Any]]:
    """:func:`paired_difference` of B minus A per metric over :func:`paired_cases`, with each
    metric's direction; a metric no case has in both is left out."""
    out = {}
    for metric in metrics:
        ids = paired_cases(a, b, metric)
        if ids:
            out[metric] = paired_difference([a[i][metric] for i in ids],
                                            [b[i][metric] for i in ids],
                                            metric in LOWER_IS_BETTER, resamples, seed)
    return out
