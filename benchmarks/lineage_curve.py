"""Quality against samples seen across the shipped model's training stages, with a projection.

Each stage of ``--stages`` (a YAML list of ``label``, cumulative ``samples`` and the ``report``
``eval.py`` wrote for that stage's export on one benchmark) gives one point per metric: the
aligned-crop refinement PSNR and gms (with the whole-reference and ground-truth-crop rows), and
the denoising gain at t = 50 / 100 on the report cases. A straight line fitted over the stages
marked ``fit: true`` (stages of one recipe family) says how many more samples each target line
needs at that rate: the input and Telea rows for refinement, ``--gain-targets`` for the gain.
A projection, not a measurement: it holds only while the rate does.

    python benchmarks/lineage_curve.py --stages results/lineage/stages.yaml --out results/lineage

Writes ``lineage.json`` (points, fitted rates, samples to each line) and ``lineage.png``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import OmegaConf

log = logging.getLogger("lineage_curve")
REFINEMENT_ROWS = ("aligned_crop", "ours_whole_reference", "oracle_crop")
LINES = ("input", "telea")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--stages", type=Path, required=True, help="YAML: label, samples, report, fit")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--gain-targets", nargs=2, type=float, default=(4.0, 6.0),
                   metavar=("T50", "T100"), help="denoising-gain targets (dB), t = 50 and 100")
    return p.parse_args(argv)


def stage_point(report: dict[str, Any]) -> dict[str, float]:
    """The metrics one report contributes: refinement PSNR / gms per row, gain at t = 50 / 100."""
    refinement = report["refinement"]
    point = {}
    for row in (*REFINEMENT_ROWS, *LINES):
        if row not in refinement:
            raise KeyError(f"report has no refinement row {row!r} (rows: {sorted(refinement)})")
        point[f"{row}_psnr"] = float(refinement[row]["psnr"])
        point[f"{row}_gms"] = float(refinement[row]["gms"])
    rows = {r["t"]: r for r in report["denoising_gain"]["references"]["whole"]["rows"]}
    for t in (50, 100):
        if t not in rows:
            raise KeyError(f"report's denoising gain has no t = {t} (has {sorted(rows)})")
        point[f"gain_t{t}"] = float(rows[t]["psnr_gain"])
    return point


def samples_to_reach(samples: list[float], values: list[float], line: float
                     ) -> dict[str, float | None]:
    """Least-squares rate (per 1,000 samples) over the points and the samples after the last
    point at which the fitted line reaches ``line``: 0 if the last point is already at or above
    it, None if the rate is not positive."""
    if len(samples) < 2:
        raise ValueError(f"a rate needs at least 2 stages, got {len(samples)}")
    slope, intercept = np.polyfit(np.asarray(samples, float), np.asarray(values, float), 1)
    last = values[-1]
    if last >= line:
        needed: float | None = 0.0
    elif slope <= 0:
        needed = None
    else:
        needed = float((line - last) / slope)
    return {"rate_per_1k_samples": float(slope) * 1000, "last": float(last), "line": float(line),
            "samples_needed": needed}


def project(stages: list[dict[str, Any]], points: list[dict[str, float]],
            gain_targets: tuple[float, float]) -> dict[str, dict[str, Any]]:
    """Samples to each target line at the rate of the ``fit`` stages."""
    fitted = [(s["samples"], p) for s, p in zip(stages, points, strict=True) if s.get("fit")]
    xs = [x for x, _ in fitted]
    last = points[-1]
    lines = {f"aligned_crop_{metric}>{row}": (f"aligned_crop_{metric}", last[f"{row}_{metric}"])
             for metric in ("psnr", "gms") for row in LINES}
    lines |= {f"gain_t{t}>={target:g}": (f"gain_t{t}", target)
              for t, target in zip((50, 100), gain_targets, strict=True)}
    return {name: {"metric": metric, **samples_to_reach(xs, [p[metric] for _, p in fitted], line)}
            for name, (metric, line) in lines.items()}


def plot(stages: list[dict[str, Any]], points: list[dict[str, float]],
         gain_targets: tuple[float, float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = np.asarray([s["samples"] for s in stages], float) / 1000
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    panels = (("refinement PSNR (dB), report cases", "psnr"), ("refinement gms", "gms"))
    for ax, (title, metric) in zip(axes, panels, strict=False):
        for row in REFINEMENT_ROWS:
            ax.plot(xs, [p[f"{row}_{metric}"] for p in points], "o-", label=row)
        for row, style in zip(LINES, ("--", ":"), strict=True):
            ax.axhline(points[-1][f"{row}_{metric}"], color="k", ls=style, lw=1, label=row)
        ax.set_title(title)
    for t, target in zip((50, 100), gain_targets, strict=True):
        axes[2].plot(xs, [p[f"gain_t{t}"] for p in points], "o-", label=f"t = {t}")
        axes[2].axhline(target, ls="--", lw=1, color=axes[2].lines[-1].get_color(),
                        label=f"target t = {t}")
    axes[2].set_title("denoising gain (dB), report cases")
    for ax in axes:
        ax.set_xlabel("samples seen (thousands)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse_args(argv)
    stages = OmegaConf.to_container(OmegaConf.load(args.stages))
    if not isinstance(stages, list) or not stages:
        raise ValueError(f"{args.stages}: expected a non-empty list of stages")
    if [s["samples"] for s in stages] != sorted(s["samples"] for s in stages):
        raise ValueError(f"{args.stages}: stages must be in order of samples seen")
    root = args.stages.parent
    points = [stage_point(json.loads((root / s["report"]).read_text())) for s in stages]
    gain_targets = tuple(args.gain_targets)
    projection = project(stages, points, gain_targets)
    args.out.mkdir(parents=True, exist_ok=True)
    result = {"stages": [{**s, **p} for s, p in zip(stages, points, strict=True)],
              "projection": projection,
              "date_utc": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")}
    (args.out / "lineage.json").write_text(json.dumps(result, indent=1) + "\n")
    plot(stages, points, gain_targets, args.out / "lineage.png")
    for name, row in projection.items():
        needed = row["samples_needed"]
        shown = "never at this rate" if needed is None else f"{math.ceil(needed / 1000)}k samples"
        log.info("%-28s last %.3f, line %.3f, rate %+.4f / 1k samples: %s", name, row["last"],
                 row["line"], row["rate_per_1k_samples"], shown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
