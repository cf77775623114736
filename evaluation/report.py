"""report.json / report.md of an eval.py run, and the schema check the tests (and you) can use.

report.json schema (version 3.2; also in docs/report_schema.md)::

    schema_version: 3.2        (3.2: + refinement_status.sampling; 3.1: + denoising_gain; 3:
                                no denoising_gain; 2: the refinement
                                method ours_whole_reference was whole_reference, the name of a
                                correspondence baseline; :func:`upgrade_report` reads older
                                reports with today's names)
    warnings:    [str]     what makes the headline less clean (training-data overlap, unknown
                           provenance, no held-out split, a failed stage); report.md starts here
    meta:        {checkpoint, bench_dir, command, device, date, versions: {package: version},
                  run_dir, tracker: null | {id, project, entity, name, mode, run_dir, url},
                  cache: null | {dir, resumed, reused: {stage: int}, computed: {stage: int}}}
    data_provenance: {status: disjoint | overlap | unknown | not_generated, message,
                      training: null | {train: {...}, validation: {...}},
                      benchmark: {generators: [{namespace, seed, cases}], not_generated},
                      overlapping_cases}
    counts:      {cases_found, cases_loaded, skipped, with_reference_mask,
                  without_reference_mask, with_target, sweep_cases, calibration_cases,
                  report_cases, feature_matching_failures}                 (all ints)
    skipped:     [{id, reason}]            malformed cases, by id, with the reader's reason
    correspondence: null when no case has a reference_mask, else
      num_cases, timesteps [T] (index 0 = noisiest), layers [L], seeds, threshold
      split:     {held_out, seed, calibration_fraction, calibration_ids, report_ids}
      table:     {mask: T x L, box: T x L}     mIoU averaged over all swept cases and seeds
      curves:    {timestep: {mask: [T], box: [T]}, layer: {mask: [L], box: [L]}}
      best:      {t, t_index, layer, miou_mask, miou_box, calibration: {miou_mask, miou_box}}
                 (t*, l*) = argmax over the calibration cases; miou_* on the report cases
      in_sample_best: {t, t_index, layer, miou_mask, miou_box}  chosen and scored on all cases
      stability: {} | {resamples, seed, chosen_win_frequency, distinct_winners,
                  wins: [{t, t_index, layer, frequency}],
                  held_out_of_resampled_choice: {mean, low, high},
                  chosen_held_out: {mean, low, high}}
      topk:      {ks, best_cell: {miou_mask, miou_box},
                  in_sample: [{k, cells: [[t_index, layer]], miou_mask, miou_box}],
                  in_sample_beats_best_cell,
                  held_out: null | {num_select, num_score, best_cell, rows, beats_best_cell},
                  note}
      baselines: {whole_reference, same_position_box, feature_matching}: {miou_mask, miou_box}
                 on the report cases; baselines_all_cases: the same on every swept case
      feature_matching: {attempts, failures, failed: [{id, reason}]}
      deployed:  null | {miou_mask, miou_box, num_cases}   align() at (t*, l*), report cases
      readouts:  {readout: {t, t_index, layer, miou_mask, miou_box, deployed}}  each read-out's
                 best cell on the calibration cases, scored on the report cases
      by_category: {category: {num_cases, ours: {..}, <baseline>: {miou_mask, miou_box}}}
    refinement:  {method: {metric: number | note}}   on the report cases; empty when the
                 refinement evaluation did not run; a note string (e.g. "not available
                 (offline, not cached)") replaces a value that could not be computed; PSNR may
                 be Infinity
    refinement_by_category: {category: {method: {metric: number | note}}}
    refinement_counts: {name: int | {..}}    evaluation/refinement.py's own counts
    refinement_status: {run: bool, reason: str | null, error: str | null,
                        sampling (when run): RefinementConfig's fields, as sampled}
    external_methods: {name: {dir, cases_scored, missing: [case id], resized: [case id],
                       unused_files}}     other systems' outputs (external_methods.NAME=DIR),
                       scored as refinement methods under their name
    refinement_paired: {name: {difference: "ours - <name>", vs: {our method: {metric:
                        {cases, mean_difference, ci95: [low, high], ours_better_cases}}}}}
                        for each external method and Paint-by-Example row
    denoising_gain: null (not run), else (evaluation/denoising_gain.py, report cases with a
                 target) {timesteps [T], seed, psnr_cap, prediction_type, space, image_size,
                 crop_margin, cases_without_target,
                 references: {whole | crop | other: {num_cases, rows: [{t, psnr_noisy, psnr_x0,
                 psnr_gain, psnr_gain_se, gms_noisy, gms_x0, gms_gain, gms_gain_se}]}}}
    alignment:   {timestep, block, threshold, margin, readout, num_steps}   alignment.yaml
    figures:     {name: path relative to the run folder}

All mIoU values are in [0, 1] (NaN is allowed only where no case could be scored).
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

SCHEMA_VERSION = 3.2  # a number, so versions compare; .1: + denoising_gain, .2: + sampling
# refinement methods renamed at a schema version: {version: {old name: new name}}
RENAMED_METHODS = {3: {"whole_reference": "ours_whole_reference"}}
BASELINE_NAMES = ("whole_reference", "same_position_box", "feature_matching")
GAIN_KEYS = tuple(f"{m}_{k}" for m in ("psnr", "gms")
                  for k in ("noisy", "x0", "gain", "gain_se"))
COUNT_KEYS = ("cases_found", "cases_loaded", "skipped", "with_reference_mask",
              "without_reference_mask", "with_target", "sweep_cases", "calibration_cases",
              "report_cases", "feature_matching_failures")
REFERENCE_NAMES = {"whole": "whole reference", "crop": "ground-truth crop",
                   "other": "another case's reference"}
PROVENANCE_STATUSES = ("disjoint", "overlap", "unknown", "not_generated")
META_KEYS = ("checkpoint", "bench_dir", "command", "device", "date", "versions")
TableRows = tuple[list[str], list[list[Any]]]  # (header, rows): report.md and the tracker


class ReportError(ValueError):
    """A report that does not follow the schema; the message lists every problem."""


def upgrade_report(report: Mapping[str, Any]) -> dict[str, Any]:
    """``report`` (any schema version) with today's refinement method names, for readers of
    reports written before a rename (``RENAMED_METHODS``); ``upgraded_from`` records the
    version it was written with. A current report is returned as it is."""
    version = report.get("schema_version", 1)
    renames = {old: new for since, names in RENAMED_METHODS.items() if version < since
               for old, new in names.items()}
    if not renames:
        return dict(report)

    def renamed(methods: Any) -> Any:
        if not isinstance(methods, Mapping):
            return methods
        return {renames.get(k, k): v for k, v in methods.items()}

    out = copy.deepcopy(dict(report))
    for key in ("refinement", "refinement_per_case"):
        if key in out:
            out[key] = renamed(out[key])
    if isinstance(out.get("refinement_by_category"), Mapping):
        out["refinement_by_category"] = {cat: renamed(methods) for cat, methods in
                                         out["refinement_by_category"].items()}
    counts = out.get("refinement_counts")
    if isinstance(counts, Mapping) and isinstance(counts.get("scored"), Mapping):
        counts["scored"] = renamed(counts["scored"])
    out["schema_version"], out["upgraded_from"] = SCHEMA_VERSION, version
    return out


def read_report(path: str | Path) -> dict[str, Any]:
    """report.json at ``path``, upgraded to today's method names (:func:`upgrade_report`)."""
    return upgrade_report(json.loads(Path(path).read_text()))


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _check_miou(value: Any, where: str, problems: list[str]) -> None:
    if not _is_number(value):
        problems.append(f"{where}: expected a number, got {type(value).__name__}")
    elif not math.isnan(value) and not 0.0 <= value <= 1.0:
        problems.append(f"{where}: mIoU {value} outside [0, 1]")


def _check_pair(node: Any, where: str, problems: list[str]) -> None:
    if not isinstance(node, Mapping):
        problems.append(f"{where}: expected {{miou_mask, miou_box}}")
        return
    for key in ("miou_mask", "miou_box"):
        if key not in node:
            problems.append(f"{where}.{key}: missing")
        else:
            _check_miou(node[key], f"{where}.{key}", problems)


def _check_stability(stab: Any, problems: list[str]) -> None:
    """{} (no bootstrap) or frequencies in [0, 1] and ordered 95% intervals of mIoU."""
    where = "correspondence.stability"
    if not isinstance(stab, Mapping):
        problems.append(f"{where}: expected an object ({{}} without bootstrap)")
        return
    if not stab:
        return
    _check_miou(stab.get("chosen_win_frequency"), f"{where}.chosen_win_frequency", problems)
    wins = stab.get("wins")
    if not isinstance(wins, list) or not wins:
        problems.append(f"{where}.wins: expected a non-empty list")
    else:
        for i, row in enumerate(wins):
            if not isinstance(row, Mapping) or not {"t", "t_index", "layer"} <= set(row):
                problems.append(f"{where}.wins[{i}]: expected {{t, t_index, layer, frequency}}")
            else:
                _check_miou(row.get("frequency"), f"{where}.wins[{i}].frequency", problems)
    for key in ("held_out_of_resampled_choice", "chosen_held_out"):
        node = stab.get(key)
        if not isinstance(node, Mapping) or not {"mean", "low", "high"} <= set(node):
            problems.append(f"{where}.{key}: expected {{mean, low, high}}")
            continue
        for k in ("mean", "low", "high"):
            _check_miou(node[k], f"{where}.{key}.{k}", problems)
        if all(_is_number(node[k]) for k in ("low", "high")) and node["low"] > node["high"]:
            problems.append(f"{where}.{key}: low > high")


def _check_correspondence(corr: Mapping, problems: list[str]) -> None:
    timesteps, layers = corr.get("timesteps"), corr.get("layers")
    if not isinstance(timesteps, list) or not isinstance(layers, list):
        problems.append("correspondence.timesteps / layers: expected lists")
        return
    table = corr.get("table")
    if not isinstance(table, Mapping):
        problems.append("correspondence.table: missing")
    else:
        for kind in ("mask", "box"):
            rows = table.get(kind)
            if (not isinstance(rows, list) or len(rows) != len(timesteps)
                    or any(not isinstance(r, list) or len(r) != len(layers) for r in rows)):
                problems.append(f"correspondence.table.{kind}: expected "
                                f"{len(timesteps)} x {len(layers)} lists")
            else:
                for i, row in enumerate(rows):
                    for j, v in enumerate(row):
                        _check_miou(v, f"correspondence.table.{kind}[{i}][{j}]", problems)
    best = corr.get("best")
    if not isinstance(best, Mapping):
        problems.append("correspondence.best: missing")
    else:
        for key in ("t", "t_index", "layer"):
            if not isinstance(best.get(key), int):
                problems.append(f"correspondence.best.{key}: expected an int")
        _check_pair(best, "correspondence.best", problems)
        if isinstance(best.get("t_index"), int) and not 0 <= best["t_index"] < len(timesteps):
            problems.append("correspondence.best.t_index: out of range")
        elif isinstance(best.get("t"), int) and timesteps[best["t_index"]] != best["t"]:
            problems.append("correspondence.best.t: does not match timesteps[t_index]")
        if best.get("layer") not in layers:
            problems.append("correspondence.best.layer: not one of layers")
    if isinstance(best, Mapping):
        _check_pair(best.get("calibration"), "correspondence.best.calibration", problems)
    _check_pair(corr.get("in_sample_best"), "correspondence.in_sample_best", problems)
    split = corr.get("split")
    if not isinstance(split, Mapping) or not isinstance(split.get("held_out"), bool) or not all(
            isinstance(split.get(k), list) for k in ("calibration_ids", "report_ids")):
        problems.append("correspondence.split: expected {held_out, calibration_ids, "
                        "report_ids, ...}")
    elif split["held_out"] and set(split["calibration_ids"]) & set(split["report_ids"]):
        problems.append("correspondence.split: calibration and report cases overlap")
    _check_stability(corr.get("stability"), problems)
    for key in ("baselines", "baselines_all_cases"):
        baselines = corr.get(key)
        if not isinstance(baselines, Mapping):
            problems.append(f"correspondence.{key}: missing")
            continue
        for name in BASELINE_NAMES:
            _check_pair(baselines.get(name), f"correspondence.{key}.{name}", problems)
    topk = corr.get("topk")
    if not isinstance(topk, Mapping) or not isinstance(topk.get("in_sample"), list):
        problems.append("correspondence.topk: expected {ks, in_sample: [...], ...}")
    else:
        for i, row in enumerate(topk["in_sample"]):
            _check_pair(row, f"correspondence.topk.in_sample[{i}]", problems)


def _check_denoising_gain(gain: Any, problems: list[str]) -> None:
    """null, or rows of numbers per reference, one per timestep in order."""
    where = "denoising_gain"
    if gain is None:
        return
    if not isinstance(gain, Mapping) or not isinstance(gain.get("timesteps"), list) or \
            not isinstance(gain.get("references"), Mapping):
        problems.append(f"{where}: expected null or {{timesteps, references, ...}}")
        return
    for ref, node in gain["references"].items():
        rows = node.get("rows") if isinstance(node, Mapping) else None
        if not isinstance(rows, list) or not isinstance(node.get("num_cases"), int):
            problems.append(f"{where}.references.{ref}: expected {{num_cases, rows}}")
            continue
        if rows and [r.get("t") if isinstance(r, Mapping) else None for r in rows] != \
                gain["timesteps"]:
            problems.append(f"{where}.references.{ref}.rows: one per timestep, in order")
            continue
        for i, row in enumerate(rows):
            bad = [k for k in GAIN_KEYS if not _is_number(row.get(k))]
            if bad:
                problems.append(f"{where}.references.{ref}.rows[{i}]: {', '.join(bad)} "
                                "not numbers")


def validate_report(report: Mapping[str, Any]) -> None:
    """Raise :class:`ReportError` listing every way ``report`` departs from the schema."""
    problems: list[str] = []
    if not isinstance(report, Mapping):
        raise ReportError("report: expected a JSON object")
    if report.get("schema_version") != SCHEMA_VERSION:
        problems.append(f"schema_version: expected {SCHEMA_VERSION}")
    warnings = report.get("warnings")
    if not isinstance(warnings, list) or not all(isinstance(w, str) for w in warnings):
        problems.append("warnings: expected a list of strings")
    provenance = report.get("data_provenance")
    if not isinstance(provenance, Mapping) or provenance.get("status") not in \
            PROVENANCE_STATUSES or not isinstance(provenance.get("message"), str):
        problems.append(f"data_provenance: expected {{status: one of {PROVENANCE_STATUSES}, "
                        "message, ...}")
    elif provenance["status"] in ("overlap", "unknown") and isinstance(warnings, list) and \
            provenance["message"] not in warnings:
        problems.append("warnings: must include data_provenance.message when the status is "
                        f"{provenance['status']}")
    meta = report.get("meta")
    if not isinstance(meta, Mapping):
        problems.append("meta: missing")
    else:
        problems += [f"meta.{k}: missing" for k in META_KEYS if k not in meta]
    counts = report.get("counts")
    if not isinstance(counts, Mapping):
        problems.append("counts: missing")
    else:
        for key in COUNT_KEYS:
            if not isinstance(counts.get(key), int) or counts[key] < 0:
                problems.append(f"counts.{key}: expected a non-negative int")
    skipped = report.get("skipped")
    if not isinstance(skipped, list) or any(
            not isinstance(s, Mapping) or not {"id", "reason"} <= set(s) for s in skipped):
        problems.append("skipped: expected a list of {id, reason}")
    elif isinstance(counts, Mapping) and counts.get("skipped") != len(skipped):
        problems.append("counts.skipped: does not match len(skipped)")
    if "correspondence" not in report:
        problems.append("correspondence: missing (null when no case has a reference_mask)")
    elif report["correspondence"] is not None:
        if not isinstance(report["correspondence"], Mapping):
            problems.append("correspondence: expected an object or null")
        else:
            _check_correspondence(report["correspondence"], problems)
    refinement = report.get("refinement")
    if not isinstance(refinement, Mapping):
        problems.append("refinement: expected {method: {metric: number}}")
    else:
        for method, metrics in refinement.items():
            if not isinstance(metrics, Mapping) or not all(
                    _is_number(v) or isinstance(v, str) for v in metrics.values()):
                problems.append(f"refinement.{method}: expected {{metric: number | note}}")
    for key in ("external_methods", "refinement_paired"):
        if key in report and not isinstance(report[key], Mapping):
            problems.append(f"{key}: expected an object")
    external = report.get("external_methods")
    for name, ext in (external.items() if isinstance(external, Mapping) else ()):
        if not isinstance(ext, Mapping) or not isinstance(ext.get("missing"), list):
            problems.append(f"external_methods.{name}: expected {{dir, cases_scored, "
                            "missing: [...], ...}")
    status = report.get("refinement_status")
    if not isinstance(status, Mapping) or not isinstance(status.get("run"), bool) or \
            not {"reason", "error"} <= set(status):
        problems.append("refinement_status: expected {run: bool, reason, error}")
    if "denoising_gain" not in report:
        problems.append("denoising_gain: missing (null when not run)")
    else:
        _check_denoising_gain(report["denoising_gain"], problems)
    alignment = report.get("alignment")
    if not isinstance(alignment, Mapping) or not {"timestep", "block", "threshold",
                                                  "margin"} <= set(alignment):
        problems.append("alignment: expected {timestep, block, threshold, margin}")
    if not isinstance(report.get("figures"), Mapping):
        problems.append("figures: expected {name: path}")
    if problems:
        raise ReportError("report does not follow the schema:\n  " + "\n  ".join(problems))


def _json_default(value: Any) -> Any:
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def write_report_json(report: Mapping[str, Any], path: str | Path) -> Path:
    """Validate, then write ``report`` as indented JSON (NaN written as NaN, as json does)."""
    validate_report(report)
    path = Path(path)
    path.write_text(json.dumps(report, indent=1, default=_json_default))
    return path


def _fmt(value: Any) -> str:
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if _is_number(value):
        return "n/a" if math.isnan(value) else f"{value:.3f}"
    return str(value)


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in rows]
    return lines + [""]


METRIC_ORDER = ("psnr", "ssim", "l1", "gms", "clip", "dino", "fid")


def metric_table(methods: Mapping[str, Mapping[str, Any]]) -> TableRows:
    """Methods x metrics, ground-truth metrics first (METRIC_ORDER), then any other; a
    missing value is NaN, a note stays a string."""
    metrics: list[str] = []
    for values in methods.values():
        metrics += [m for m in values if m not in metrics]
    rank = {m: i for i, m in enumerate(METRIC_ORDER)}
    metrics.sort(key=lambda m: rank.get(m, len(rank)))
    return (["method", *metrics],
            [[name, *(values.get(m, float("nan")) for m in metrics)]
             for name, values in methods.items()])


def _interval_text(node: Mapping[str, float]) -> str:
    return f"{_fmt(node['mean'])} [{_fmt(node['low'])}, {_fmt(node['high'])}]"


def _stability_lines(stab: Mapping[str, Any], best: Mapping[str, Any]) -> list[str]:
    """The bootstrap's verdict on (t*, l*), in words."""
    if not stab:
        return ["No bootstrap (sweep.bootstrap=0): the stability of (t*, l*) is not measured.",
                ""]
    winners = ", ".join(f"t={w['t']} (index {w['t_index']}) block {w['layer']}: "
                        f"{100 * w['frequency']:.0f}%" for w in stab["wins"])
    return [f"Stability of (t*, l*) over {stab['resamples']} bootstrap resamples of the "
            f"calibration cases: the chosen cell (t={best['t']}, block {best['layer']}) wins "
            f"{100 * stab['chosen_win_frequency']:.0f}% of them; {stab['distinct_winners']} "
            f"distinct cells win at least once; most frequent: {winners}.", "",
            f"- held-out mask mIoU of the resampled choices (mean [95% interval]): "
            f"{_interval_text(stab['held_out_of_resampled_choice'])}",
            f"- held-out mask mIoU of the chosen cell, report cases resampled: "
            f"{_interval_text(stab['chosen_held_out'])}", ""]


def headline_table(corr: Mapping[str, Any]) -> TableRows:
    """The headline rows: ours at (t*, l*) and deployed, then each baseline, on the report
    cases (held out when the split is on)."""
    best = corr["best"]
    rows = [[f"ours, (t*, l*) = (t={best['t']}, block {best['layer']})", best["miou_mask"],
             best["miou_box"]]]
    if corr.get("deployed"):
        dep = corr["deployed"]
        rows.append([f"ours, deployed align() at (t*, l*) ({dep['num_cases']} cases)",
                     dep["miou_mask"], dep["miou_box"]])
    rows += [[f"baseline: {n}", v["miou_mask"], v["miou_box"]]
             for n, v in corr["baselines"].items()]
    return ["method", "mIoU mask", "mIoU box"], rows


def in_sample_table(corr: Mapping[str, Any]) -> TableRows:
    """The secondary, optimistic rows: chosen and scored on the same cases."""
    best, inb = corr["best"], corr["in_sample_best"]
    n_cal = len(corr["split"]["calibration_ids"])
    rows = [[f"ours, best cell chosen on these cases (t={inb['t']}, block {inb['layer']})",
             inb["miou_mask"], inb["miou_box"]],
            [f"ours, (t*, l*) on the {n_cal} calibration case(s) it was chosen on",
             best["calibration"]["miou_mask"], best["calibration"]["miou_box"]]]
    rows += [[f"baseline: {n}", v["miou_mask"], v["miou_box"]]
             for n, v in corr["baselines_all_cases"].items()]
    return ["method", "mIoU mask", "mIoU box"], rows


def topk_table(corr: Mapping[str, Any]) -> TableRows:
    """Top-k aggregation against the best single cell, held out (if any) then in-sample."""
    topk, rows = corr["topk"], []
    held = topk.get("held_out")
    if held:
        hb = held["best_cell"]
        rows.append([f"best single cell (held-out, {held['num_score']} cases)", 1,
                     hb["miou_mask"], hb["miou_box"]])
        rows += [[f"top-{r['k']} cells + seeds (held-out)", len(r["cells"]), r["miou_mask"],
                  r["miou_box"]] for r in held["rows"]]
    rows.append(["best single cell (in-sample)", "", topk["best_cell"]["miou_mask"],
                 topk["best_cell"]["miou_box"]])
    rows += [[f"top-{r['k']} cells + seeds (in-sample)", len(r["cells"]), r["miou_mask"],
              r["miou_box"]] for r in topk["in_sample"]]
    return ["aggregation", "cells", "mIoU mask", "mIoU box"], rows


def readout_table(corr: Mapping[str, Any]) -> TableRows:
    """Each read-out's best calibration cell, scored on the report cases."""
    return (["read-out", "t (index)", "block", "mIoU mask", "mIoU box"],
            [[f"{name}{' (deployed)' if r['deployed'] else ''}", f"{r['t']} ({r['t_index']})",
              r["layer"], r["miou_mask"], r["miou_box"]]
             for name, r in corr.get("readouts", {}).items()])


def _correspondence_lines(corr: Mapping[str, Any]) -> list[str]:
    best, split = corr["best"], corr["split"]
    n_cal, n_rep = len(split["calibration_ids"]), len(split["report_ids"])
    where = (f"chosen on {n_cal} calibration case(s), scored on the other {n_rep} "
             f"(split seed {split['seed']})" if split["held_out"]
             else f"IN-SAMPLE: chosen and scored on the same {n_rep} case(s)")
    out = [f"Sweep over {corr['num_cases']} case(s), {len(corr['timesteps'])} timesteps x "
           f"{len(corr['layers'])} blocks, seeds {corr['seeds']}, threshold "
           f"{corr['threshold']}. (t*, l*) = t={best['t']} (index {best['t_index']}, "
           f"0 = noisiest), block {best['layer']}: {where}.", ""]
    out += _stability_lines(corr.get("stability", {}), best)
    label = "held-out report cases" if split["held_out"] else "in-sample"
    out += [f"### Headline ({label}, {n_rep} case(s))", ""]
    out += _table(*headline_table(corr))
    out += [f"### Secondary: in-sample (all {corr['num_cases']} swept cases, optimistic)", ""]
    out += _table(*in_sample_table(corr))
    fm = corr.get("feature_matching", {})
    if fm:
        out += [f"Feature matching failed on {fm['failures']} of {fm['attempts']} case(s); "
                "those use the whole reference.", ""]
    cats = corr.get("by_category", {})
    if cats:
        out += [f"### By category ({label})", ""]
        names = ["ours", *BASELINE_NAMES]
        out += _table(["category", "n", *(f"{n} mask/box" for n in names)],
                      [[cat, v["num_cases"], *(f"{_fmt(v[n]['miou_mask'])} / "
                                               f"{_fmt(v[n]['miou_box'])}" for n in names)]
                       for cat, v in cats.items()])
    topk = corr["topk"]
    out += ["### Top-k aggregation (beyond the paper)", "", topk["note"], ""]
    out += _table(*topk_table(corr))
    held = topk.get("held_out")
    beats = held["beats_best_cell"] if held else topk["in_sample_beats_best_cell"]
    verdict = "beats" if beats else "does not beat"
    out += [f"Aggregation {verdict} the single best cell "
            f"({'held-out' if held else 'in-sample only'}).", ""]
    return out


def denoising_gain_table(node: Mapping[str, Any]) -> TableRows:
    """One reference's rows: noisy input, x0 prediction and gain (+- standard error) per t."""
    return (["t", "PSNR noisy", "PSNR x0", "gain dB", "gms noisy", "gms x0", "gain gms"],
            [[r["t"], f"{r['psnr_noisy']:.2f}", f"{r['psnr_x0']:.2f}",
              f"{r['psnr_gain']:+.2f} +- {r['psnr_gain_se']:.2f}", r["gms_noisy"], r["gms_x0"],
              f"{r['gms_gain']:+.3f} +- {r['gms_gain_se']:.3f}"] for r in node["rows"]])


def sampling_line(sampling: Mapping[str, Any]) -> str:
    """How the model methods sampled, in one sentence (report.json's refinement_status)."""
    stop = sampling.get("final_x0_timestep")
    end = ("to the end" if stop is None else
           f"stopped at the first step at or below t = {stop}, keeping its x0 prediction")
    crop = sampling.get("padding_mask_crop")
    return (f"Model methods: {sampling['sampler']}, {sampling['num_steps']} steps, guidance "
            f"{sampling['guidance_scale']:g}, {end}; dilate {sampling['dilate']}, feather "
            f"{sampling['feather']}, padded crop {'off' if crop is None else f'{crop} px'}.")


def denoising_gain_lines(gain: Mapping[str, Any]) -> list[str]:
    """report.md's section: what was measured, then a table per reference."""
    out = ["## Denoising gain (one denoiser step)", "",
           f"The target noised to t (fixed per-case noise, seed {gain['seed']}), one denoiser "
           f"forward, its x0 prediction ({gain['prediction_type']}, {gain['space']} space) "
           "pasted into the mask; PSNR in the mask's box (capped at "
           f"{gain['psnr_cap']:g} dB) and gms in the mask against the target, at "
           f"{gain['image_size']} px. Gain = x0 minus the noisy input: 0 = the step removes "
           "no noise.", ""]
    for ref, node in gain["references"].items():
        what = REFERENCE_NAMES.get(ref, ref)
        out += [f"### {what} ({node['num_cases']} case(s))", ""]
        out += _table(*denoising_gain_table(node)) if node["rows"] else ["No case.", ""]
    return out


def paired_table(node: Mapping[str, Any]) -> TableRows:
    """One external method paired with each of ours: per metric, mean of ours minus it
    [95% interval], and cases ours wins / cases paired."""
    metrics: list[str] = []
    for row in node["vs"].values():
        metrics += [m for m in row if m not in metrics]
    rank = {m: i for i, m in enumerate(METRIC_ORDER)}
    metrics.sort(key=lambda m: rank.get(m, len(rank)))

    def cell(r: Mapping[str, Any] | None) -> str:
        if r is None:
            return "--"
        low, high = r["ci95"]
        return (f"{r['mean_difference']:+.3f} [{low:+.3f}, {high:+.3f}] "
                f"{r['ours_better_cases']}/{r['cases']}")

    return (["ours", *metrics],
            [[method, *(cell(row.get(m)) for m in metrics)] for method, row in node["vs"].items()])


def _external_lines(report: Mapping[str, Any]) -> list[str]:
    """Each external method's source, missing cases and paired comparison with ours."""
    out: list[str] = []
    paired = report.get("refinement_paired") or {}
    for name, ext in (report.get("external_methods") or {}).items():
        missing = ext["missing"]
        out += [f"### External method `{name}` vs ours (paired)", "",
                f"Outputs from `{ext['dir']}`: {ext['cases_scored']} case(s) scored"
                + (f", {len(ext['resized'])} resized to the case's size" if ext["resized"]
                   else "")
                + (f"; **missing {len(missing)}**: {', '.join(missing)}" if missing else "")
                + ".", ""]
        if name in paired:
            out += _paired_lines(name, paired[name])
    for name in paired:
        if name not in (report.get("external_methods") or {}):  # e.g. Paint-by-Example rows
            out += [f"### `{name}` vs ours (paired)", ""] + _paired_lines(name, paired[name])
    return out


def _paired_lines(name: str, node: Mapping[str, Any]) -> list[str]:
    return [f"Ours minus {name} per case, over the cases both scored (lower is better "
            "for l1: a negative difference is ours better there); mean [95% bootstrap "
            "interval], then cases ours wins / cases paired.", "", *_table(*paired_table(node))]


def _cache_lines(cache: Mapping[str, Any] | None) -> list[str]:
    """Whether the run resumed from its cache, and how many case results it reused."""
    if not cache:
        return []
    reused, computed = sum(cache["reused"].values()), sum(cache["computed"].values())
    if not cache["resumed"]:
        return [f"- per-case cache: `{cache['dir']}` ({computed} case result(s) computed)"]
    stages = ", ".join(f"{n} {k}" for n, k in cache["reused"].items() if k) or "none"
    return [f"- **resumed** from `{cache['dir']}`: {reused} case result(s) reused ({stages}), "
            f"{computed} computed"]


def render_markdown(report: Mapping[str, Any]) -> str:
    """report.md: warnings first, then counts, correspondence (held-out headline, in-sample
    secondary, stability), refinement, figures."""
    meta, counts = report["meta"], report["counts"]
    out = ["# Refine-by-Align evaluation", ""]
    for warning in report.get("warnings", []):
        out += [f"> **WARNING:** {warning}", ""]
    provenance = report["data_provenance"]
    out += [f"- checkpoint: `{meta['checkpoint']}`", f"- benchmark: `{meta['bench_dir']}`",
            f"- benchmark vs training data: **{provenance['status']}**: "
            f"{provenance['message']}",
            f"- device: {meta['device']}, date: {meta['date']}", f"- command: `{meta['command']}`"]
    out += _cache_lines(meta.get("cache"))
    out += ["", "## Cases", ""]
    out += _table(["count", "value"], [[k, v] for k, v in counts.items()])
    corr = report.get("correspondence")
    out += ["## Correspondence (alignment stage)", ""]
    if corr is None:
        out += ["No case has a reference_mask: the calibration sweep was not run.", ""]
    else:
        out += _correspondence_lines(corr)
        if len(corr.get("readouts", {})) > 1:
            out += ["### Read-outs side by side (best cell on calibration, scored held out)", ""]
            out += _table(*readout_table(corr))
    out += [f"## Refinement ({counts.get('report_cases', '?')} report case(s))", "",
            "PSNR and SSIM in the mask's box; L1 and gms (gradient magnitude similarity, "
            "1 = the target's edges; a smooth fill scores low) in the mask.", ""]
    status = report["refinement_status"]
    if not status["run"]:
        out += [f"Not run: {status.get('reason')}"
                + (f" ({status['error']})" if status.get("error") else ""), ""]
    if status.get("sampling"):
        out += [sampling_line(status["sampling"]), ""]
    if report["refinement"]:
        out += _table(*metric_table(report["refinement"]))
    for cat, methods in report.get("refinement_by_category", {}).items():
        out += [f"### {cat}", ""] + _table(*metric_table(methods))
    out += _external_lines(report)
    if report.get("denoising_gain"):
        out += denoising_gain_lines(report["denoising_gain"])
    align = report["alignment"]
    out += ["## Chosen alignment (alignment.yaml)", "",
            f"timestep {align['timestep']}, block {align['block']}, threshold "
            f"{align['threshold']}, margin {align['margin']}, read-out "
            f"{align.get('readout', 'forward_noise')}", ""]
    if report["figures"]:
        out += ["## Figures", ""]
        out += [f"![{name}]({rel})" for name, rel in report["figures"].items()] + [""]
    if report["skipped"]:
        out += ["## Skipped cases", ""]
        out += _table(["id", "reason"], [[s["id"], s["reason"]] for s in report["skipped"]])
    return "\n".join(out)


def write_report_md(report: Mapping[str, Any], path: str | Path) -> Path:
    path = Path(path)
    path.write_text(render_markdown(report))
    return path

def format_summary(result: dict[str, Any]) -> str:
    """Human-readable end-of-run summary: where things are, final loss, the mIoU table."""
    metrics, table = result["metrics"], result["val_table"]
    lines = [
        "", "=" * 64, "Training finished",
        f"  steps            : {result['global_step']}",
        f"  logs             : {result['log_dir']}",
        f"  checkpoints      : {result['checkpoint_dir']}",
        f"  exported pipeline: {result['export_dir']}",
        f"  final train loss : {metrics.get('train/loss', float('nan')):.4f}",
        f"  final val loss   : {metrics.get('val/loss', float('nan')):.4f}",
    ]
    if table:
        lines += ["", f"Correspondence mIoU on held-out alignment pairs (t={table['timestep']})",
                  f"  {'block':<30}{'mask':>8}{'box':>8}"]
        for index, scores in table["blocks"].items():
            mark = "  <- best" if index == table["best_block"] else ""
            lines.append(f"  {index:<30}{scores['mask']:>8.3f}{scores['box']:>8.3f}{mark}")
        for name, scores in table["baselines"].items():
            lines.append(f"  {'baseline: ' + name:<30}{scores['mask']:>8.3f}{scores['box']:>8.3f}")
    lines.append("=" * 64)
    return "\n".join(lines)
