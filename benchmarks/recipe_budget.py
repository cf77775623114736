"""Training recipes compared at a fixed budget: the denoising gain along each run.

Every run of ``--runs`` (train.py folders named ``<recipe>_s<seed>``; a recipe's batch size
is read from its runs' ``.hydra/config.yaml``, so recipes may differ in batch) is scored at
each of its step checkpoints, and the export they warm-started from (``--init``) at step 0,
on the same held-out cases with the same noise: the denoising gain per timestep
(models/denoising_gain.py) with the whole reference. Recipes are compared to ``--baseline``
at every budget, paired by (seed, case): the same training items and the same held-out cases
and noise. The budget is the samples seen (step x batch), or with ``--gflops`` the training
FLOPs (architectures differ): each baseline checkpoint is paired with the recipe's checkpoint
of the nearest budget, within ``--flops-tolerance``.

    python benchmarks/recipe_budget.py --runs runs/recipe/* --init checkpoints/tiny_synthetic \
        --baseline uniform --batch-size 8 --out results/recipe_budget
    python benchmarks/recipe_budget.py --runs runs/arch_budget/*_s? --baseline preset \
        --gflops preset=16.90 wider=57.49 --batch-size 8 --out results/architecture_budget

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
from omegaconf import OmegaConf
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
    p.add_argument("--init", type=Path, default=None,
                   help="the export every run warm-started from (scored at step 0); omit for "
                        "runs from scratch")
    p.add_argument("--baseline", required=True, help="the recipe the others are compared with")
    p.add_argument("--cases", type=int, default=64, help="held-out cases")
    p.add_argument("--case-seed", type=int, default=17, help="generator seed of the held-out cases")
    p.add_argument("--case-namespace", choices=["validation", "benchmark"], default="validation",
                   help="seed namespace of the held-out cases (both are disjoint from training)")
    p.add_argument("--timesteps", type=int, nargs="+", default=[10, 50, 100, 200, 400, 700])
    p.add_argument("--batch-size", type=int, default=None,
                   help="training batch size of runs whose folder has no .hydra/config.yaml "
                        "(samples seen = step x batch)")
    p.add_argument("--steps", type=int, nargs="*", default=None,
                   help="score only these checkpoint steps (default: all)")
    p.add_argument("--gflops", nargs="+", default=None, metavar="RECIPE=GFLOP",
                   help="GFLOP of one training sample per recipe (benchmarks/flops_by_part.py): "
                        "the budget becomes training FLOPs")
    p.add_argument("--flops-tolerance", type=float, default=0.05,
                   help="largest relative budget (FLOPs or samples) difference of a paired "
                        "checkpoint")
    p.add_argument("--out", type=Path, required=True)
    return p.parse_args(argv)


def parse_gflops(items: list[str] | None, recipes: list[str]) -> dict[str, float] | None:
    """{recipe: GFLOP per training sample}, every recipe named once."""
    if items is None:
        return None
    gflops = {}
    for item in items:
        recipe, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--gflops {item!r} is not RECIPE=GFLOP")
        gflops[recipe] = float(value)
    missing = sorted(set(recipes) - set(gflops))
    if missing:
        raise ValueError(f"--gflops names no cost for recipes {missing}")
    return gflops


def recipe_batch_sizes(runs: dict[tuple[str, int], Path], fallback: int | None
                       ) -> dict[str, int]:
    """{recipe: training batch size} from each run's Hydra config, ``fallback`` without one;
    the seeds of a recipe must agree."""
    found: dict[str, set[int]] = defaultdict(set)
    for (recipe, _), run in runs.items():
        config = run / ".hydra" / "config.yaml"
        if config.is_file():
            found[recipe].add(int(OmegaConf.load(config).data.batch_size))
        elif fallback is not None:
            found[recipe].add(fallback)
        else:
            raise ValueError(f"{run}: no .hydra/config.yaml to read the batch size from; "
                             "pass --batch-size")
    mixed = {r: sorted(b) for r, b in found.items() if len(b) > 1}
    if mixed:
        raise ValueError(f"the seeds of a recipe trained with different batch sizes: {mixed}")
    return {r: b.pop() for r, b in found.items()}


def match_budgets(baseline: dict[int, float], other: dict[int, float],
                  tolerance: float) -> list[tuple[int, int]]:
    """(baseline step, other step) pairs of nearest cost ({step: cost}), within tolerance."""
    pairs = []
    for step, cost in sorted(baseline.items()):
        if not other or cost <= 0:
            continue
        near = min(other, key=lambda s: abs(other[s] - cost))
        if abs(other[near] - cost) <= tolerance * cost:
            pairs.append((step, near))
    return pairs


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
    gflops = parse_gflops(args.gflops, recipes)
    batch = recipe_batch_sizes(runs, args.batch_size)
    cfg = GainConfig(timesteps=list(args.timesteps), references=["whole"])
    with tempfile.TemporaryDirectory() as tmp:
        bench = Path(tmp) / "cases"
        write_synthetic_benchmark(bench, args.cases, seed=args.case_seed,
                                  namespace=args.case_namespace)
        cases, skipped = load_benchmark(bench)
        if skipped:
            raise RuntimeError(f"held-out cases could not be read: {skipped}")
        scores: dict[tuple[str, int, int], dict[str, np.ndarray]] = {}
        start = score(args.init, cases, cfg) if args.init is not None else None
        jobs = [(key, step, path) for key, run in sorted(runs.items())
                for step, path in run_checkpoints(run).items()
                if args.steps is None or step in args.steps]
        for (recipe, seed), step, path in tqdm(jobs, desc="checkpoints", unit="ckpt"):
            read_checkpoint(path)  # refuses an unreadable one by name
            export = export_checkpoint(path, Path(tmp) / f"{recipe}_{seed}_{step}")
            scores[(recipe, seed, step)] = score(export, cases, cfg)
    if start is not None:
        for recipe, seed in runs:
            scores[(recipe, seed, 0)] = start

    def cost(recipe: str, step: int) -> float:
        """The budget spent at a step: samples seen, or training TFLOPs with --gflops."""
        samples = step * batch[recipe]
        return samples if gflops is None else samples * gflops[recipe] / 1000

    rows = []
    for (recipe, seed, step), s in sorted(scores.items()):
        rows.append({"recipe": recipe, "seed": seed, "step": step,
                     "samples_seen": step * batch[recipe],
                     **({} if gflops is None else {"train_tflops": cost(recipe, step)}),
                     **{f"{m}_gain_t{t}": float(s[m][:, i].mean()) for m in ("psnr", "gms")
                        for i, t in enumerate(args.timesteps)}})
    paired = []
    seeds = sorted({seed for _, seed in runs})

    def steps_of(recipe: str) -> dict[int, float]:
        """{step: cost} of the steps every seed of a recipe was scored at, after step 0."""
        common = set.intersection(*({s for r, sd, s in scores if r == recipe and sd == seed}
                                    for seed in seeds))
        return {step: cost(recipe, step) for step in sorted(common) if step > 0}

    for recipe in recipes:
        if recipe == args.baseline:
            continue
        matched = match_budgets(steps_of(args.baseline), steps_of(recipe),
                                args.flops_tolerance)
        for base_step, step in matched:
            for m in ("psnr", "gms"):
                for i, t in enumerate(args.timesteps):
                    a = np.concatenate([scores[(args.baseline, sd, base_step)][m][:, i]
                                        for sd in seeds])
                    b = np.concatenate([scores[(recipe, sd, step)][m][:, i] for sd in seeds])
                    paired.append({"recipe": recipe, "baseline": args.baseline, "step": step,
                                   "baseline_step": base_step,
                                   "budget": cost(recipe, step),
                                   "baseline_budget": cost(args.baseline, base_step),
                                   "metric": m, "t": t, **paired_difference(a, b)})
    result = {"date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
              "init": None if args.init is None else str(args.init),
              "runs": {f"{r}_s{s}": str(p) for (r, s), p in runs.items()},
              "cases": args.cases, "case_namespace": args.case_namespace,
              "case_seed": args.case_seed, "timesteps": args.timesteps,
              "batch_size": batch, "gflops_per_sample": gflops,
              "budget_unit": "samples seen" if gflops is None else "training TFLOPs",
              "rows": rows, "paired": paired}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "budget.json").write_text(json.dumps(result, indent=1))
    write_markdown(result, args.out / "budget.md")
    plot_curve(result, args.out / "curve.png")
    print((args.out / "budget.md").read_text())
    return result


def budget_key(result: dict[str, Any]) -> str:
    """The row field the budget is read from: training TFLOPs when recipes differ in cost."""
    return "samples_seen" if result.get("gflops_per_sample") is None else "train_tflops"


def mean_over_seeds(rows: list[dict], key: str,
                    budget: str = "samples_seen") -> dict[str, list[tuple[float, float]]]:
    """{recipe: [(budget, mean of key over seeds)]}, budgets ascending."""
    grouped: dict[tuple[str, float], list[float]] = defaultdict(list)
    for r in rows:
        grouped[(r["recipe"], r[budget])].append(r[key])
    out: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for (recipe, spent), values in sorted(grouped.items()):
        out[recipe].append((spent, float(np.mean(values))))
    return out


def write_markdown(result: dict[str, Any], path: Path) -> None:
    ts = result["timesteps"]
    budget = budget_key(result)
    unit = result.get("budget_unit", "samples seen")
    lines = [f"# Recipes at a fixed budget ({result['cases']} held-out cases, "
             f"{result['date']})", "", "Mean PSNR gain (dB) per timestep, mean over seeds:", "",
             f"| recipe | {unit} | " + " | ".join(f"t={t}" for t in ts) + " |",
             "|---|---|" + "---|" * len(ts)]
    curves = {t: mean_over_seeds(result["rows"], f"psnr_gain_t{t}", budget) for t in ts}
    for recipe in curves[ts[0]]:
        for k, (spent, _) in enumerate(curves[ts[0]][recipe]):
            cells = " | ".join(f"{curves[t][recipe][k][1]:+.2f}" for t in ts)
            lines.append(f"| {recipe} | {spent:g} | {cells} |")
    lines += ["", "Paired differences (recipe minus baseline, per case and seed, bootstrap 95%):",
              "", f"| recipe | step | {unit} | baseline step | metric | t | mean | 95% interval "
              "| wins |", "|---|---|---|---|---|---|---|---|---|"]
    for p in result["paired"]:
        lo, hi = p["ci95"]
        lines.append(f"| {p['recipe']} | {p['step']} | {p['budget']:g} | {p['baseline_step']} | "
                     f"{p['metric']} | {p['t']} | {p['mean_difference']:+.3f} | "
                     f"[{lo:+.3f}, {hi:+.3f}] | {p['b_better_cases']}/{p['cases']} |")
    path.write_text("\n".join(lines) + "\n")


def plot_curve(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    budget = budget_key(result)
    from_scratch = result.get("init") is None
    shown = [t for t in result["timesteps"] if t in (50, 100, 200)] or result["timesteps"][:3]
    fig, axes = plt.subplots(1, len(shown), figsize=(4 * len(shown), 3.2), squeeze=False)
    for ax, t in zip(axes[0], shown, strict=True):
        for recipe, points in mean_over_seeds(result["rows"], f"psnr_gain_t{t}", budget).items():
            ax.plot([s for s, _ in points], [g for _, g in points], marker="o", label=recipe)
        if from_scratch:
            ax.set_xscale("log")
        else:
            ax.set_xscale("symlog", linthresh=min(result["batch_size"].values()))
        ax.set_title(f"t = {t}")
        ax.set_xlabel(result.get("budget_unit", "samples seen")
                      + ("" if from_scratch else " after the warm start"))
        ax.set_ylabel("PSNR gain (dB)")
        ax.grid(alpha=0.3)
    axes[0][0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
