"""How much of the input's noise one denoiser step removes, and what error it adds of its own.

The denoising gain (models/denoising_gain.py) says how far the x0 prediction is from the
target; this says why. Inside the mask the prediction's error is split along the noise it was
given (``models.denoising_gain.noise_left``): the share of the noise left in (1: the input
returned, 0: all removed) and the error that is not the input's noise (structure lost or
invented), both relative to the noise power. For pixel-space models the mask is also split
into flat pixels and pixels within one pixel of an edge of the clean target. A tuned bilateral
filter (``--bilateral``, the per-t parameters ``benchmarks/classical_denoisers.py`` chose)
runs beside the exports on the same cases and noise.

    python benchmarks/noise_left.py --ckpt checkpoints/tiny_synthetic \
        --bilateral results/denoising_gain/classical/classical.json --out noise_left.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler

from benchmarks.classical_denoisers import METHODS, ClassicalDenoiser, synthetic_cases
from data.benchmark import BenchmarkCase
from evaluation.denoising_gain import GainConfig, case_batches
from models.autoencoder import PixelSpace
from models.denoising_gain import noise_left, one_step_predictions
from models.export import load_pipeline

log = logging.getLogger("noise_left")
EDGE_STEP = 0.05  # a neighbour differing by more than this (of the [-1, 1] range) is an edge


def edge_pixels(target: torch.Tensor) -> torch.Tensor:
    """[B,1,H,W] bool: pixels within one pixel of a step in the target's mean channel."""
    g = target.mean(1, keepdim=True)
    step = torch.zeros_like(g, dtype=torch.bool)
    dx = (g[..., :, 1:] - g[..., :, :-1]).abs() > EDGE_STEP
    dy = (g[..., 1:, :] - g[..., :-1, :]).abs() > EDGE_STEP
    step[..., :, 1:] |= dx
    step[..., :, :-1] |= dx
    step[..., 1:, :] |= dy
    step[..., :-1, :] |= dy
    return F.max_pool2d(step.float(), 3, 1, 1).bool()


def regions(target: torch.Tensor, mask: torch.Tensor, latents: torch.Tensor,
            pixel_space: bool) -> dict[str, torch.Tensor]:
    """Element selections of the latents: the mask, and for pixel space its flat / edge parts."""
    inside = F.interpolate(mask, size=latents.shape[-2:], mode="nearest") > 0.5
    out = {"mask": inside.expand_as(latents)}
    if pixel_space:
        edge = edge_pixels(target)
        out["mask_flat"] = (inside & ~edge).expand_as(latents)
        out["mask_edge"] = (inside & edge).expand_as(latents)
    return out


def decompose(denoiser: torch.nn.Module, pipe: Any, scheduler: DDPMScheduler,
              cases: list[BenchmarkCase], timesteps: list[int], seed: int) -> dict[str, Any]:
    """{t: {region: noise_left(...)}} of one denoiser over all cases (pooled elements)."""
    pixel_space = isinstance(pipe.autoencoder, PixelSpace)
    sums: dict[tuple[int, str], list[torch.Tensor]] = defaultdict(list)
    cfg = GainConfig(timesteps=timesteps, seed=seed)
    for target, mask, context, seeds in case_batches(pipe, cases, "whole", cfg):
        for t, clean, noisy, x0 in one_step_predictions(denoiser, pipe.autoencoder, scheduler,
                                                        target, mask, context, timesteps, seeds):
            for name, select in regions(target, mask, clean, pixel_space).items():
                if select.any():  # a region no case has (e.g. no flat pixel) is left out
                    sums[(t, name)].append(torch.stack([clean[select], noisy[select],
                                                        x0[select]]))
    out: dict[str, Any] = {}
    for (t, name), parts in sums.items():
        clean, noisy, x0 = torch.cat(parts, dim=1)
        alpha_bar = float(scheduler.alphas_cumprod[t])
        row = noise_left(clean, noisy, x0, alpha_bar)
        row["gain_db"] = float(-10 * np.log10(row["error_ratio"]))
        out.setdefault(str(t), {})[name] = row
    return out


def bilateral_parameters(path: Path) -> dict[int, float]:
    """{t: colour sigma} chosen on validation cases by classical_denoisers.py."""
    rows = json.loads(path.read_text())["rows"]["bilateral"]
    return {int(r["t"]): float(r["parameter"]) for r in rows}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", nargs="+", default=["checkpoints/tiny_synthetic"],
                   help="exports, as PATH or LABEL=PATH")
    p.add_argument("--bilateral", type=Path, default=None,
                   help="classical_denoisers.py's JSON: add its bilateral filter")
    p.add_argument("--cases", type=int, default=100)
    p.add_argument("--case-seed", type=int, default=0)
    p.add_argument("--namespace", choices=("validation", "benchmark"), default="benchmark",
                   help="benchmark: disjoint from the validation cases the filter was tuned on")
    p.add_argument("--timesteps", type=int, nargs="+", default=[10, 50, 100, 200, 400])
    p.add_argument("--seed", type=int, default=0, help="per-case noise seed base")
    p.add_argument("--out", type=Path, required=True)
    return p.parse_args(argv)


def format_rows(result: dict[str, Any]) -> str:
    lines = [f"{'denoiser':<22} {'t':>4} {'region':<10} {'noise left':>10} {'own error':>10}"
             f" {'gain dB':>8}"]
    for label, by_t in result["denoisers"].items():
        for t, by_region in by_t.items():
            for name, r in by_region.items():
                lines.append(f"{label:<22} {t:>4} {name:<10} {r['noise_left']:>10.3f} "
                             f"{r['other_error']:>10.3f} {r['gain_db']:>+8.2f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_grad_enabled(False)
    exports = dict(c.split("=", 1) if "=" in c else (Path(c).name, c) for c in args.ckpt)
    pipes = {label: load_pipeline(path) for label, path in exports.items()}
    first = next(iter(pipes.values()))
    result: dict[str, Any] = {
        "date_utc": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "exports": exports, "cases": args.cases, "namespace": args.namespace,
        "case_seed": args.case_seed, "noise_seed": args.seed, "timesteps": args.timesteps,
        "edge_step": EDGE_STEP, "denoisers": {}}
    with tempfile.TemporaryDirectory() as tmp:
        cases = synthetic_cases(Path(tmp), args.cases, args.case_seed, args.namespace, first)
        for label, pipe in pipes.items():
            log.info("%s", label)
            result["denoisers"][label] = decompose(pipe.unet, pipe, pipe.scheduler, cases,
                                                   args.timesteps, args.seed)
        if args.bilateral is not None:
            chosen = bilateral_parameters(args.bilateral)
            missing = [t for t in args.timesteps if t not in chosen]
            if missing:
                raise ValueError(f"{args.bilateral}: no bilateral parameter for t = {missing}")
            scheduler = DDPMScheduler.from_config(first.scheduler.config,
                                                  prediction_type="sample")
            by_t: dict[str, Any] = {}
            for t in args.timesteps:
                denoiser = ClassicalDenoiser(scheduler, 3, METHODS["bilateral"][0], chosen[t])
                by_t.update(decompose(denoiser, first, scheduler, cases, [t], args.seed))
            result["denoisers"]["bilateral"] = by_t
            result["bilateral_parameters"] = {str(t): chosen[t] for t in args.timesteps}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(format_rows(result))
    return result


if __name__ == "__main__":
    main()
