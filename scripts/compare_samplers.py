"""Which sampler suits an export? Masked MSE to the ground truth on held-out refinement pairs.

    python scripts/compare_samplers.py [--ckpt EXPORT_DIR] [--cases 8] [--steps N] [--device cuda]
        [--variants ddpm:50:1,ddpm:50:2,ddpm:25:1:x0=200] [--out results.json]

Every sampler starts from the same noise and the same references (the ground-truth crops of
synthetic refinement-mode pairs), so differences come from the sampler alone. The pairs are
validation pairs: choose settings here, then report them on a benchmark (eval.py). A fourth
field ``x0=T`` stops sampling at timestep T and keeps the model's clean-image prediction
(``final_x0_timestep``).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from data.modes import REFINEMENT
from data.synthetic import SyntheticPairs
from evaluation.paired import paired_difference
from models.export import DEFAULT_EXPORT, load_pipeline
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
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)

    pipe = load_pipeline(args.ckpt, device=args.device)
    pairs = SyntheticPairs(length=args.cases, seed=args.seed, image_size=pipe.image_size,
                           force_mode=REFINEMENT, namespace="validation")
    items = [pairs[i] for i in range(args.cases)]
    batch = {k: torch.stack([item[k] for item in items]).to(args.device) for k in items[0]}
    context = pipe.reference_encoder(batch["reference"])
    null = pipe.reference_encoder.null(len(context))
    mask = batch["mask"]
    rows = []
    print(f"{'sampler':<12}{'steps':>6}{'guidance':>10}  {'options':<40}{'masked MSE':>11}{'s':>7}")
    for name, steps, guidance, options in args.variants:
        steps = args.steps or steps
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
        if args.device != "cpu":
            torch.cuda.synchronize()
        rows.append({"sampler": name, "steps": steps, "guidance": guidance, "options": options,
                     "masked_mse": err, "masked_mse_per_case": per_case,
                     "seconds": time.perf_counter() - start})
        shown = ", ".join(f"{k}={v}" for k, v in options.items()) or "-"
        print(f"{name:<12}{steps:>6}{guidance:>10.1f}  {shown:<40}{err:>11.4f}"
              f"{rows[-1]['seconds']:>7.1f}")
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
    if args.out:
        args.out.write_text(json.dumps({"export": str(args.ckpt), "cases": args.cases,
                                        "rows": rows}, indent=1))
    return rows


if __name__ == "__main__":
    main()
