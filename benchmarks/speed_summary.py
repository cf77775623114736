"""Summaries for benchmarks/gpu_speed.sh: one ``train.py`` run's metrics.csv, and the whole run.

    python benchmarks/speed_summary.py fit RUNS_DIR OUT_JSON STRATEGY RC
    python benchmarks/speed_summary.py all OUT_DIR SKIPPED_TXT ELAPSED_S BUDGET_S
"""

from __future__ import annotations

import csv
import datetime
import json
import sys
from pathlib import Path
from typing import Any

PEAK_KEY = "allocated_bytes.all.peak"  # DeviceStatsMonitor's torch.cuda.memory_stats() key
TRAIN_TARGET, RATIO_TARGET = 127.0, 1.44


def fit_summary(runs: Path, out: Path, strategy: str, rc: int) -> dict[str, Any]:
    """Throughput (ThroughputMonitor) and peak allocated memory of one ``train.py`` run."""
    import torch

    rows = [r for f in sorted(runs.rglob("metrics.csv")) for r in csv.DictReader(f.open())]
    rate = [(int(r["step"]), float(r["train/device/samples_per_sec"])) for r in rows
            if r.get("train/device/samples_per_sec")]
    peaks = [float(v) for r in rows for k, v in r.items() if k and PEAK_KEY in k and v]
    steps = [int(r["step"]) for r in rows if r.get("step")]
    result = {
        "strategy": strategy, "rc": rc,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "torch": torch.__version__,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "last_logged_step": max(steps, default=None),
        "samples_per_s_by_step": rate,
        "samples_per_s_last": rate[-1][1] if rate else None,
        "peak_allocated_gib": round(max(peaks) / 2**30, 2) if peaks else None,
        "metrics_files": len(list(runs.rglob("metrics.csv"))),
    }
    out.write_text(json.dumps(result, indent=1))
    return result


def _get(data: dict[str, Any], *keys: str) -> Any:
    for key in keys:
        if not isinstance(data, dict) or key not in data:
            return None
        data = data[key]
    return data


def run_summary(out: Path, skipped: list[str], elapsed: int, budget: int) -> dict[str, Any]:
    """The rows of benchmarks/README.md's GPU tables, from the JSON files of this run."""
    files = {p.stem: json.loads(p.read_text()) for p in out.glob("*.json")
             if p.stem != "summary"}
    train, infer, infer_c = (files.get(k, {}) for k in ("train", "infer", "infer_compiled"))
    eager, compiled = _get(train, "full_step", "samples_per_s"), _get(
        train, "full_step", "compiled", "samples_per_s")
    rows = {
        "device": train.get("device") or infer.get("device"),
        "anchor_eager_samples_per_s": _get(train, "anchor", "samples_per_s"),
        "train_eager_samples_per_s": eager, "train_eager_ratio": train.get("ratio"),
        "train_breakdown_ms": _get(train, "full_step", "breakdown_ms"),
        "train_compiled_samples_per_s": compiled,
        "train_compiled_ratio": train.get("ratio_compiled"),
        "train_compiled_first_step_s": _get(train, "full_step", "compiled", "first_step_s"),
        "train_peak_gib": {"eager": _get(train, "full_step", "peak_memory_gib"),
                           "compiled": _get(train, "full_step", "compiled", "peak_memory_gib")},
        "train_meets_target": (compiled is not None and compiled >= TRAIN_TARGET
                               and (train.get("ratio_compiled") or 0) >= RATIO_TARGET),
        "align_capture_ratio": _get(infer, "alignment", "ratio"),
        "refine_s": {v: r.get("seconds") for src in (infer, infer_c)
                     for v, r in (src.get("refinement") or {}).items()},
        "fit": {k: {"samples_per_s_last": v.get("samples_per_s_last"),
                    "peak_allocated_gib": v.get("peak_allocated_gib"), "rc": v.get("rc")}
                for k, v in files.items() if k.startswith("fit_")},
        "skipped_or_failed": skipped, "elapsed_s": elapsed, "budget_s": budget,
        "smoke": bool(train.get("smoke") or infer.get("smoke")),
    }
    (out / "summary.json").write_text(json.dumps(rows, indent=1))
    width = max(len(k) for k in rows)
    print("\n".join(f"{k:<{width}}  {json.dumps(v)}" for k, v in rows.items()))
    return rows


if __name__ == "__main__":
    kind, *rest = sys.argv[1:]
    if kind == "fit":
        print(json.dumps({k: v for k, v in fit_summary(
            Path(rest[0]), Path(rest[1]), rest[2], int(rest[3])).items()
            if k != "samples_per_s_by_step"}))
    elif kind == "all":
        skipped_file = Path(rest[1])
        lines = skipped_file.read_text().splitlines() if skipped_file.is_file() else []
        run_summary(Path(rest[0]), [s for s in lines if s], int(rest[2]), int(rest[3]))
    else:
        sys.exit(f"unknown summary {kind!r}: fit or all")
