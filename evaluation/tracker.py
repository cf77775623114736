"""The experiment-tracker (wandb) run behind an export, and eval.py's logging into it.

Training side: train.py with a ``WandbLogger`` writes the run's identity (id, project, entity,
mode, local folder, next history step) to ``<export>/tracker.yaml``
(:func:`write_tracker_record`), next to ``training_data.yaml``.

Eval side: ``python eval.py logger=wandb`` composes the same ``configs/logger/wandb.yaml`` the
training uses. :func:`start_eval_run` resumes the export's recorded run (``resume="allow"``)
so the evaluation lands next to the training curves; an export without a record gets a new
run (``job_type=eval``) whose config names the export and its training-data provenance.
:func:`log_eval` logs what eval.py already made: figures/ and qualitative.png as images, the
report's tables (the rows report.md prints, from evaluation/report.py) as ``wandb.Table``,
the chosen (t*, l*) and headline numbers as summary values, and report.json / report.md /
alignment.yaml as run files. Everything is under ``eval/``.

Offline (``WANDB_MODE=offline`` or ``logger.wandb.offline=true``) the run is written to
``<eval run>/wandb/offline-run-*-<id>``; ``wandb sync`` uploads it later, into the training
run when the id is that run's. A failure to log raises :class:`TrackerError` naming the
stage: an evaluation never silently misses its tracker entry.
"""

from __future__ import annotations

import contextlib
import math
import shutil
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from evaluation.report import (
    TableRows,
    denoising_gain_table,
    headline_table,
    in_sample_table,
    metric_table,
    paired_table,
    readout_table,
    topk_table,
)

TRACKER = "tracker.yaml"
PREFIX = "eval"
RUN_FILES = ("report.json", "report.md", "alignment.yaml")
# WandbLogger arguments that are not wandb.init's (or that eval.py sets itself)
NOT_INIT_ARGS = ("_target_", "save_dir", "dir", "offline", "log_model", "prefix",
                 "checkpoint_name", "experiment", "version", "id", "anonymous")


class TrackerError(RuntimeError):
    """Logging to wandb failed; ``stage`` is ``wandb init``, ``wandb log`` or ``wandb finish``."""

    def __init__(self, stage: str, message: str) -> None:
        super().__init__(f"{stage} failed: {message}")
        self.stage, self.detail = stage, message


@contextlib.contextmanager
def _stage(name: str, what: str) -> Iterator[None]:
    try:
        yield
    except TrackerError:
        raise
    except Exception as err:
        raise TrackerError(name, f"{what}: {err.__class__.__name__}: {err}") from err


def run_identity(run: Any) -> dict[str, Any]:
    """What finds a wandb run again: online by entity/project/id, offline by its folder."""
    offline = bool(run.offline)
    return {"id": run.id, "project": run.project, "entity": run.entity or None,
            "name": run.name, "mode": "offline" if offline else "online",
            "run_dir": str(Path(run.dir).resolve().parent),
            "url": None if offline else run.url}


def write_tracker_record(loggers: Sequence[Any], export_dir: str | Path) -> Path | None:
    """Write ``tracker.yaml`` when one of ``loggers`` is a WandbLogger; None otherwise."""
    from pytorch_lightning.loggers import WandbLogger

    runs = [lg.experiment for lg in loggers if isinstance(lg, WandbLogger)]
    if not runs:
        return None
    path = Path(export_dir) / TRACKER
    record = {**run_identity(runs[0]), "next_step": int(runs[0].step)}
    body = OmegaConf.to_yaml(OmegaConf.create({"wandb": record}))
    path.write_text("# written by train.py: the wandb run that trained this export; "
                    "eval.py logger=wandb logs into it\n" + body)
    return path


def read_tracker_record(export_dir: str | Path) -> dict[str, Any] | None:
    """The export's recorded wandb run, or None (no record, or a .ckpt path)."""
    path = Path(export_dir) / TRACKER
    if not path.is_file():
        return None
    record = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    run = record.get("wandb") if isinstance(record, dict) else None
    if not isinstance(run, dict) or not run.get("id") or not run.get("project"):
        raise ValueError(f"{path}: expected wandb: {{id, project, ...}}")
    return run


def wandb_settings(logger_cfg: Mapping[str, Any] | None) -> Mapping[str, Any] | None:
    """eval.py's ``logger`` config -> its wandb node; None when no logger is asked for.

    Only wandb is supported: any other logger entry is refused rather than ignored.
    """
    if not logger_cfg:
        return None
    others = [name for name in logger_cfg if name != "wandb"]
    if others:
        raise ValueError(f"eval.py logs to wandb only (logger=wandb); got logger entries "
                         f"{others}")
    return logger_cfg.get("wandb")


def init_kwargs(node: Mapping[str, Any], record: Mapping[str, Any] | None,
                run_dir: Path) -> dict[str, Any]:
    """wandb.init arguments: the logger node's, then the run to log into.

    An explicit ``id`` (or WandbLogger's ``version``) in the node wins over the export's
    record; either is resumed (``resume="allow"``) under its own project and entity, and
    keeps its name. Without either, a new ``job_type=eval`` run. The folder is the eval run's.
    """
    kwargs = {k: v for k, v in node.items() if k not in NOT_INIT_ARGS and v is not None}
    kwargs["dir"] = str(run_dir)
    if node.get("offline"):
        kwargs["mode"] = "offline"
    explicit = node.get("id") or node.get("version")
    if not explicit and not record:
        return {**kwargs, "job_type": "eval"}
    kwargs.pop("name", None)  # a resumed run keeps its name
    if explicit:
        return {**kwargs, "id": str(explicit), "resume": "allow"}
    return {**kwargs, "id": record["id"], "project": record["project"],
            "entity": record.get("entity"), "resume": "allow"}


def start_eval_run(node: Mapping[str, Any], export_dir: Path, run_dir: Path,
                   config: Mapping[str, Any]) -> Any:
    """Open the run eval.py logs into (see :func:`init_kwargs`), its config under ``eval``."""
    with _stage("wandb init", f"reading {Path(export_dir) / TRACKER}"):
        record = read_tracker_record(export_dir)
    kwargs = init_kwargs(node, record, run_dir)
    source = "logger.wandb.id" if node.get("id") or node.get("version") else TRACKER
    which = f"resuming run {kwargs['id']} ({source})" if "id" in kwargs else "new run"
    with _stage("wandb init", which):
        import wandb

        run = wandb.init(**kwargs)
        run.config.update({PREFIX: {**config, "tracker_record": record}},
                          allow_val_change=True)
    return run


def wandb_table(rows: TableRows) -> Any:
    """A wandb.Table of report rows; in a numeric column a string (a metric's note, an empty
    cell) becomes null and its text moves to a ``notes`` column (wandb columns have one type)."""
    import wandb

    header, data = rows
    numeric = [any(isinstance(r[i], int | float) and not isinstance(r[i], bool) for r in data)
               for i in range(len(header))]
    out, notes = [], []
    for row in data:
        cells, note = [], []
        for value, col, is_numeric in zip(row, header, numeric, strict=True):
            if is_numeric and isinstance(value, str):
                cells.append(None)
                if value:
                    note.append(f"{col}: {value}")
            else:
                cells.append(value)
        out.append(cells)
        notes.append("; ".join(note))
    if any(notes):
        header, out = [*header, "notes"], [[*r, n] for r, n in zip(out, notes, strict=True)]
    return wandb.Table(columns=list(header), data=out)


def sweep_cells(corr: Mapping[str, Any]) -> TableRows:
    """The T x L sweep in long form (one row per cell), all swept cases: the heat map's data."""
    mask, box = corr["table"]["mask"], corr["table"]["box"]
    return (["t_index", "t", "block", "miou_mask", "miou_box"],
            [[ti, t, layer, mask[ti][li], box[ti][li]]
             for ti, t in enumerate(corr["timesteps"]) for li, layer in enumerate(corr["layers"])])


def report_tables(report: Mapping[str, Any]) -> dict[str, TableRows]:
    """Every table of report.md (same rows) plus the sweep's cells, by log key."""
    tables: dict[str, TableRows] = {}
    corr = report.get("correspondence")
    if corr:
        tables.update({"correspondence": headline_table(corr),
                       "correspondence_in_sample": in_sample_table(corr),
                       "topk": topk_table(corr), "sweep_cells": sweep_cells(corr)})
        if corr.get("readouts"):
            tables["readouts"] = readout_table(corr)
    if report.get("refinement"):
        tables["refinement"] = metric_table(report["refinement"])
    for name, node in (report.get("refinement_paired") or {}).items():
        tables[f"paired/{name}"] = paired_table(node)
    by_cat = report.get("refinement_by_category") or {}
    if by_cat:
        parts = {cat: metric_table(methods) for cat, methods in by_cat.items()}
        header: list[str] = []
        for cols, _ in parts.values():
            header += [c for c in cols if c not in header]
        tables["refinement_by_category"] = (
            ["category", *header],
            [[cat, *(dict(zip(cols, row, strict=True)).get(c, float("nan")) for c in header)]
             for cat, (cols, rows) in parts.items() for row in rows])
    for ref, node in ((report.get("denoising_gain") or {}).get("references") or {}).items():
        if node["rows"]:
            tables[f"denoising_gain_{ref}"] = denoising_gain_table(node)
    return tables


def summary_values(report: Mapping[str, Any]) -> dict[str, Any]:
    """The chosen (t*, l*) and the headline numbers, flat under ``eval/``."""
    align, counts = report["alignment"], report["counts"]
    out: dict[str, Any] = {"t_star": align["timestep"], "block_star": align["block"],
                           "readout": align.get("readout"),
                           "data_provenance": report["data_provenance"]["status"],
                           "warnings": len(report["warnings"]),
                           "run_dir": report["meta"].get("run_dir"),
                           **{f"counts/{k}": v for k, v in counts.items()}}
    corr = report.get("correspondence")
    out["calibrated"] = corr is not None
    if corr:
        best = corr["best"]
        out.update({"t_star_index": best["t_index"], "held_out": corr["split"]["held_out"],
                    "miou_mask": best["miou_mask"], "miou_box": best["miou_box"],
                    "calibration/miou_mask": best["calibration"]["miou_mask"],
                    "calibration/miou_box": best["calibration"]["miou_box"]})
        if corr.get("deployed"):
            out.update({"deployed/miou_mask": corr["deployed"]["miou_mask"],
                        "deployed/miou_box": corr["deployed"]["miou_box"]})
        for name, pair in corr["baselines"].items():
            out.update({f"baseline/{name}/{k}": v for k, v in pair.items()})
        if corr.get("stability"):
            out["stability/chosen_win_frequency"] = corr["stability"]["chosen_win_frequency"]
    for method, metrics in (report.get("refinement") or {}).items():
        out.update({f"refinement/{method}/{m}": v for m, v in metrics.items()
                    if isinstance(v, int | float) and not isinstance(v, bool)
                    and not math.isnan(v)})
    for ref, node in ((report.get("denoising_gain") or {}).get("references") or {}).items():
        out.update({f"denoising_gain/{ref}/{m}_t{r['t']}": r[f"{m}_gain"]
                    for r in node["rows"] for m in ("psnr", "gms")})
    return {f"{PREFIX}/{k}": v for k, v in out.items()}


def history_step(run: Any) -> int:
    """The step eval's history row goes to: after the training's rows. Online, a resumed run
    already continues there; offline it restarts at 0, and a row at step 0 would sort before
    (and, synced into the existing run, could be refused behind) the training's rows."""
    record = run.config.get(PREFIX, {}).get("tracker_record") or {}
    return max(int(run.step), int(record.get("next_step") or 0))


def log_eval(run: Any, report: Mapping[str, Any], run_dir: Path) -> None:
    """Log eval.py's figures, tables, summary values and report files into ``run``."""
    import wandb

    with _stage("wandb log", "figures"):
        images = {f"{PREFIX}/{name}": wandb.Image(str(run_dir / rel), caption=name)
                  for name, rel in report["figures"].items()}
    with _stage("wandb log", "tables"):
        tables = {f"{PREFIX}/{name}": wandb_table(rows)
                  for name, rows in report_tables(report).items()}
    with _stage("wandb log", "history"):
        run.log({**images, **tables}, step=history_step(run))
    with _stage("wandb log", "summary"):
        run.summary.update(summary_values(report))
    with _stage("wandb log", "run files"):  # copies: the offline run folder stands alone
        for name in RUN_FILES:
            if (run_dir / name).is_file():
                copy = shutil.copy2(run_dir / name, Path(run.dir) / name)
                run.save(str(copy), base_path=run.dir, policy="now")


def finish_eval_run(run: Any, error: BaseException | None = None) -> None:
    """Close the run: exit code 1 and ``eval/error`` when the evaluation failed."""
    with _stage("wandb finish", f"run {run.id}"):
        if error is not None:
            run.summary[f"{PREFIX}/error"] = str(error)
        run.finish(exit_code=0 if error is None else 1)
