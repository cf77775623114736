"""How far a mean correspondence mIoU moves with the noise draw alone.

The sweep's cell and the deployed ``align()`` compute the same map from the same noise
(``tests/test_sweep.py``); each draws its own noise per case, so their means over the same
report cases differ by noise. This runs the deployed stage at the calibrated (t*, l*) of an
eval's ``alignment.yaml`` on that eval's report cases under ``--seeds`` noise seeds, two ways:
``shared`` (one seed for every case, as ``eval.py``'s deployed row does) and ``per_case``
(case k of the sweep's case list gets seed x 1,000,003 + k, as the sweep does), and reports
each run's mIoU, their spread, and where the eval's own swept cell and deployed mean fall.

    python scripts/alignment_noise.py --export checkpoints/tiny_synthetic \\
        --eval-dir results/recipe_gpu/eval_vpred_gpu --benchmark runs/bench200_s0 \\
        --seeds 8 --out benchmarks/cpu-<date>/alignment_noise.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import OmegaConf
from tqdm import tqdm

if __package__ in (None, ""):  # run as a file: make the repo root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data.benchmark import load_benchmark
from eval import alignment_scores
from evaluation.sweep import case_noise_seed, case_tensors, sweep_cases
from models.export import load_export
from models.pipeline import AlignmentConfig, RefineByAlign


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--export", required=True, help="export folder (model.safetensors, model.yaml)")
    p.add_argument("--eval-dir", required=True,
                   help="an eval.py output: alignment.yaml, report.json")
    p.add_argument("--benchmark", required=True, help="the benchmark folder that eval scored")
    p.add_argument("--seeds", type=int, default=8, help="noise seeds 0..N-1")
    p.add_argument("--out", default=None, help="JSON output path")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    eval_dir = Path(args.eval_dir)
    chosen = AlignmentConfig(**OmegaConf.to_container(OmegaConf.load(eval_dir / "alignment.yaml")))
    report = json.loads((eval_dir / "report.json").read_text())["correspondence"]
    report_ids = set(report["split"]["report_ids"])
    sweepable, _ = sweep_cases(load_benchmark(args.benchmark)[0])
    sweep_index = {c.id: k for k, c in enumerate(sweepable)}  # the sweep's case list
    cases = [c for c in sweepable if c.id in report_ids]
    if len(cases) != len(report_ids):
        raise SystemExit(f"{len(report_ids)} report cases in the eval, {len(cases)} found in "
                         f"{args.benchmark}: not the benchmark that eval scored")
    pipeline = RefineByAlign(load_export(args.export), chosen)
    tensors = {c.id: case_tensors(c, pipeline.image_size) for c in cases}

    def mean_iou(seed_of: dict[str, int]) -> float:
        found = {cid: pipeline.align_tensors(*tensors[cid], seed) for cid, seed in seed_of.items()}
        return float(np.mean([s["mask"] for s in alignment_scores(found, cases).values()]))

    runs: dict[str, list[float]] = {"shared": [], "per_case": []}
    for seed in tqdm(range(args.seeds), desc="noise seeds"):
        runs["shared"].append(mean_iou({c.id: seed for c in cases}))
        runs["per_case"].append(mean_iou({c.id: case_noise_seed(seed, sweep_index[c.id])
                                          for c in cases}))
    swept, deployed = report["best"]["miou_mask"], report["deployed"]["miou_mask"]
    result = {
        "what": "deployed align() at (t*, l*) on an eval's report cases: mask mIoU per noise "
                "seed, noise shared by all cases vs drawn per case",
        "export": args.export, "eval_dir": args.eval_dir, "benchmark": args.benchmark,
        "alignment": {"timestep": chosen.timestep, "block": chosen.block},
        "num_cases": len(cases), "seeds": list(range(args.seeds)),
        "miou_mask": {k: [round(v, 4) for v in vals] for k, vals in runs.items()},
        "mean": {k: round(float(np.mean(v)), 4) for k, v in runs.items()},
        "sd": {k: round(float(np.std(v, ddof=1)), 4) if len(v) > 1 else None
               for k, v in runs.items()},
        "eval_swept_cell": round(swept, 4), "eval_deployed": round(deployed, 4),
    }
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    return result


if __name__ == "__main__":
    main()
