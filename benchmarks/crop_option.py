"""Should refinement see a padded crop around the mask (``padding_mask_crop``) by default?

On validation pairs (the "validation" seed namespace: no benchmark or training item) written
at image sizes above the model's, every case is aligned once on the whole image (as deployed),
then refined from its aligned crop with the crop option off and at each padding, from the
same noise; the outputs are scored against the artifact-free target inside the mask (PSNR and
SSIM in the mask's box, L1 and gradient similarity ``gms`` in the mask,
evaluation/metrics.py), paired against "off" with a bootstrap interval.

    PYTHONPATH=. python benchmarks/crop_option.py --out results/crop_option/crop_option.json
    PYTHONPATH=. python benchmarks/crop_option.py --cases 2 --sizes 128 --steps 2   # smoke
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from data.benchmark import load_benchmark, write_synthetic_benchmark
from evaluation.metrics import ground_truth_metrics
from evaluation.paired import paired_difference
from models.export import DEFAULT_EXPORT, load_pipeline
from models.pipeline import RefinementConfig

METRICS = {"psnr": False, "ssim": False, "l1": True, "gms": False}  # name: lower is better


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ckpt", type=Path, default=DEFAULT_EXPORT)
    p.add_argument("--cases", type=int, default=32, help="validation pairs per image size")
    p.add_argument("--sizes", type=int, nargs="+", default=[128, 256], help="image sizes (px)")
    p.add_argument("--paddings", type=int, nargs="+", default=[0, 16, 32, 64],
                   help="padding_mask_crop values compared with off")
    p.add_argument("--seed", type=int, default=1_000_003, help="validation-namespace seed")
    p.add_argument("--steps", type=int, default=None, help="default: the pipeline's")
    p.add_argument("--noise-seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=None)
    return p.parse_args(argv)


def measure(pipe: Any, cases: list, settings: dict[str, RefinementConfig], noise_seed: int
            ) -> dict[str, Any]:
    """Per-case metrics of every setting, the crop sides used and the paired differences."""
    crops = [pipe.align(c.image, c.mask, c.reference, noise_seed).crop.float() for c in
             tqdm(cases, desc="align", leave=False)]
    scores: dict[str, dict[str, list[float]]] = {}
    sides: dict[str, list[int]] = {}
    for name, cfg in tqdm(settings.items(), desc="settings", leave=False):
        out = pipe([c.image for c in cases], [c.mask for c in cases], crops, cfg, align=False,
                   seed=noise_seed).images
        for case, refined in zip(cases, out, strict=True):
            outside = ~case.mask
            if not np.array_equal(refined[outside], case.image[outside]):
                raise AssertionError(f"{name}: pixels outside the mask of {case.id} changed")
        rows = [ground_truth_metrics(o, c.target, c.mask) for o, c in zip(out, cases,
                                                                          strict=True)]
        scores[name] = {m: [float(r[m]) for r in rows] for m in METRICS}
        regions = [pipe.crop_region(c.mask, cfg) for c in cases]
        sides[name] = [c.mask.shape[1] if r is None else r[2] - r[0] for r, c in
                       zip(regions, cases, strict=True)]
    base = scores["off"]
    return {
        "mean": {n: {m: float(np.mean(v)) for m, v in s.items()} for n, s in scores.items()},
        "vs_off": {n: {m: paired_difference(base[m], s[m], lower_is_better=METRICS[m])
                       for m in METRICS} for n, s in scores.items() if n != "off"},
        "crop_side_px": {n: {"median": float(np.median(v)), "min": int(min(v)),
                             "max": int(max(v))} for n, v in sides.items()},
        "input": {m: float(np.mean([ground_truth_metrics(c.image, c.target, c.mask)[m]
                                    for c in cases])) for m in METRICS},
        "per_case": scores,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.time()
    pipe = load_pipeline(args.ckpt)
    base = RefinementConfig(padding_mask_crop=None)
    if args.steps:
        base = replace(base, num_steps=args.steps)
    settings = {"off": base, **{f"pad{p}": replace(base, padding_mask_crop=p)
                                for p in args.paddings}}
    result: dict[str, Any] = {
        "command": " ".join(["python benchmarks/crop_option.py",
                             *(sys.argv[1:] if argv is None else argv)]),
        "date_utc": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch thread(s)",
        "export": str(args.ckpt), "model_size": pipe.image_size,
        "alignment": asdict(pipe.alignment), "refinement": asdict(base),
        "pairs": {"namespace": "validation", "seed": args.seed, "cases": args.cases},
        "sizes": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes:
            root = Path(tmp) / str(size)
            write_synthetic_benchmark(root, args.cases, args.seed, image_size=size,
                                      namespace="validation")
            cases, skipped = load_benchmark(root)
            if skipped:
                raise RuntimeError(f"unreadable generated cases: {skipped}")
            result["sizes"][str(size)] = measure(pipe, cases, settings, args.noise_seed)
            print(summary(size, result["sizes"][str(size)]))
    result["seconds"] = round(time.time() - start, 1)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))
    return result


def summary(size: int, res: dict[str, Any]) -> str:
    lines = [f"{size} px: mean (paired difference to off, 95% interval, cases better)"]
    for name, means in res["mean"].items():
        cells = []
        for m in METRICS:
            cell = f"{m} {means[m]:.4f}"
            if name != "off":
                d = res["vs_off"][name][m]
                cell += (f" ({d['mean_difference']:+.4f} [{d['ci95'][0]:+.4f}, "
                         f"{d['ci95'][1]:+.4f}], {d['b_better_cases']}/{d['cases']})")
            cells.append(cell)
        side = res["crop_side_px"][name]["median"]
        lines.append(f"  {name:<6} crop {side:>5.0f} px  " + "  ".join(cells))
    return "\n".join(lines)


if __name__ == "__main__":
    main()
