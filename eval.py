"""Evaluate an export on a benchmark: ``python eval.py bench_dir=DIR ckpt_path=EXPORT_DIR``.

1. provenance: the benchmark's generator seeds against the export's ``training_data.yaml``
   (data/provenance.py); a benchmark drawn from the training data is refused
   (``train_overlap=warn``: run anyway, the warning heads the report);
2. a seeded split of the cases with a reference_mask into a calibration part and a report
   part; the calibration sweep (Figure 5) chooses (t*, block*) and the top-k cells on the
   calibration part; every headline number (ours, baselines, deployed alignment, refinement
   methods) is measured on the report part; in-sample numbers stay as secondary rows, and a
   bootstrap over the calibration cases gives the stability of the choice;
3. the alignment stage at (t*, block*) on the report cases, then the refinement evaluation
   (evaluation/refinement.py);
4. report.json, report.md, figures/, alignment.yaml (from the calibration part) and
   qualitative.png in the run folder; with ``write_alignment_to_export=true`` the calibrated
   read-out is also written into the evaluated pipeline folder's ``model_index.json`` (so
   scripts/refine.py and ``RefineByAlignPipeline.from_pretrained`` deploy it). Off by
   default: with no ``ckpt_path`` the export is the shipped, tracked checkpoint;
5. with ``logger=wandb``: all of that logged into the wandb run that trained the export
   (recorded in its tracker.yaml), else into a new run linked to the export
   (evaluation/tracker.py); offline with WANDB_MODE=offline.

Resumable: every finished batch of cases (sweep vectors and scores, alignments, refinement
outputs and scores) is kept in ``<run folder>/cache`` (evaluation/cache.py); rerunning the
same command with the same ``run_dir=DIR`` reuses them and computes the rest, and says so in
the log and the report (``meta.cache``). A run folder whose cache was made with other
settings, export weights or benchmark contents is refused, the changes named.

With no arguments a synthetic benchmark is generated into the run folder (from the
"benchmark" seed namespace, so no case is a training item) and the shipped export is used.
Malformed cases are listed by id with the reason and the run goes on; when no case is left,
or any stage fails (the stage and case named), the run exits non-zero. When the refinement
stage fails, report.json is still written (``refinement_status.error``) before exiting.

Python entry point (for scripts that run many evaluations): ``evaluate(cfg, run_dir)`` with a
DictConfig composed from configs/eval.yaml returns the path of report.json and raises
:class:`EvalError` (stage, message, report path if one was written) when a stage fails;
a failure to log to wandb is such a stage (``wandb init``, ``wandb log``, ``wandb finish``).
"""

from __future__ import annotations

import os

# waiting OpenMP threads sleep instead of spinning: on a shared CPU, spinning threads made a
# 2-thread step 1.5-7x slower than 1 thread (benchmarks/cpu-2026-11-27)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import contextlib
import datetime
import importlib.metadata
import json
import logging
import platform
import sys
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from data.benchmark import BenchmarkCase, load_benchmark, write_synthetic_benchmark
from data.provenance import check_overlap, read_training_data
from evaluation import figures
from evaluation.baselines import BASELINES, match_config, run_baselines
from evaluation.cache import (
    CacheMismatch,
    CaseRecord,
    RunCache,
    Store,
    cache_summary,
    open_cache,
    stage,
)
from evaluation.denoising_gain import run_section as run_denoising_gain
from evaluation.external import (
    ExternalError,
    ExternalOutputs,
    load_external_methods,
    paired_with_ours,
)
from evaluation.refinement import METHODS, evaluate_refinement, refinement_config
from evaluation.report import SCHEMA_VERSION, write_report_json, write_report_md
from evaluation.sweep import (
    SweepConfig,
    SweepResult,
    case_tensors,
    run_sweep,
    split_ids,
    sweep_cases,
)
from evaluation.tracker import (
    TrackerError,
    finish_eval_run,
    log_eval,
    run_identity,
    start_eval_run,
    wandb_settings,
)
from models.alignment import Alignment, from_vector, region_mask
from models.checkpoint import as_pipeline_folder
from models.config import register_configs
from models.correspondence import mask_boxes, mask_iou, mask_iou_box_target
from models.export import DEFAULT_EXPORT, load_pipeline, write_alignment
from models.pipeline import AlignmentConfig, RefineByAlignPipeline

log = logging.getLogger(__name__)
register_configs()  # configs/eval.yaml's external_methods node
# configs/eval.yaml's hydra.run.dir: ``run_dir=DIR`` names the run folder (and resumes it)
OmegaConf.register_new_resolver("run_dir_or", lambda given, default: given or default,
                                replace=True)

TRAIN_OVERLAP = ("error", "warn")
ALIGNMENT_FILE = "alignment.yaml"  # the run's calibrated read-out (scripts/refine.py --alignment)


class EvalError(RuntimeError):
    """A stage of the evaluation failed; ``report`` is report.json if it was still written."""

    def __init__(self, stage: str, message: str, report: Path | None = None) -> None:
        super().__init__(f"eval failed at stage '{stage}': {message}")
        self.stage, self.report = stage, report


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


def prepare_benchmark(cfg: DictConfig, pipe: RefineByAlignPipeline, run_dir: Path) -> Path:
    """The benchmark to evaluate: ``bench_dir``, or a synthetic one written into the run."""
    if cfg.bench_dir:
        return Path(cfg.bench_dir)
    out = run_dir / "benchmark"
    log.info("bench_dir is null: writing %d synthetic cases to %s", cfg.bench_cases, out)
    with tqdm(total=int(cfg.bench_cases), desc="benchmark", unit="case",
              disable=not cfg.progress) as bar:
        write_synthetic_benchmark(out, int(cfg.bench_cases), int(cfg.bench_seed),
                                  pipe.image_size, pipe.reference_encoder.image_size,
                                  progress=bar.update)
    return out


def compute_alignments(pipe: RefineByAlignPipeline, cfg: AlignmentConfig,
                       cases: Sequence[BenchmarkCase], seed: int, progress: bool = True,
                       store: Store | None = None) -> dict[str, Alignment]:
    """The alignment stage at the read-out ``cfg`` (fixed t*, block*, same seed) on every
    case, on the sweep's view of it (its faithful mask); with a ``store``, each case's
    attention vector is kept and a resumed run rebuilds from it."""
    size, encoder = pipe.image_size, pipe.reference_encoder
    out = {}
    for case in tqdm(cases, desc="align", unit="case", disable=not progress):
        try:
            image, mask, reference = case_tensors(case, size)
            found = store.get([case.id]) if store is not None else None
            if found is None:
                out[case.id] = pipe.align_tensors(image, mask, reference, seed, cfg)
                if store is not None:
                    vector = out[case.id].vector.float().cpu().numpy()
                    store.put(case.id, {case.id: CaseRecord(arrays={"vector": vector})})
            else:
                vector = torch.from_numpy(found[0].arrays["vector"]).to(pipe.device)
                out[case.id] = from_vector(vector, reference.to(pipe.device), encoder.grid,
                                           encoder.num_prefix_tokens, cfg.threshold, cfg.margin)
        except Exception as err:
            raise EvalError("alignment", f"case {case.id}: {err.__class__.__name__}: {err}"
                            ) from err
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
                cases: Sequence[BenchmarkCase], ids: Sequence[str]) -> dict[str, Any]:
    """Ours (chosen cell, seeds averaged) and each baseline, per meta.json category, on ``ids``."""
    category = {c.id: c.category for c in cases}
    ti, li = sweep.best["t_index"], sweep.blocks.index(sweep.best["layer"])
    groups: dict[str, list[int]] = defaultdict(list)
    for case_id in ids:
        groups[category[case_id]].append(sweep.case_ids.index(case_id))
    out = {}
    for cat, idx in sorted(groups.items()):
        ours = [{"mask": float(sweep.scores_mask[i, :, ti, li].mean()),
                 "box": float(sweep.scores_box[i, :, ti, li].mean())} for i in idx]
        row: dict[str, Any] = {"num_cases": len(idx), "ours": _mean_pair(ours)}
        for name in BASELINES:
            row[name] = _mean_pair([baselines["per_case"][sweep.case_ids[i]][name] for i in idx])
        out[cat] = row
    return out


def baseline_means(baselines: dict[str, Any], ids: Sequence[str]) -> dict[str, dict[str, float]]:
    """Each baseline's mIoU pair over the cases ``ids``."""
    return {name: _mean_pair([baselines["per_case"][i][name] for i in ids])
            for name in BASELINES}


def run_refinement(cases: Sequence[BenchmarkCase], pipe: RefineByAlignPipeline,
                   alignments: dict[str, Alignment], cfg: DictConfig,
                   cache: RunCache | None = None,
                   external: dict[str, ExternalOutputs] | None = None
                   ) -> tuple[dict[str, Any] | None, dict[str, Any]]:
    """The refinement evaluation (evaluation/refinement.py) on ``cases``.

    Returns (result or None, status {run, reason, error[, sampling]}); a failure is returned
    as ``error`` (the caller writes the report, then fails the run).
    """
    if not cfg.run_refinement:
        if external:
            log.warning("run_refinement=false: external methods %s are not scored",
                        sorted(external))
        return None, {"run": False, "reason": "run_refinement=false", "error": None}
    try:
        result = evaluate_refinement(cases, pipe, alignments, cfg.refinement,
                                     bool(cfg.progress), cache,
                                     {n: e.outputs for n, e in (external or {}).items()},
                                     cfg.baselines.get("paint_by_example"))
    except Exception as err:
        log.exception("refinement evaluation failed")
        return None, {"run": False, "reason": "failed",
                      "error": f"{err.__class__.__name__}: {err}"}
    return result, {"run": True, "reason": None, "error": None,
                    "sampling": asdict(refinement_config(cfg.refinement))}


def provenance(cfg: DictConfig, ckpt: Path, cases: Sequence[BenchmarkCase]) -> dict[str, Any]:
    """data/provenance.py's verdict; refuses an overlapping benchmark unless told to warn."""
    mode = str(cfg.get("train_overlap", "error"))
    if mode not in TRAIN_OVERLAP:
        raise ValueError(f"train_overlap must be one of {TRAIN_OVERLAP}, got {mode!r}")
    verdict = check_overlap(read_training_data(ckpt), [c.meta for c in cases])
    if verdict["status"] == "overlap":
        if mode == "error":
            raise EvalError("provenance", verdict["message"] + " (train_overlap=warn to run "
                            "anyway, with the warning in the report)")
        log.error("%s", verdict["message"])
    elif verdict["status"] != "disjoint":
        log.warning("%s", verdict["message"])
    return verdict


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
    body = OmegaConf.to_yaml(OmegaConf.create(asdict(chosen)))
    path.write_text(f"# {note}\n{body}")
    return path


def split_cases(cases: Sequence[BenchmarkCase], cfg: DictConfig
                ) -> tuple[list[BenchmarkCase], list[str], list[BenchmarkCase], bool]:
    """(sweepable cases, calibration ids, report cases, held out?).

    The cases with a reference_mask are split (``sweep.split_seed``, ``calibration_fraction``);
    the report cases are every other case (those without a reference_mask included). With the
    split off or fewer than two sweepable cases, both are every case (in-sample).
    """
    sweepable, _ = sweep_cases(cases)
    ids = [c.id for c in sweepable]
    held_out = bool(cfg.sweep.split) and len(ids) >= 2
    if not held_out:
        return sweepable, ids, list(cases), False
    calibration, _ = split_ids(ids, float(cfg.sweep.calibration_fraction),
                               int(cfg.sweep.split_seed))
    chosen = set(calibration)
    return sweepable, calibration, [c for c in cases if c.id not in chosen], True


def report_warnings(verdict: dict[str, Any], held_out: bool, sweep: SweepResult | None,
                    status: dict[str, Any]) -> list[str]:
    """What report.md prints first: anything that makes the headline numbers less clean."""
    warnings = []
    if verdict["status"] in ("overlap", "unknown"):
        warnings.append(verdict["message"])
    if sweep is not None and not held_out:
        warnings.append("IN-SAMPLE: no held-out split (sweep.split=false or fewer than two "
                        "cases with a reference_mask): (t*, l*) is scored on the cases it was "
                        "chosen on")
    if status.get("error"):
        warnings.append(f"REFINEMENT FAILED: {status['error']}")
    return warnings


def compare_readouts(pipe: RefineByAlignPipeline, cases: Sequence[BenchmarkCase],
                     sweep_cfg: SweepConfig, sweep: SweepResult, calibration_ids: Sequence[str],
                     others: Sequence[str], progress: bool, cache: RunCache | None = None
                     ) -> dict[str, dict[str, Any]]:
    """Each read-out's best cell, chosen on the calibration cases and scored on the others:
    the deployed one (``sweep.readout``) and every one of ``sweep.compare_readouts``."""
    def row(result: SweepResult) -> dict[str, Any]:
        return {k: result.best[k] for k in ("t", "t_index", "layer", "miou_mask", "miou_box")}

    rows = {sweep_cfg.readout: {**row(sweep), "deployed": True}}
    for readout in dict.fromkeys(others):
        if readout == sweep_cfg.readout:
            continue
        try:
            other = run_sweep(pipe, cases, replace(sweep_cfg, readout=readout, bootstrap=0),
                              progress=progress, calibration_ids=calibration_ids,
                              store=stage(cache, f"sweep/{readout}"))
        except Exception as err:
            raise EvalError("sweep", f"read-out {readout}: {err.__class__.__name__}: {err}"
                            ) from err
        rows[readout] = {**row(other), "deployed": False}
    return rows


def export_path(cfg: DictConfig) -> Path:
    """The export (or Lightning checkpoint) ``ckpt_path`` names; the shipped one when null."""
    return Path(cfg.ckpt_path) if cfg.ckpt_path else DEFAULT_EXPORT


@contextlib.contextmanager
def tracker_stage(report: Path | None = None) -> Iterator[None]:
    """A failure to log to wandb fails the evaluation, as a stage named after it."""
    try:
        yield
    except TrackerError as err:
        raise EvalError(err.stage, err.detail, report) from err


def open_tracker(cfg: DictConfig, run_dir: Path) -> Any | None:
    """The wandb run to log into with ``logger=wandb`` (evaluation/tracker.py); else None."""
    with tracker_stage():
        try:
            node = wandb_settings(OmegaConf.to_container(cfg.get("logger"), resolve=True)
                                  if cfg.get("logger") else None)
            if node is None:
                return None
            ckpt = export_path(cfg)
            settings = {k: v for k, v in OmegaConf.to_container(cfg, resolve=True).items()
                        if k != "logger"}
            config = {"export": str(ckpt.resolve()), "training_data": read_training_data(ckpt),
                      "settings": settings}
        except Exception as err:
            raise TrackerError("wandb init", f"{err.__class__.__name__}: {err}") from err
        return start_eval_run(node, ckpt, run_dir, config)


def close_tracker(run: Any, run_dir: Path, report: Path | None,
                  error: BaseException | None) -> None:
    """Log the report (when one was written) and finish the run, exit code 1 on ``error``.

    A failure to log is raised as an :class:`EvalError`; when the evaluation had already
    failed, it is logged instead and the evaluation's own error goes on.
    """
    failure, where = None, run_identity(run)["run_dir"]
    try:
        with tracker_stage(report):
            if report is not None:
                log_eval(run, json.loads(report.read_text()), run_dir)
    except EvalError as err:
        failure = err
    try:
        with tracker_stage(report):
            finish_eval_run(run, error or failure)
    except EvalError as err:
        failure = failure or err
    if failure is None:
        log.info("logged to wandb run %s in %s", run.id, where)
    elif error is None:
        raise failure
    else:
        log.error("%s (the evaluation had already failed: %s)", failure, error)


def evaluate(cfg: DictConfig, run_dir: Path) -> Path:
    """The whole evaluation; returns the path of report.json, raises :class:`EvalError`.

    With ``logger=wandb`` the run is opened first (a bad tracker setup fails before the sweep)
    and everything is logged into it at the end, also when a stage failed after report.json
    was written (the run then closes with exit code 1).
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    run = open_tracker(cfg, run_dir)
    if run is None:
        return run_evaluation(cfg, run_dir)
    try:
        path = run_evaluation(cfg, run_dir, tracker=run_identity(run))
    except BaseException as err:
        close_tracker(run, run_dir, err.report if isinstance(err, EvalError) else None, err)
        raise
    close_tracker(run, run_dir, path, None)
    return path


def run_evaluation(cfg: DictConfig, run_dir: Path, tracker: dict[str, Any] | None = None
                   ) -> Path:
    """Every stage of the evaluation into ``run_dir``; ``tracker`` (the wandb run's identity)
    goes into the report's meta."""
    if cfg.get("num_threads"):
        torch.set_num_threads(int(cfg.num_threads))
    device = resolve_device(cfg.device)
    ckpt = export_path(cfg)
    # a .ckpt (or an older-layout export) is exported into the run
    export_dir = as_pipeline_folder(ckpt, run_dir / "export")
    pipe = load_pipeline(export_dir, device)
    bench_dir = prepare_benchmark(cfg, pipe, run_dir)
    cases, skipped = load_benchmark(bench_dir)
    for case_id, reason in skipped:
        log.warning("skipped case %s: %s", case_id, reason)
    if not cases:
        listed = "; ".join(f"{i}: {r}" for i, r in skipped) or "no case folder"
        raise EvalError("load", f"no case of {bench_dir} could be evaluated ({listed})")
    verdict = provenance(cfg, ckpt, cases)
    try:
        cache = open_cache(cfg, run_dir, export_dir, bench_dir, str(device))
    except CacheMismatch as err:
        raise EvalError("cache", str(err)) from err
    sweepable, calibration_ids, report_cases, held_out = split_cases(cases, cfg)
    report_ids = [c.id for c in report_cases]
    try:
        external = load_external_methods(
            OmegaConf.to_container(cfg.external_methods, resolve=True)
            if cfg.get("external_methods") else None, report_cases, METHODS)
    except ExternalError as err:
        raise EvalError("external", str(err)) from err

    chosen = AlignmentConfig(**OmegaConf.to_container(cfg.alignment, resolve=True))
    correspondence = sweep = baselines = None
    figure_paths: dict[str, str] = {}
    if sweepable:
        sweep_cfg = SweepConfig(**{**OmegaConf.to_container(cfg.sweep, resolve=True),
                                   "threshold": chosen.threshold})
        try:
            sweep = run_sweep(pipe, sweepable, sweep_cfg, progress=cfg.progress,
                              calibration_ids=calibration_ids,
                              store=stage(cache, f"sweep/{sweep_cfg.readout}"))
            baselines = run_baselines(sweepable, match_config(cfg.baselines), cfg.progress)
        except Exception as err:
            raise EvalError("sweep", f"{len(sweepable)} case(s): {err.__class__.__name__}: "
                            f"{err}") from err
        chosen.timestep, chosen.block = sweep.best["t"], sweep.best["layer"]
        chosen.readout, chosen.num_steps = sweep_cfg.readout, sweep_cfg.num_timesteps
        scored_ids = sweep.split["report_ids"]
        readouts = compare_readouts(pipe, sweepable, sweep_cfg, sweep, calibration_ids,
                                    list(cfg.sweep.get("compare_readouts") or []), cfg.progress,
                                    cache)
        correspondence = {**sweep.to_dict(), "readouts": readouts,
                          "baselines": baseline_means(baselines, scored_ids),
                          "baselines_all_cases": baselines["scores"],
                          "feature_matching": baselines["feature_matching"],
                          "by_category": by_category(sweep, baselines, cases, scored_ids)}
        fig_dir = run_dir / "figures"
        curves = sweep.curves()
        on_calibration = {**sweep.best, **sweep.best["calibration"]}
        figure_paths = {
            "timestep_curve": figures.timestep_curve(curves["timestep"],
                                                     fig_dir / "timestep_curve.png",
                                                     baselines["scores"]),
            "layer_curve": figures.layer_curve(curves["layer"], sweep.blocks,
                                               fig_dir / "layer_curve.png", baselines["scores"]),
            "heatmap_mask": figures.table_heatmap(
                sweep.calibration_table("mask"), on_calibration, sweep.blocks,
                fig_dir / "heatmap_mask.png", "mask mIoU on the calibration cases"),
            "heatmap_box": figures.table_heatmap(
                sweep.calibration_table("box"), on_calibration, sweep.blocks,
                fig_dir / "heatmap_box.png", "box mIoU on the calibration cases"),
        }
    else:
        log.warning("no case has a reference_mask: no sweep; alignment stays at %s", chosen)

    seed = int(cfg.refinement.get("seed", cfg.seed))
    alignments = compute_alignments(pipe, chosen, report_cases, seed, cfg.progress,
                                    stage(cache, "alignment"))
    if correspondence is not None:
        deployed = list(alignment_scores(alignments, report_cases).values())
        correspondence["deployed"] = {**_mean_pair(deployed), "num_cases": len(deployed)}

    refine_cfg = cfg.copy()
    OmegaConf.update(refine_cfg, "refinement.alignment", asdict(chosen), merge=True)
    result, status = run_refinement(report_cases, pipe, alignments, refine_cfg, cache,
                                    external)
    outputs = result.pop("outputs", {}) if result else {}
    try:
        gain = run_denoising_gain(pipe, report_cases, cfg.get("denoising_gain"),
                                  cfg.progress)
    except Exception as err:
        raise EvalError("denoising_gain", f"{err.__class__.__name__}: {err}") from err
    if gain is not None:
        figure_paths["denoising_gain"] = figures.denoising_gain_curve(
            gain, run_dir / "figures" / "denoising_gain.png")
    rows = qualitative_rows(report_cases, alignments, outputs, int(cfg.qualitative.num_cases))
    if rows:
        figure_paths["qualitative"] = figures.qualitative_grid(rows, run_dir / "qualitative.png")

    note = (f"calibrated by eval.py on {len(calibration_ids)} calibration case(s) of "
            f"{bench_dir}" + ("" if held_out else " (in-sample: no held-out split)")
            if sweep else "no reference_mask in the benchmark: defaults, not calibrated")
    write_alignment_yaml(chosen, run_dir / ALIGNMENT_FILE, note)
    if cfg.get("write_alignment_to_export"):
        if sweep is None:  # defaults are not a calibration: never overwrite one with them
            log.warning("write_alignment_to_export: nothing calibrated (no case has a "
                        "reference_mask), %s left as it is", export_dir)
        else:
            path = write_alignment(export_dir, chosen, note)
            log.info("calibrated read-out written to %s", path)
    report = {
        "schema_version": SCHEMA_VERSION,
        "warnings": report_warnings(verdict, held_out, sweep, status)
        + [w for e in external.values() if (w := e.warning(len(report_cases)))],
        "meta": {"checkpoint": str(ckpt), "bench_dir": str(bench_dir),
                 "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
                 "device": str(device),
                 "date": datetime.datetime.now().isoformat(timespec="seconds"),
                 "versions": versions(), "run_dir": str(run_dir), "tracker": tracker,
                 "cache": cache_summary(cache)},
        "data_provenance": verdict,
        "counts": {
            "cases_found": len(cases) + len(skipped), "cases_loaded": len(cases),
            "skipped": len(skipped), "with_reference_mask": len(sweepable),
            "without_reference_mask": len(cases) - len(sweepable),
            "with_target": sum(c.target is not None for c in cases),
            "sweep_cases": len(sweep.case_ids) if sweep else 0,
            "calibration_cases": len(calibration_ids) if held_out else 0,
            "report_cases": len(report_ids),
            "feature_matching_failures":
                baselines["feature_matching"]["failures"] if baselines else 0,
        },
        "skipped": [{"id": i, "reason": r} for i, r in skipped],
        "correspondence": correspondence,
        "refinement": _jsonable_metrics(result.get("methods", {})) if result else {},
        "refinement_by_category": _jsonable_metrics(result.get("by_category", {}))
        if result else {},
        "refinement_counts": _jsonable_metrics(result.get("counts", {})) if result else {},
        "refinement_per_case": _jsonable_metrics(result.get("per_case", {})) if result else {},
        "refinement_status": status,
        "external_methods": {name: e.summary() for name, e in external.items()},
        "refinement_paired": paired_with_ours(
            result["per_case"], [*external, *result["baseline_methods"]],
            list(cfg.refinement.methods))
        if result and (external or result["baseline_methods"]) else {},
        "denoising_gain": gain,
        "alignment": asdict(chosen),
        "figures": {k: str(Path(v).relative_to(run_dir)) for k, v in figure_paths.items()},
    }
    path = write_report_json(report, run_dir / "report.json")
    write_report_md(report, run_dir / "report.md")
    if status.get("error"):
        raise EvalError("refinement", status["error"], path)
    return path


@hydra.main(version_base="1.3", config_path="configs", config_name="eval")
def main(cfg: DictConfig) -> None:
    log.info("config:\n%s", OmegaConf.to_yaml(cfg, resolve=False))
    try:
        path = evaluate(cfg, Path(cfg.paths.output_dir))
    except EvalError as err:
        log.error("%s", err)
        print(str(err), file=sys.stderr)
        if err.report is not None:
            print(f"report (incomplete): {err.report}", file=sys.stderr)
        sys.exit(1)
    print(f"report: {path}")


if __name__ == "__main__":
    main()
