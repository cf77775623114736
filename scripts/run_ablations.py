"""The paper's ablations in miniature, end to end, one command.

  python scripts/run_ablations.py                  # CPU preset: 5 trainings x 3 seeds
  python scripts/run_ablations.py preset=gpu       # the same on one GPU, at real length
  python scripts/run_ablations.py preset=smoke seeds=[1,2] only=[mixed] out_dir=/tmp/abl \
      results_dir=/tmp/abl/table

Config: configs/ablations/run.yaml (+ preset/). For every training x seed: ``python train.py``
in its own folder (``out_dir/<training>/seed<k>``), then ``python eval.py`` of its export on
ONE benchmark, generated once with a seed that is no training seed. Then one table (markdown,
JSON, CSV) with the mean and the 95% t-interval over seeds per row, written to
``results_dir`` with its inputs (every report.json, the values per run).

Resumable: a (training, seed) whose export exists is not trained again, an evaluation whose
report.json exists is not run again, provided the folder was made by the same command
(refused otherwise). A failed run stops everything with a non-zero exit naming the training,
seed and log file.
"""

from __future__ import annotations

import csv
import datetime
import json
import math
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see train.py
REPO = Path(__file__).resolve().parents[1]

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf

from evaluation.report import read_report
from models.config import compose_config
from models.export import COMPONENT_WEIGHTS, is_pipeline_folder

# --- what the table reads from eval.py's report.json (docs/report_schema.md): one place ----
# correspondence columns, filled for rows whose method deploys the map (MAP_METHOD)
CORRESPONDENCE_KEYS: dict[str, tuple[str, ...]] = {
    "miou_mask_calibrated": ("correspondence", "best", "miou_mask"),
    "miou_box_calibrated": ("correspondence", "best", "miou_box"),
    "miou_mask_in_sample": ("correspondence", "in_sample_best", "miou_mask"),
    "miou_box_in_sample": ("correspondence", "in_sample_best", "miou_box"),
}
BASELINES_KEY = ("correspondence", "baselines")  # -> {name: {miou_mask, miou_box}}, report cases
REFINEMENT_KEY = ("refinement",)  # -> {method: {metric: value}}
REFINEMENT_STATUS_KEY = ("refinement_status",)  # -> {run: bool, reason}
REQUIRED_METRICS = ("psnr", "ssim", "l1")  # further numeric metrics in every report are added
MAP_METHOD = "aligned_crop"
COLUMN_TITLES = {
    "miou_mask_calibrated": "mIoU mask, calibrated cell",
    "miou_box_calibrated": "mIoU box, calibrated cell",
    "miou_mask_in_sample": "mIoU mask, in-sample best cell",
    "miou_box_in_sample": "mIoU box, in-sample best cell",
    "psnr": "PSNR (box)", "ssim": "SSIM (box)", "l1": "L1 (mask)",
}
COLUMN_NOTES = {
    "miou_mask_calibrated": "(t*, l*) chosen on the benchmark's calibration half, scored on "
                            "its report half (the headline)",
    "miou_mask_in_sample": "the best cell of the sweep chosen and scored on all cases "
                           "(optimistic)",
}

CONFIG_DIR = REPO / "configs" / "ablations"
STAMP = "ablation.json"  # in every folder this script makes: the command that made it


class AblationError(RuntimeError):
    """A failed or refused step; the message names the training, seed and file."""


@dataclass
class Job:
    training: str
    seed: int
    train_overrides: list[str]
    methods: list[str]
    run_dir: Path

    @property
    def label(self) -> str:
        return f"{self.training} seed {self.seed}"

    @property
    def export_dir(self) -> Path:
        return self.run_dir / "export"

    @property
    def eval_dir(self) -> Path:
        return self.run_dir / "eval"


# ----------------------------------------------------------------------------- statistics
def t_quantile(p: float, df: int) -> float:
    """Student-t quantile (no scipy here): the root of the CDF through the incomplete beta."""
    import mpmath

    def upper_tail(t: float) -> Any:  # P(T > t) - (1 - p), for t > 0
        return mpmath.betainc(df / 2, 0.5, 0, df / (df + t * t), regularized=True) / 2 - (1 - p)

    return float(mpmath.findroot(upper_tail, (mpmath.mpf("1e-6"), mpmath.mpf(1000)),
                                 solver="illinois"))


def t_interval(values: Sequence[float], confidence: float = 0.95) -> dict[str, Any]:
    """Mean and the half-width of the t-interval over ``values`` (None below 2 values)."""
    n = len(values)
    mean = math.fsum(values) / n
    if n < 2:
        return {"n": n, "mean": mean, "half_width": None, "values": list(values)}
    sd = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1))
    half = t_quantile(0.5 + confidence / 2, n - 1) * sd / math.sqrt(n)
    return {"n": n, "mean": mean, "half_width": half, "values": list(values)}


# ----------------------------------------------------------------------------- config
def load_config(overrides: Sequence[str]) -> DictConfig:
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose("run", overrides=list(overrides))


def compose_train(overrides: Sequence[str]) -> DictConfig:
    return compose_config(overrides)


def rows_of(cfg: DictConfig) -> list[DictConfig]:
    """The table's rows (those of the trainings run, with ``only``)."""
    return [row for row in cfg.rows if cfg.only is None or row.training in cfg.only]


def plan(cfg: DictConfig) -> list[Job]:
    """Every (training, seed) with its train.py overrides and the methods its rows need."""
    from evaluation.refinement import METHODS

    trainings = OmegaConf.to_container(cfg.trainings, resolve=True)
    if cfg.only is not None:
        unknown = set(cfg.only) - set(trainings)
        if unknown:
            raise AblationError(f"only={list(cfg.only)}: unknown {sorted(unknown)}")
        trainings = {k: v for k, v in trainings.items() if k in cfg.only}
    methods: dict[str, list[str]] = {name: [] for name in trainings}
    for row in rows_of(cfg):
        if row.training not in trainings:
            raise AblationError(f"row '{row.name}': unknown training '{row.training}' "
                                f"(trainings: {sorted(trainings)})")
        if row.method not in METHODS:
            raise AblationError(f"row '{row.name}': unknown method '{row.method}' "
                                f"(evaluation/refinement.py: {list(METHODS)})")
        if row.method not in methods[row.training]:
            methods[row.training].append(row.method)
    if not rows_of(cfg):
        raise AblationError(f"no table row names one of the trainings {sorted(trainings)}")
    preset = [*cfg.preset.train, *cfg.extra_train]
    return [Job(name, int(seed), [*preset, *overrides, f"seed={seed}"], methods[name],
                Path(cfg.out_dir) / name / f"seed{seed}")
            for name, overrides in trainings.items() for seed in cfg.seeds]


def check_jobs(cfg: DictConfig, jobs: Sequence[Job]) -> tuple[int, int]:
    """Compose every training's config now (a typo fails here, not an hour in); refuse a
    benchmark seed that seeds any training or validation data. Returns the image sizes."""
    sizes = set()
    for job in jobs:
        try:
            train_cfg = compose_train(job.train_overrides)
        except Exception as err:
            raise AblationError(f"{job.label}: train.py config does not compose: {err}") from err
        data = train_cfg.data
        used = {int(data.train_seed), int(data.val_seed)}
        if int(cfg.bench_seed) in used:
            raise AblationError(
                f"bench_seed={cfg.bench_seed} seeds the data of {job.label} "
                f"(train_seed/val_seed {sorted(used)}): the benchmark would repeat its items")
        sizes.add((int(data.image_size), int(data.reference_size)))
    if len(sizes) != 1:
        raise AblationError(f"trainings disagree on (image_size, reference_size): {sizes}")
    return sizes.pop()


# ----------------------------------------------------------------------------- running
def _stamp_matches(folder: Path, stamp: dict[str, Any], what: str) -> bool:
    """Whether ``folder`` was made by ``stamp``'s command; refuses a folder made otherwise."""
    path = folder / STAMP
    if not folder.exists():
        return False
    if not path.is_file():
        raise AblationError(f"{what}: {folder} exists and was not made by this script; "
                            f"delete it or choose another out_dir")
    found = json.loads(path.read_text())
    if found != stamp:
        raise AblationError(f"{what}: {folder} was made by another command:\n  {found}\n"
                            f"now:\n  {stamp}\ndelete it or choose another out_dir")
    return True


def run_logged(command: list[str], log: Path, what: str) -> None:
    """Run ``command`` in the repo with its output in ``log``; a failure names ``what``."""
    with log.open("w") as out:
        done = subprocess.run(command, cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
                              check=False)
    if done.returncode != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-25:])
        raise AblationError(f"{what} failed (exit {done.returncode}); log: {log}\n{tail}")


def ensure_benchmark(cfg: DictConfig, image_size: int, reference_size: int) -> Path:
    from data.benchmark import write_synthetic_benchmark

    bench = Path(cfg.out_dir) / "benchmark"
    stamp = {"seed": int(cfg.bench_seed), "num": int(cfg.preset.bench_cases),
             "image_size": image_size, "reference_size": reference_size}
    if _stamp_matches(bench, stamp, "benchmark"):
        print(f"benchmark: {bench} (exists: {stamp['num']} cases, seed {stamp['seed']})",
              flush=True)
        return bench
    print(f"benchmark: writing {stamp['num']} cases (seed {stamp['seed']}) to {bench}",
          flush=True)
    write_synthetic_benchmark(bench, stamp["num"], stamp["seed"], image_size, reference_size)
    (bench / STAMP).write_text(json.dumps(stamp, indent=1))
    return bench


def _train(job: Job, tag: str) -> None:
    command = ["train.py", *job.train_overrides, f"hydra.run.dir={job.run_dir}"]
    stamp = {"command": command}
    if _stamp_matches(job.run_dir, stamp, job.label):
        if is_pipeline_folder(job.export_dir):
            print(f"{tag} {job.label}: trained already ({job.export_dir})", flush=True)
            return
        print(f"{tag} {job.label}: unfinished folder, training again", flush=True)
        shutil.rmtree(job.run_dir)
    job.run_dir.mkdir(parents=True)
    (job.run_dir / STAMP).write_text(json.dumps(stamp, indent=1))
    print(f"{tag} {job.label}: training ...", flush=True)
    start = time.monotonic()
    run_logged([sys.executable, *command], job.run_dir / "train.out", f"training of {job.label}")
    if not is_pipeline_folder(job.export_dir):
        raise AblationError(f"training of {job.label} wrote no export to {job.export_dir}")
    print(f"{tag} {job.label}: trained in {time.monotonic() - start:.0f} s", flush=True)


def _evaluate(job: Job, bench: Path, eval_overrides: Sequence[str], tag: str) -> Path:
    methods = ",".join(job.methods)
    command = ["eval.py", f"bench_dir={bench}", f"ckpt_path={job.export_dir}",
               f"refinement.methods=[{methods}]", *eval_overrides,
               f"hydra.run.dir={job.eval_dir}"]
    stamp = {"command": command, "export": _export_id(job.export_dir)}
    report = job.eval_dir / "report.json"
    if _stamp_matches(job.eval_dir, stamp, job.label):
        if report.is_file():
            print(f"{tag} {job.label}: evaluated already ({report})", flush=True)
            return report
        shutil.rmtree(job.eval_dir)
    job.eval_dir.mkdir(parents=True)
    (job.eval_dir / STAMP).write_text(json.dumps(stamp, indent=1))
    print(f"{tag} {job.label}: evaluating ({methods}) ...", flush=True)
    start = time.monotonic()
    run_logged([sys.executable, *command], job.eval_dir / "eval.out",
               f"evaluation of {job.label}")
    if not report.is_file():
        raise AblationError(f"evaluation of {job.label} wrote no {report}")
    print(f"{tag} {job.label}: evaluated in {time.monotonic() - start:.0f} s", flush=True)
    return report


def _export_id(export_dir: Path) -> dict[str, Any]:
    """What identifies the evaluated weights (a retrained export invalidates its evaluation)."""
    weights = export_dir / "unet" / COMPONENT_WEIGHTS
    return {"size": weights.stat().st_size, "mtime_ns": weights.stat().st_mtime_ns}


# ----------------------------------------------------------------------------- the table
def _get(report: dict[str, Any], path: Sequence[str], where: str) -> Any:
    node: Any = report
    for key in path:
        if not isinstance(node, dict) or key not in node:
            raise AblationError(f"{where}: no '{'.'.join(path)}' in report.json (eval.py's "
                                f"schema changed? adjust the keys at the top of "
                                f"scripts/run_ablations.py)")
        node = node[key]
    return node


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def run_values(report: dict[str, Any], methods: Sequence[str], where: str
               ) -> dict[str, dict[str, float]]:
    """{method: {column: value}} of one evaluation; loud about anything missing."""
    status = _get(report, REFINEMENT_STATUS_KEY, where)
    if status.get("run") is not True:
        raise AblationError(f"{where}: the refinement evaluation did not run: "
                            f"{status.get('reason')}")
    refinement = _get(report, REFINEMENT_KEY, where)
    out = {}
    for method in methods:
        scores = dict(_get(refinement, (method,), where))
        for metric in REQUIRED_METRICS:
            if not _number(scores.get(metric)):
                raise AblationError(f"{where}: {method}.{metric} is {scores.get(metric)!r}, "
                                    f"not a number")
        values = {k: float(v) for k, v in scores.items() if _number(v)}
        if method == MAP_METHOD:
            values |= {name: float(_get(report, path, where))
                       for name, path in CORRESPONDENCE_KEYS.items()}
        out[method] = values
    return out


def correspondence_baselines(reports: dict[tuple[str, int], dict[str, Any]]
                             ) -> dict[str, dict[str, float]]:
    """The trivial maps' mIoU on the report cases: one benchmark, one split, so every
    evaluation must give the same numbers (refused otherwise: the runs are not comparable)."""
    found = {label: _get(report, BASELINES_KEY, label) for label, report in reports.items()}
    first_label, first = next(iter(found.items()))
    for label, baselines in found.items():
        if baselines != first:
            raise AblationError(f"{label[0]} seed {label[1]}: correspondence baselines differ "
                                f"from {first_label[0]} seed {first_label[1]}'s: the "
                                f"evaluations did not share one benchmark and split")
    return first


def summarize(cfg: DictConfig, values: dict[tuple[str, int], dict[str, dict[str, float]]]
              ) -> dict[str, Any]:
    """Rows of the table: per column the mean and 95% t-interval over seeds (None: n/a)."""
    seeds = [int(s) for s in cfg.seeds]
    used = [values[(row.training, s)][row.method] for row in rows_of(cfg) for s in seeds]
    extra = sorted(set.intersection(*(set(v) for v in used))
                   - set(REQUIRED_METRICS) - set(CORRESPONDENCE_KEYS))
    columns = [*CORRESPONDENCE_KEYS, *REQUIRED_METRICS, *extra]
    rows = []
    for row in rows_of(cfg):
        per_seed = [values[(row.training, s)][row.method] for s in seeds]
        cells = {}
        for column in columns:
            if column in CORRESPONDENCE_KEYS and row.method != MAP_METHOD:
                cells[column] = None
            else:
                cells[column] = t_interval([v[column] for v in per_seed])
        rows.append({"group": row.group, "name": row.name, "training": row.training,
                     "method": row.method, "cells": cells})
    return {"columns": columns, "rows": rows, "seeds": seeds}


def _cell(cell: dict[str, Any] | None) -> str:
    if cell is None:
        return "n/a"
    if cell["half_width"] is None:
        return f"{cell['mean']:.3f} (n={cell['n']})"
    return f"{cell['mean']:.3f} ± {cell['half_width']:.3f}"


def _finished(reports: Iterable[Path]) -> list[str]:
    """When the first and the last evaluation wrote their report: a resumed run rewrites the
    table long after the runs it summarises."""
    stamps = sorted(p.stat().st_mtime for p in reports)
    return [datetime.datetime.fromtimestamp(t).isoformat(timespec="seconds")
            for t in (stamps[0], stamps[-1])]


def write_tables(out: Path, table: dict[str, Any], meta: dict[str, Any]) -> Path:
    """table.md, table.json, table.csv in ``out``; returns the markdown's path."""
    out.mkdir(parents=True, exist_ok=True)
    columns = table["columns"]
    (out / "table.json").write_text(json.dumps({"meta": meta, **table}, indent=1))
    with (out / "table.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["group", "row", "training", "method", "column", "n", "mean",
                         "ci95_low", "ci95_high", "values"])
        for row in table["rows"]:
            for column in columns:
                cell = row["cells"][column]
                if cell is None:
                    continue
                half = cell["half_width"]
                low, high = ((cell["mean"] - half, cell["mean"] + half) if half is not None
                             else ("", ""))
                writer.writerow([row["group"], row["name"], row["training"], row["method"],
                                 column, cell["n"], cell["mean"], low, high,
                                 " ".join(f"{v:.6g}" for v in cell["values"])])
    titles = [COLUMN_TITLES.get(c, c) for c in columns]
    lines = [
        f"# Ablations ({meta['preset']} preset)", "",
        f"Mean ± half-width of the 95% t-interval over {len(table['seeds'])} training seeds "
        f"{table['seeds']}; every model evaluated on the same benchmark: {meta['bench_cases']} "
        f"synthetic cases, generator seed {meta['bench_seed']} (no training seed). "
        f"Command: `{meta['command']}`; evaluations written {meta['evaluations_finished'][0]} "
        f"to {meta['evaluations_finished'][1]}, table {meta['date']}.", "",
        "| group | row | training | inference | " + " | ".join(titles) + " |",
        "|---|---|---|---|" + "---|" * len(columns),
    ]
    for row in table["rows"]:
        cells = " | ".join(_cell(row["cells"][c]) for c in columns)
        lines.append(f"| {row['group']} | {row['name']} | {row['training']} | "
                     f"{row['method']} | {cells} |")
    if meta.get("correspondence_baselines"):
        lines += ["", "Correspondence baselines on the same report cases (no model; mask / box "
                  "mIoU): " + ", ".join(
                      f"{name.replace('_', ' ')} {v['miou_mask']:.3f} / {v['miou_box']:.3f}"
                      for name, v in meta["correspondence_baselines"].items()) + "."]
    lines += ["", f"mIoU: filled for `{MAP_METHOD}` rows (the method that deploys the map), "
              "n/a otherwise (a CLS-token model has no map). " +
              "; ".join(f"{COLUMN_TITLES[k]}: {v}" for k, v in COLUMN_NOTES.items()) +
              ". PSNR and SSIM inside the mask's box, L1 inside the mask (eval.py). Per-run "
              "values: `runs.csv`; every report: `reports/`."]
    path = out / "table.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def write_inputs(out: Path, jobs: Sequence[Job], reports: dict[tuple[str, int], Path],
                 values: dict[tuple[str, int], dict[str, dict[str, float]]]) -> None:
    """Copies of every report.json and one CSV line per (training, seed, method)."""
    (out / "reports").mkdir(parents=True, exist_ok=True)
    for (training, seed), report in reports.items():
        shutil.copyfile(report, out / "reports" / f"{training}_seed{seed}.json")
    columns = sorted({c for v in values.values() for m in v.values() for c in m})
    with (out / "runs.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["training", "seed", "method", *columns])
        for job in jobs:
            for method, scores in values[(job.training, job.seed)].items():
                writer.writerow([job.training, job.seed, method,
                                 *(scores.get(c, "") for c in columns)])


# ----------------------------------------------------------------------------- main
def run(cfg: DictConfig, command: str) -> Path:
    jobs = plan(cfg)
    image_size, reference_size = check_jobs(cfg, jobs)
    bench = ensure_benchmark(cfg, image_size, reference_size)
    reports, values, parsed = {}, {}, {}
    for i, job in enumerate(jobs, 1):
        tag = f"[{i}/{len(jobs)}]"
        _train(job, tag)
        report = _evaluate(job, bench, [*cfg.preset.eval, *cfg.extra_eval], tag)
        key = (job.training, job.seed)
        reports[key], parsed[key] = report, read_report(report)  # today's method names
        values[key] = run_values(parsed[key], job.methods, f"{job.label} ({report})")
    table = summarize(cfg, values)
    meta = {"preset": cfg.preset.name, "command": command, "bench_seed": int(cfg.bench_seed),
            "bench_cases": int(cfg.preset.bench_cases), "bench_dir": str(bench),
            "correspondence_baselines": correspondence_baselines(parsed),
            "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "evaluations_finished": _finished(reports.values()),
            "config": OmegaConf.to_container(cfg, resolve=True)}
    out = Path(cfg.results_dir)
    write_inputs(out, jobs, reports, values)
    return write_tables(out, table, meta)


def main(argv: Sequence[str] | None = None) -> None:
    overrides = list(sys.argv[1:] if argv is None else argv)
    cfg = load_config(overrides)
    command = " ".join(["python scripts/run_ablations.py", *overrides])
    trainings = list(cfg.only if cfg.only is not None else cfg.trainings)
    print(f"ablations: preset {cfg.preset.name}, trainings {trainings} x seeds "
          f"{list(cfg.seeds)}; runs in {cfg.out_dir}", flush=True)
    try:
        path = run(cfg, command)
    except AblationError as err:
        raise SystemExit(f"run_ablations: {err}") from err
    print(f"table: {path}")


if __name__ == "__main__":
    main()
