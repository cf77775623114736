"""Evaluate an export on a benchmark: ``python eval.py bench_dir=DIR ckpt_path=EXPORT_DIR``.

1. calibration sweep (Figure 5) over the cases with a reference_mask -> best (t*, block*);
2. correspondence baselines on the same cases (whole reference, same-position box, SIFT);
3. the alignment stage at (t*, block*) on every case, then the refinement evaluation
   (evaluation/refinement.py, when present);
4. report.json, report.md, figures/, alignment.yaml and qualitative.png in the run folder.

With no arguments a synthetic benchmark is generated into the run folder and the shipped
export is used. Malformed cases are listed by id with the reason; the run goes on.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import datetime
import importlib.metadata
import logging
import platform
import sys
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from data.benchmark import BenchmarkCase, load_benchmark, write_synthetic_benchmark
from evaluation import figures
from evaluation.baselines import BASELINES, MatchConfig, run_baselines
from evaluation.report import SCHEMA_VERSION, write_report_json, write_report_md
from evaluation.sweep import SweepConfig, SweepResult, case_tensors, model_image_size, run_sweep
from models.alignment import Alignment, region_mask
from models.checkpoint import as_export
from models.correspondence import mask_boxes, mask_iou, mask_iou_box_target
from models.export import DEFAULT_EXPORT, Components, load_export
from models.pipeline import AlignmentConfig, RefineByAlign

log = logging.getLogger(__name__)

VERSIONED = ("torch", "diffusers", "transformers", "numpy", "opencv-python-headless",
             "hydra-core", "matplotlib")


def resolve_device(name: str) -> torch.device:
    """``auto`` -> cuda when available, else cpu; anything else as given."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in VERSIONED:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return out


def prepare_benchmark(cfg: DictConfig, components: Components, run_dir: Path) -> Path:
    """The benchmark to evaluate: ``bench_dir``, or a synthetic one written into the run."""
    if cfg.bench_dir:
        return Path(cfg.bench_dir)
    out = run_dir / "benchmark"
    log.info("bench_dir is null: writing %d synthetic cases to %s", cfg.bench_cases, out)
    with tqdm(total=int(cfg.bench_cases), desc="benchmark", unit="case",
              disable=not cfg.progress) as bar:
        write_synthetic_benchmark(out, int(cfg.bench_cases), int(cfg.bench_seed),
                                  model_image_size(components),
                                  components.reference_encoder.image_size, progress=bar.update)
    return out


def compute_alignments(pipeline: RefineByAlign, cases: Sequence[BenchmarkCase], seed: int,
                       progress: bool = True) -> dict[str, Alignment]:
    """The deployed alignment stage (fixed t*, block*, per-case seed) on every case."""
    size = model_image_size(pipeline.components)
    out = {}
    for case in tqdm(cases, desc="align", unit="case", disable=not progress):
        image, mask, reference = case_tensors(case, size)
        out[case.id] = pipeline.align(image.to(pipeline.device), mask.to(pipeline.device),
                                      reference.to(pipeline.device), seed)
    return out


def alignment_scores(alignments: dict[str, Alignment],
                     cases: Sequence[BenchmarkCase]) -> dict[str, dict[str, float]]:
    """Per-case IoU of the deployed region and its box (no margin) vs ground truth."""
    scores = {}
    for case in cases:
        if case.reference_mask is None or case.id not in alignments:
            continue
        region = alignments[case.id].region.cpu()[None]
        gt = torch.from_numpy(np.array(case.reference_mask, dtype=bool))[None]
        box = region_mask(mask_boxes(region)[0].tolist(), tuple(gt.shape[-2:]))[None]
        scores[case.id] = {"mask": float(mask_iou(region, gt)[0]),
                           "box": float(mask_iou(box, mask_iou_box_target(gt))[0])}
    return scores


def _mean_pair(rows: Sequence[dict[str, float]]) -> dict[str, float]:
    return {f"miou_{k}": float(np.mean([r[k] for r in rows])) if rows else float("nan")
            for k in ("mask", "box")}


def by_category(sweep: SweepResult, baselines: dict[str, Any],
                cases: Sequence[BenchmarkCase]) -> dict[str, Any]:
    """Ours (best cell, seeds averaged) and each baseline, per meta.json category."""
    category = {c.id: c.category for c in cases}
    ti, li = sweep.best["t_index"], sweep.blocks.index(sweep.best["layer"])
    groups: dict[str, list[int]] = defaultdict(list)
    for i, case_id in enumerate(sweep.case_ids):
        groups[category[case_id]].append(i)
    out = {}
    for cat, idx in sorted(groups.items()):
        ours = [{"mask": float(sweep.scores_mask[i, :, ti, li].mean()),
                 "box": float(sweep.scores_box[i, :, ti, li].mean())} for i in idx]
        row: dict[str, Any] = {"num_cases": len(idx), "ours": _mean_pair(ours)}
        for name in BASELINES:
            row[name] = _mean_pair([baselines["per_case"][sweep.case_ids[i]][name] for i in idx])
        out[cat] = row
    return out


def run_refinement(cases: Sequence[BenchmarkCase], components: Components,
                   alignments: dict[str, Alignment], cfg: DictConfig
                   ) -> tuple[dict[str, Any] | None, dict[str, Any]]:
    """Call site of the refinement evaluation (evaluation/refinement.py), guarded.

    Returns (result or None, status {run, reason}). The sweep's report is written either way.
    """
    if not cfg.run_refinement:
        return None, {"run": False, "reason": "run_refinement=false"}
    try:
        from evaluation.refinement import evaluate_refinement
    except ImportError as err:
        log.warning("refinement evaluation not available: %s", err)
        return None, {"run": False, "reason": f"evaluation.refinement not importable: {err}"}
    # ---- REFINEMENT EVALUATION CALL SITE (owned by evaluation/refinement.py) ----
    try:
        result = evaluate_refinement(cases, components, alignments, cfg.refinement)
    except Exception as err:  # keep the sweep's report: say what failed instead of losing it
        log.exception("refinement evaluation failed")
        return None, {"run": False, "reason": f"failed: {err.__class__.__name__}: {err}"}
    return result, {"run": True, "reason": None}


def _jsonable_metrics(node: Any) -> Any:
    """Metric dicts with numpy scalars turned into floats (strings such as notes kept)."""
    if isinstance(node, dict):
        return {str(k): _jsonable_metrics(v) for k, v in node.items()}
    if isinstance(node, np.generic | torch.Tensor):
        return float(node)
    return node


def qualitative_rows(cases: Sequence[BenchmarkCase], alignments: dict[str, Alignment],
                     outputs: dict[str, dict[str, np.ndarray]], num: int) -> list[dict]:
    """Rows of the qualitative grid; cases with a reference_mask first."""
    ordered = sorted(cases, key=lambda c: c.reference_mask is None)[:num]
    rows = []
    for case in ordered:
        found = alignments.get(case.id)
        rows.append({
            "id": case.id, "image": case.image, "mask": case.mask, "reference": case.reference,
            "heat": found.heat.cpu().numpy() if found is not None else None,
            "box": found.box if found is not None else None,
            "reference_mask": case.reference_mask, "target": case.target,
            "outputs": outputs.get(case.id, {}),
        })
    return rows


def write_alignment_yaml(chosen: AlignmentConfig, path: Path, note: str) -> Path:
    """alignment.yaml in the format of configs/alignment/default.yaml."""
    body = OmegaConf.to_yaml(OmegaConf.create({
        "timestep": int(chosen.timestep), "block": int(chosen.block),
        "threshold": float(chosen.threshold), "margin": float(chosen.margin)}))
    path.write_text(f"# {note}\n{body}")
    return path


def evaluate(cfg: DictConfig, run_dir: Path) -> Path:
    """The whole evaluation; returns the path of report.json."""
    run_dir.mkdir(parents=True, exist_ok=True)
    if cfg.get("num_threads"):
        torch.set_num_threads(int(cfg.num_threads))
    device = resolve_device(cfg.device)
    ckpt = Path(cfg.ckpt_path) if cfg.ckpt_path else DEFAULT_EXPORT
    components = load_export(as_export(ckpt, run_dir / "export"), device)  # .ckpt: exported
    bench_dir = prepare_benchmark(cfg, components, run_dir)
    cases, skipped = load_benchmark(bench_dir)
    for case_id, reason in skipped:
        log.warning("skipped case %s: %s", case_id, reason)
    sweepable = [c for c in cases if c.reference_mask is not None]
    if not cases:
        log.warning("no valid case in %s", bench_dir)

    chosen = AlignmentConfig(**OmegaConf.to_container(cfg.alignment, resolve=True))
    correspondence = sweep = baselines = None
    figure_paths: dict[str, str] = {}
    if sweepable:
        sweep_cfg = SweepConfig(**{**OmegaConf.to_container(cfg.sweep, resolve=True),
                                   "threshold": chosen.threshold})
        sweep = run_sweep(components, sweepable, sweep_cfg, progress=cfg.progress)
        baselines = run_baselines(sweepable, MatchConfig(**cfg.baselines), cfg.progress)
        chosen.timestep, chosen.block = sweep.best["t"], sweep.best["layer"]
        correspondence = {**sweep.to_dict(), "baselines": baselines["scores"],
                          "feature_matching": baselines["feature_matching"],
                          "by_category": by_category(sweep, baselines, cases)}
        fig_dir = run_dir / "figures"
        curves = sweep.curves()
        figure_paths = {
            "timestep_curve": figures.timestep_curve(curves["timestep"],
                                                     fig_dir / "timestep_curve.png",
                                                     baselines["scores"]),
            "layer_curve": figures.layer_curve(curves["layer"], sweep.blocks,
                                               fig_dir / "layer_curve.png", baselines["scores"]),
            "heatmap_mask": figures.table_heatmap(sweep.table_mask, sweep.best, sweep.blocks,
                                                  fig_dir / "heatmap_mask.png"),
            "heatmap_box": figures.table_heatmap(sweep.table_box, sweep.best, sweep.blocks,
                                                 fig_dir / "heatmap_box.png",
                                                 "box mIoU (timestep x block)"),
        }
    else:
        log.warning("no case has a reference_mask: no sweep; alignment stays at %s", chosen)

    pipeline = RefineByAlign(components, chosen)
    seed = int(cfg.refinement.get("seed", cfg.seed))
    alignments = compute_alignments(pipeline, cases, seed, cfg.progress)
    if correspondence is not None:
        deployed = list(alignment_scores(alignments, cases).values())
        correspondence["deployed"] = {**_mean_pair(deployed), "num_cases": len(deployed)}

    refine_cfg = cfg.copy()
    OmegaConf.update(refine_cfg, "refinement.alignment",
                     {"timestep": chosen.timestep, "block": chosen.block,
                      "threshold": chosen.threshold, "margin": chosen.margin}, merge=True)
    result, status = run_refinement(cases, components, alignments, refine_cfg)
    outputs = result.pop("outputs", {}) if result else {}
    rows = qualitative_rows(cases, alignments, outputs, int(cfg.qualitative.num_cases))
    if rows:
        figure_paths["qualitative"] = figures.qualitative_grid(rows, run_dir / "qualitative.png")

    note = (f"calibrated by eval.py on {len(sweepable)} case(s) of {bench_dir}" if sweep
            else "no reference_mask in the benchmark: defaults, not calibrated")
    write_alignment_yaml(chosen, run_dir / "alignment.yaml", note)
    report = {
        "schema_version": SCHEMA_VERSION,
        "meta": {"checkpoint": str(ckpt), "bench_dir": str(bench_dir),
                 "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
                 "device": str(device),
                 "date": datetime.datetime.now().isoformat(timespec="seconds"),
                 "versions": versions(), "run_dir": str(run_dir)},
        "counts": {
            "cases_found": len(cases) + len(skipped), "cases_loaded": len(cases),
            "skipped": len(skipped), "with_reference_mask": len(sweepable),
            "without_reference_mask": len(cases) - len(sweepable),
            "with_target": sum(c.target is not None for c in cases),
            "sweep_cases": len(sweep.case_ids) if sweep else 0,
            "feature_matching_failures":
                baselines["feature_matching"]["failures"] if baselines else 0,
        },
        "skipped": [{"id": i, "reason": r} for i, r in skipped],
        "correspondence": correspondence,
        "refinement": _jsonable_metrics(result.get("methods", {})) if result else {},
        "refinement_by_category": _jsonable_metrics(result.get("by_category", {}))
        if result else {},
        "refinement_counts": _jsonable_metrics(result.get("counts", {})) if result else {},
        "refinement_status": status,
        "alignment": {"timestep": int(chosen.timestep), "block": int(chosen.block),
                      "threshold": float(chosen.threshold), "margin": float(chosen.margin)},
        "figures": {k: str(Path(v).relative_to(run_dir)) for k, v in figure_paths.items()},
    }
    path = write_report_json(report, run_dir / "report.json")
    write_report_md(report, run_dir / "report.md")
    return path


@hydra.main(version_base="1.3", config_path="configs", config_name="eval")
def main(cfg: DictConfig) -> None:
    log.info("config:\n%s", OmegaConf.to_yaml(cfg, resolve=False))
    path = evaluate(cfg, Path(cfg.paths.output_dir))
    print(f"report: {path}")


if __name__ == "__main__":
    main()
