"""Which sampler suits an export? Masked MSE to the ground truth on held-out refinement pairs.

    python scripts/compare_samplers.py [--ckpt EXPORT_DIR] [--cases 8] [--steps N] [--device cuda]
        [--variants ddpm:50:1,ddpm:50:2,ddpm:25:1:x0=200] [--baseline OTHER] [--out results.json]

Every sampler starts from the same noise and the same references (the ground-truth crops of
synthetic refinement-mode pairs), so differences come from the sampler alone. The pairs are
validation pairs: choose settings here, then report them on a benchmark (eval.py). A fourth
field ``x0=T`` stops sampling at timestep T and keeps the model's clean-image prediction
(``final_x0_timestep``).

``--baseline`` asks whether a better denoiser stays better through each sampler: another
export (run on the same pairs and noise) or the ``--out`` file of an earlier run with the same
cases, seed and variants (reused); each variant then gets the paired difference, this export
minus the baseline, in masked MSE and in masked PSNR (dB, pixel range [-1, 1]).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from data.modes import REFINEMENT
from data.synthetic import SyntheticPairs
from evaluation.paired import paired_difference
from models.export import DEFAULT_EXPORT, load_pipeline
from models.pipeline import RefineByAlignPipeline
from models.refinement import build_sampler, sample_inpaint

# (sampler, steps, guidance, options: scheduler config overrides and final_x0_timestep)
VARIANTS: list[tuple[str, int, float, dict]] = [
    ("ddpm", 50, 1.0, {}), ("ddpm", 50, 2.0, {}), ("ddpm", 50, 3.0, {}), ("ddim", 50, 1.0, {}),
    ("ddim", 50, 2.0, {}), ("dpm_solver", 25, 2.0, {}),
    ("ddpm", 50, 2.0, {"clip_sample": False}),  # is clipping x0 to [-1, 1] what saturates?
]


def parse_variants(text: str) -> list[tuple[str, int, float, dict]]:
    """``sampler:steps:guidance[:x0=T],...`` -> variants (training-convention scheduler
    options)."""
    variants = []
    for item in text.split(","):
        parts = item.strip().split(":")
        stop = parts[3].removeprefix("x0=") if len(parts) == 4 else None
        if len(parts) not in (3, 4) or (stop is not None and not stop.isdigit()):
            raise argparse.ArgumentTypeError(
                f"variant {item!r} is not sampler:steps:guidance[:x0=T] (e.g. ddpm:50:2, "
                "ddpm:25:1:x0=200)")
        options = {} if stop is None else {"final_x0_timestep": int(stop)}
        variants.append((parts[0], int(parts[1]), float(parts[2]), options))
    return variants


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", type=Path, default=DEFAULT_EXPORT)
    parser.add_argument("--cases", type=int, default=8)
    parser.add_argument("--seed", type=int, default=1_000_003, help="the validation seed")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=None, help="override every variant's steps")
    parser.add_argument("--variants", type=parse_variants, default=VARIANTS,
                        help="sampler:steps:guidance,... (default: the built-in list)")
    parser.add_argument("--baseline", type=Path, default=None,
                        help="an export folder, or a JSON written by --out (same cases, seed "
                             "and variants): each variant paired, this export minus it")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    variants = [(name, args.steps or steps, guidance, options)
                for name, steps, guidance, options in args.variants]

    pipe = load_pipeline(args.ckpt, device=args.device)
    pairs = SyntheticPairs(length=args.cases, seed=args.seed, image_size=pipe.image_size,
                           force_mode=REFINEMENT, namespace="validation")
    items = [pairs[i] for i in range(args.cases)]
    batch = {k: torch.stack([item[k] for item in items]).to(args.device) for k in items[0]}
    baseline_rows = None
    if args.baseline is not None:
        baseline_rows = (read_baseline(args.baseline, args.cases, args.seed, variants)
                         if args.baseline.is_file() else
                         run_variants(load_pipeline(args.baseline, device=args.device), batch,
                                      variants, args.device, f"baseline {args.baseline}"))
    rows = run_variants(pipe, batch, variants, args.device, str(args.ckpt))
    best = min(rows, key=lambda r: r["masked_mse"])
    print(f"best: {best['sampler']} {best['steps']} steps, guidance {best['guidance']}, "
          f"{best['options'] or 'training conventions'}; others, per case minus the best "
          "(bootstrap 95% interval), cases where the best is better:")
    for row in rows:
        row["ratio_to_best"] = row["masked_mse"] / best["masked_mse"]
        row["vs_best"] = paired_difference(best["masked_mse_per_case"],
                                           row["masked_mse_per_case"], lower_is_better=True)
        if row is not best:
            d = row["vs_best"]
            print(f"{row['sampler']:<12}{row['steps']:>6}{row['guidance']:>10.1f}  "
                  f"{d['mean_difference']:+.4f} [{d['ci95'][0]:+.4f}, {d['ci95'][1]:+.4f}], "
                  f"{d['cases'] - d['b_better_cases']}/{d['cases']}")
    if baseline_rows is not None:
        pair_with_baseline(rows, baseline_rows)
    if args.out:
        args.out.write_text(json.dumps({"export": str(args.ckpt), "cases": args.cases,
                                        "seed": args.seed, "baseline": str(args.baseline)
                                        if args.baseline else None, "rows": rows}, indent=1))
    return rows


def variant_key(name: str, steps: int, guidance: float, options: dict) -> tuple:
    return name, int(steps), float(guidance), json.dumps(options, sort_keys=True)


def run_variants(pipe: RefineByAlignPipeline, batch: dict, variants: list, device: str,
                 label: str) -> list[dict]:
    """Each variant on ``batch`` from the same noise (generator seed 0): masked MSE, per case."""
    context = pipe.reference_encoder(batch["reference"])
    null = pipe.reference_encoder.null(len(context))
    mask = batch["mask"]
    rows = []
    print(label)
    print(f"{'sampler':<12}{'steps':>6}{'guidance':>10}  {'options':<40}{'masked MSE':>11}{'s':>7}")
    for name, steps, guidance, options in variants:
        overrides = dict(options)
        stop = overrides.pop("final_x0_timestep", None)
        scheduler = build_sampler(name, pipe.scheduler.config, pipe.autoencoder, **overrides)
        start = time.perf_counter()
        out = sample_inpaint(pipe.unet, pipe.autoencoder, scheduler, batch["target"], mask,
                             context, null, steps, guidance, torch.Generator().manual_seed(0),
                             final_x0_timestep=stop)
        squared = ((out - batch["target"]) ** 2) * mask
        err = float(squared.sum() / mask.sum() / 3)
        per_case = (squared.flatten(1).sum(1) / mask.flatten(1).sum(1) / 3).tolist()
        if device != "cpu":
            torch.cuda.synchronize()
        rows.append({"sampler": name, "steps": steps, "guidance": guidance, "options": options,
                     "masked_mse": err, "masked_mse_per_case": per_case,
                     "seconds": time.perf_counter() - start})
        shown = ", ".join(f"{k}={v}" for k, v in options.items()) or "-"
        print(f"{name:<12}{steps:>6}{guidance:>10.1f}  {shown:<40}{err:>11.4f}"
              f"{rows[-1]['seconds']:>7.1f}")
    return rows


def read_baseline(path: Path, cases: int, seed: int, variants: list) -> list[dict]:
    """The rows of an earlier ``--out`` file, checked to be the same comparison."""
    data = json.loads(path.read_text())
    if data.get("cases") != cases or data.get("seed", seed) != seed:
        raise SystemExit(f"compare_samplers: baseline {path} scored {data.get('cases')} cases "
                         f"of seed {data.get('seed')}, not {cases} of seed {seed}")
    found = {variant_key(r["sampler"], r["steps"], r["guidance"], r["options"]): r
             for r in data["rows"]}
    missing = [v for v in variants if variant_key(*v) not in found]
    if missing:
        raise SystemExit(f"compare_samplers: baseline {path} has no rows for {missing}")
    return [found[variant_key(*v)] for v in variants]


def masked_psnr(mse: list[float]) -> list[float]:
    return [10 * math.log10(4 / max(e, 1e-12)) for e in mse]


def pair_with_baseline(rows: list[dict], baseline_rows: list[dict]) -> None:
    """Adds ``vs_baseline`` (this export minus the baseline, per case, MSE and PSNR) to each
    row, and prints it."""
    print("this export minus the baseline, per case (bootstrap 95% interval), cases this "
          "export is better:")
    for row, base in zip(rows, baseline_rows, strict=True):
        mse = paired_difference(base["masked_mse_per_case"], row["masked_mse_per_case"],
                                lower_is_better=True)
        psnr = paired_difference(masked_psnr(base["masked_mse_per_case"]),
                                 masked_psnr(row["masked_mse_per_case"]))
        row["vs_baseline"] = {"masked_mse": mse, "masked_psnr": psnr}
        shown = ", ".join(f"{k}={v}" for k, v in row["options"].items()) or "-"
        print(f"{row['sampler']:<12}{row['steps']:>6}{row['guidance']:>10.1f}  {shown:<24}"
              f"MSE {mse['mean_difference']:+.4f} [{mse['ci95'][0]:+.4f}, {mse['ci95'][1]:+.4f}]"
              f"  PSNR {psnr['mean_difference']:+.2f} dB [{psnr['ci95'][0]:+.2f}, "
              f"{psnr['ci95'][1]:+.2f}]  {mse['b_better_cases']}/{mse['cases']}")


if __name__ == "__main__":
    main()
