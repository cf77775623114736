"""Training recipes compared at a fixed budget: the denoising gain along each run.

Every run of ``--runs`` (train.py folders named ``<recipe>_s<seed>``, all warm-started from
the same export, with the same batch and steps) is scored at each of its step checkpoints,
and the starting export at step 0, on the same held-out cases with the same noise: the
denoising gain per timestep (models/denoising_gain.py) with the whole reference. Recipes
are compared to ``--baseline`` at every budget, paired by (seed, case): the same training
items and the same held-out cases and noise.

    python benchmarks/recipe_budget.py --runs runs/recipe/* --init checkpoints/tiny_synthetic \
        --baseline uniform --out results/recipe_budget

Writes ``budget.json`` (per run, step and timestep: mean gains; paired differences),
``budget.md`` and ``curve.png`` (gain vs samples seen, one line per recipe) to ``--out``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import re
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from data.benchmark import load_benchmark, write_synthetic_benchmark
from evaluation.denoising_gain import GainConfig, measure_cases
from evaluation.paired import paired_difference
from models.checkpoint import export_checkpoint, read_checkpoint
from models.export import load_pipeline

log = logging.getLogger("recipe_budget")
RUN_NAME = re.compile(r"^(?P<recipe>.+)_s(?P<seed>\d+)$")
STEP = re.compile(r"^step(?P<step>\d+)\.ckpt$")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", nargs="+", required=True, type=Path,
                   help="train.py run folders named <recipe>_s<seed>")
    p.add_argument("--init", type=Path, required=True, help="the export every run started from")
    p.add_argument("--baseline", required=True, help="the recipe the others are compared with")
    p.add_argument("--cases", type=int, default=64, help="held-out cases (validation namespace)")
    p.add_argument("--case-seed", type=int, default=17,
                   help="generator seed of the held-out cases, in the validation namespace")
    p.add_argument("--timesteps", type=int, nargs="+", default=[10, 50, 100, 200, 400, 700])
    p.add_argument("--batch-size", type=int, required=True,
                   help="training batch size of the runs (samples seen = step x batch)")
    p.add_argument("--steps", type=int, nargs="*", default=None,
                   help="score only these checkpoint steps (default: all)")
    p.add_argument("--out", type=Path, required=True)
    return p.parse_args(argv)


def run_checkpoints(run: Path) -> dict[int, Path]:
    """{step: checkpoint} of one run."""
    found = {}
    for path in sorted((run / "checkpoints").glob("step*.ckpt")):
        match = STEP.match(path.name)
        if match:
            found[int(match["step"])] = path
    if not found:
        raise FileNotFoundError(f"{run}: no stepNNNNNNN.ckpt in {run / 'checkpoints'}")
    return found


def score(export: Path, cases: list, cfg: GainConfig) -> dict[str, np.ndarray]:
    """Per-case gains {psnr: [cases, T], gms: [cases, T]} of one export."""
    section = measure_cases(load_pipeline(export), cases, cfg, progress=False, per_case=True)
    per_case = section["references"]["whole"]["per_case"]
    ids = [c.id for c in cases]
    return {m: np.array([np.array(per_case[i][f"{m}_x0"]) - np.array(per_case[i][f"{m}_noisy"])
                         for i in ids]) for m in ("psnr", "gms")}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_grad_enabled(False)
    runs: dict[tuple[str, int], Path] = {}
    for run in args.runs:
        match = RUN_NAME.match(run.name)
        if not match:
            raise ValueError(f"run folder {run} is not named <recipe>_s<seed>")
        runs[(match["recipe"], int(match["seed"]))] = run
    recipes = sorted({r for r, _ in runs})
    if args.baseline not in recipes:
        raise ValueError(f"--baseline {args.baseline!r} is not among the runs' recipes {recipes}")
    cfg = GainConfig(timesteps=list(args.timesteps), references=["whole"])
    with tempfile.TemporaryDirectory() as tmp:
        bench = Path(tmp) / "cases"
        write_synthetic_benchmark(bench, args.cases, seed=args.case_seed, namespace="validation")
        cases, skipped = load_benchmark(bench)
        if skipped:
            raise RuntimeError(f"held-out cases could not be read: {skipped}")
        scores: dict[tuple[str, int, int], dict[str, np.ndarray]] = {}
        start = score(args.init, cases, cfg)
        jobs = [(key, step, path) for key, run in sorted(runs.items())
                for step, path in run_checkpoints(run).items()
                if args.steps is None or step in args.steps]
        for (recipe, seed), step, path in tqdm(jobs, desc="checkpoints", unit="ckpt"):
            read_checkpoint(path)  # refuses an unreadable one by name
            export = export_checkpoint(path, Path(tmp) / f"{recipe}_{seed}_{step}")
            scores[(recipe, seed, step)] = score(export, cases, cfg)
    for recipe, seed in runs:
        scores[(recipe, seed, 0)] = start
    steps = sorted({s for _, _, s in scores})
    rows = []
    for (recipe, seed, step), s in sorted(scores.items()):
        rows.append({"recipe": recipe, "seed": seed, "step": step,
                     "samples_seen": step * args.batch_size,
                     **{f"{m}_gain_t{t}": float(s[m][:, i].mean()) for m in ("psnr", "gms")
                        for i, t in enumerate(args.timesteps)}})
    paired = []
    seeds = sorted({seed for _, seed in runs})
    for recipe in recipes:
        if recipe == args.baseline:
            continue
        for step in steps[1:]:
            if not all((r, sd, step) in scores for r in (recipe, args.baseline) for sd in seeds):
                continue
            for m in ("psnr", "gms"):
                for i, t in enumerate(args.timesteps):
                    a = np.concatenate([scores[(args.baseline, sd, step)][m][:, i] for sd in seeds])
                    b = np.concatenate([scores[(recipe, sd, step)][m][:, i] for sd in seeds])
                    paired.append({"recipe": recipe, "baseline": args.baseline, "step": step,
                                   "metric": m, "t": t, **paired_difference(a, b)})
    result = {"date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
              "init": str(args.init), "runs": {f"{r}_s{s}": str(p) for (r, s), p in runs.items()},
              "cases": args.cases, "case_namespace": "validation", "case_seed": args.case_seed,
              "timesteps": args.timesteps, "batch_size": args.batch_size,
              "rows": rows, "paired": paired}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "budget.json").write_text(json.dumps(result, indent=1))
    write_markdown(result, args.out / "budget.md")
    plot_curve(result, args.out / "curve.png")
    print((args.out / "budget.md").read_text())
    return result


def mean_over_seeds(rows: list[dict], key: str) -> dict[str, list[tuple[int, float]]]:
    grouped: dict[tuple[str, int], list[float]] = defaultdict(list)
    for r in rows:
        grouped[(r["recipe"], r["samples_seen"])].append(r[key])
    out: dict[str, list[tuple[int, float]]] = defaultdict(list)
    for (recipe, seen), values in sorted(grouped.items()):
        out[recipe].append((seen, float(np.mean(values))))
    return out


def write_markdown(result: dict[str, Any], path: Path) -> None:
    ts = result["timesteps"]
    lines = [f"# Recipes at a fixed budget ({result['cases']} held-out cases, "
             f"{result['date']})", "", "Mean PSNR gain (dB) per timestep, mean over seeds:", "",
             "| recipe | samples seen | " + " | ".join(f"t={t}" for t in ts) + " |",
             "|---|---|" + "---|" * len(ts)]
    curves = {t: mean_over_seeds(result["rows"], f"psnr_gain_t{t}") for t in ts}
    for recipe in curves[ts[0]]:
        for k, (seen, _) in enumerate(curves[ts[0]][recipe]):
            cells = " | ".join(f"{curves[t][recipe][k][1]:+.2f}" for t in ts)
            lines.append(f"| {recipe} | {seen} | {cells} |")
    lines += ["", "Paired differences (recipe minus baseline, per case and seed, bootstrap 95%):",
              "", "| recipe | step | metric | t | mean | 95% interval | wins |",
              "|---|---|---|---|---|---|---|"]
    for p in result["paired"]:
        lo, hi = p["ci95"]
        lines.append(f"| {p['recipe']} | {p['step']} | {p['metric']} | {p['t']} | "
                     f"{p['mean_difference']:+.3f} | [{lo:+.3f}, {hi:+.3f}] | "
                     f"{p['b_better_cases']}/{p['cases']} |")
    path.write_text("\n".join(lines) + "\n")


def plot_curve(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [t for t in result["timesteps"] if t in (50, 100, 200)] or result["timesteps"][:3]
    fig, axes = plt.subplots(1, len(shown), figsize=(4 * len(shown), 3.2), squeeze=False)
    for ax, t in zip(axes[0], shown, strict=True):
        for recipe, points in mean_over_seeds(result["rows"], f"psnr_gain_t{t}").items():
            xs = [max(s, 1) for s, _ in points]
            ax.plot(xs, [g for _, g in points], marker="o", label=recipe)
        ax.set_xscale("symlog", linthresh=result["batch_size"])
        ax.set_title(f"t = {t}")
        ax.set_xlabel("samples seen after the warm start")
        ax.set_ylabel("PSNR gain (dB)")
        ax.grid(alpha=0.3)
    axes[0][0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
