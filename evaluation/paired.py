"""Paired differences with a bootstrap interval: is B better than A on the same cases?"""

from __future__ import annotations

from collections.abc import Sequence
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
