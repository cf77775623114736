"""What a tuned classical denoiser gains at each timestep: a yardstick for the model's denoising
gain on the same cases, the same noise and the same scoring (models/denoising_gain.py).

Each classical method sees the noisy target rescaled to an unbiased x0 estimate
(x_t / sqrt(alpha_bar_t), clipped to [-1, 1], as uint8) and returns its denoised image as the
x0 prediction; ``score_batch`` then pastes it into the mask and scores it exactly as it scores
the model's. The parameter of each method (Gaussian sigma, bilateral colour sigma, non-local
means strength h) is chosen per timestep on validation-namespace cases and reported on
benchmark cases (``--bench-dir`` or the benchmark namespace), next to the export's own gain.

    python benchmarks/classical_denoisers.py --ckpt checkpoints/tiny_synthetic \
        --bench-dir BENCH --out results/denoising_gain/classical
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import cv2
import numpy as np
import torch
from diffusers import DDPMScheduler
from torch import nn

from data.benchmark import BenchmarkCase, load_benchmark, write_synthetic_benchmark
from evaluation.denoising_gain import GainConfig, measure_cases
from models.alignment import case_noise_seed
from models.denoising_gain import concat_scores, gain_rows, score_batch
from models.export import load_pipeline
from models.image_processor import to_uint8

log = logging.getLogger("classical_denoisers")
Filter = Callable[[np.ndarray, float], np.ndarray]  # uint8 [H,W,3], parameter -> uint8
METHODS: dict[str, tuple[Filter, tuple[float, ...]]] = {
    "gaussian": (lambda im, s: cv2.GaussianBlur(im, (0, 0), s),
                 (0.3, 0.5, 0.7, 1.0, 1.4, 2.0, 3.0)),
    "bilateral": (lambda im, s: cv2.bilateralFilter(im, 5, s, 2.0),
                  (5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0, 640.0)),
    "nl_means": (lambda im, h: cv2.fastNlMeansDenoisingColored(im, None, h, h, 3, 7),
                 (2.0, 4.0, 7.0, 10.0, 15.0, 22.0, 32.0, 45.0, 64.0)),
}


class ClassicalDenoiser(nn.Module):
    """A "denoiser" whose x0 prediction is ``filter(x_t / sqrt(alpha_bar_t), parameter)``;
    scored with a scheduler of prediction type ``sample``, so its output is that x0."""

    def __init__(self, scheduler: DDPMScheduler, channels: int, fn: Filter, parameter: float):
        super().__init__()
        self.scheduler, self.channels, self.fn, self.parameter = scheduler, channels, fn, parameter
        self.anchor = nn.Parameter(torch.zeros(()))  # score_batch reads the dtype from it

    def forward(self, x: torch.Tensor, t: torch.Tensor, encoder_hidden_states: torch.Tensor
                ) -> SimpleNamespace:
        scale = self.scheduler.alphas_cumprod[int(t[0])].sqrt()
        estimate = (x[:, : self.channels] / scale).clamp(-1, 1)
        out = [torch.from_numpy(self.fn(to_uint8(e), self.parameter)).permute(2, 0, 1)
               for e in estimate]
        return SimpleNamespace(sample=torch.stack(out).float() / 127.5 - 1)


def classical_scores(pipe: Any, cases: Sequence[BenchmarkCase], fn: Filter, parameter: float,
                     timesteps: Sequence[int], seed: int, batch_size: int = 32
                     ) -> dict[str, np.ndarray]:
    """score_batch's per-case scores of one filter at one parameter."""
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config, prediction_type="sample")
    size = pipe.image_size
    parts = []
    for start in range(0, len(cases), batch_size):
        chunk = cases[start: start + batch_size]
        target = torch.cat([pipe.image_processor.preprocess(c.target, size) for c in chunk])
        mask = torch.cat([pipe.mask_processor.preprocess(c.mask, size) for c in chunk])
        denoiser = ClassicalDenoiser(scheduler, target.shape[1], fn, parameter)
        parts.append(score_batch(denoiser, pipe.autoencoder, scheduler, target, mask,
                                 torch.zeros(len(chunk), 1, 1), timesteps,
                                 [case_noise_seed(seed, c.id) for c in chunk]))
    return concat_scores(parts)


def synthetic_cases(root: Path, num: int, seed: int, namespace: str, pipe: Any
                    ) -> list[BenchmarkCase]:
    write_synthetic_benchmark(root, num, seed, pipe.image_size, pipe.reference_encoder.image_size,
                              namespace=namespace)
    return readable_cases(root)


def readable_cases(root: Path) -> list[BenchmarkCase]:
    """Every case of ``root``; a case that cannot be read stops the run, named."""
    cases, skipped = load_benchmark(root)
    if skipped:
        raise RuntimeError(f"{root}: cases could not be read: {skipped}")
    return cases


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", type=Path, default=Path("checkpoints/tiny_synthetic"))
    p.add_argument("--bench-dir", type=Path, default=None,
                   help="report cases (default: --cases of the benchmark namespace, seed 0)")
    p.add_argument("--cases", type=int, default=100)
    p.add_argument("--calibration-cases", type=int, default=64,
                   help="validation-namespace cases the parameters are chosen on")
    p.add_argument("--calibration-seed", type=int, default=17)
    p.add_argument("--timesteps", type=int, nargs="+", default=[10, 50, 100, 200, 400, 700])
    p.add_argument("--seed", type=int, default=0, help="per-case noise seed base")
    p.add_argument("--out", type=Path, required=True)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_grad_enabled(False)
    pipe = load_pipeline(args.ckpt, "cpu")
    if pipe.vae is not None:
        raise SystemExit(f"{args.ckpt}: a latent model; the classical filters work on pixels")
    ts = list(args.timesteps)
    with tempfile.TemporaryDirectory() as tmp:
        calibration = synthetic_cases(Path(tmp) / "cal", args.calibration_cases,
                                      args.calibration_seed, "validation", pipe)
        report = (readable_cases(args.bench_dir) if args.bench_dir else
                  synthetic_cases(Path(tmp) / "bench", args.cases, 0, "benchmark", pipe))
    report = [c for c in report if c.target is not None]
    chosen: dict[str, list[float]] = {}
    sweep: dict[str, dict[str, list[float]]] = {}
    for method, (fn, grid) in METHODS.items():
        gains = {}
        for parameter in grid:
            s = classical_scores(pipe, calibration, fn, parameter, ts, args.seed)
            gains[parameter] = (s["psnr_x0"] - s["psnr_noisy"]).mean(0)
        sweep[method] = {str(p): g.tolist() for p, g in gains.items()}
        chosen[method] = [max(grid, key=lambda p, k=k: gains[p][k]) for k in range(len(ts))]
        log.info("%s: parameter per t %s (validation)", method, chosen[method])
    rows: dict[str, list[dict[str, float]]] = {}
    for method in METHODS:
        per_t = []
        for k, t in enumerate(ts):
            s = classical_scores(pipe, report, METHODS[method][0], chosen[method][k], [t],
                                 args.seed)
            per_t.append({**gain_rows(s, [t])[0], "parameter": chosen[method][k]})
        rows[method] = per_t
    model = measure_cases(pipe, report, GainConfig(timesteps=ts, seed=args.seed), progress=False)
    rows["model"] = model["references"]["whole"]["rows"]
    result = {"date_utc": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
              "export": str(args.ckpt), "timesteps": ts, "noise_seed": args.seed,
              "report_cases": len(report),
              "report_source": str(args.bench_dir) if args.bench_dir else "benchmark seed 0",
              "calibration": {"namespace": "validation", "seed": args.calibration_seed,
                              "cases": args.calibration_cases, "sweep_psnr_gain": sweep},
              "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "classical.json").write_text(json.dumps(result, indent=1))
    lines = [f"PSNR gain in the mask's box (dB, mean ± se over {len(report)} cases); classical "
             "parameters chosen per t on validation cases:", "",
             "| t | noisy PSNR | model | " + " | ".join(METHODS) + " |",
             "|---|---|---|" + "---|" * len(METHODS)]
    for k, t in enumerate(ts):
        cells = " | ".join(f"{rows[m][k]['psnr_gain']:+.2f} ± {rows[m][k]['psnr_gain_se']:.2f} "
                           f"({rows[m][k]['parameter']:g})" for m in METHODS)
        lines.append(f"| {t} | {rows['model'][k]['psnr_noisy']:.2f} | "
                     f"{rows['model'][k]['psnr_gain']:+.2f} ± "
                     f"{rows['model'][k]['psnr_gain_se']:.2f} | {cells} |")
    (args.out / "classical.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return result


if __name__ == "__main__":
    main()
