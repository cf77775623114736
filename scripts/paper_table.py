"""Paper-style refinement tables from eval.py reports: methods x metrics, one block per category.

    python scripts/paper_table.py runs/eval/a/report.json [runs/eval/b/report.json ...] \
        [--labels A B] [--out results/x]

Rows are the refinement methods of each report (ours, the classical baselines, and any
``external_methods``), columns the metrics (PSNR, SSIM, L1, gms, CLIP, DINO, FID, with their
direction); one block over all cases when there are several categories, then one block per
``meta.json`` category, each with its number of cases, and ``n`` per row (a row can score fewer
cases: oracle_crop without reference_mask, an external system's missing outputs). The best
value of each column within a block is bold; ``input`` (the unrefined image) and
``oracle_crop`` (it uses the ground-truth region) are reference rows, shown but not ranked
(``--unranked`` changes that). A metric that could not be computed ("not available ...") is
``--``. With several reports, each method appears once per report, labelled with the report's
``--labels`` entry (default: the report's folder name). Prints the markdown table; ``--out``
also writes ``paper_table.md`` and ``paper_table.tex`` (LaTeX, booktabs) there.
Reports of older schemas are read with today's method names (evaluation.report.read_report).
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from evaluation.paired import LOWER_IS_BETTER
from evaluation.report import METRIC_ORDER, read_report

METHOD_LABELS = {
    "input": "Input (unrefined)",
    "telea": "Telea inpainting",
    "copy_from_reference": "Homography copy",
    "ours_whole_reference": "Ours, whole reference",
    "aligned_crop": "Ours, aligned crop",
    "oracle_crop": "Ours, oracle crop",
}
METRIC_LABELS = {"psnr": "PSNR", "ssim": "SSIM", "l1": "L1", "gms": "GMS", "clip": "CLIP",
                 "dino": "DINO", "fid": "FID", "lpips": "LPIPS"}
DECIMALS = {"psnr": 2, "fid": 2}  # every other metric: 3
UNRANKED = ("input", "oracle_crop")
ALL = "all categories"


@dataclass
class Row:
    """One method of one report in one block."""

    label: str
    method: str
    cases: int | None
    values: dict[str, Any]


@dataclass
class Block:
    """One category (or every case): its case count(s) and rows."""

    name: str
    cases: list[int]
    rows: list[Row]


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and not (
        isinstance(value, float) and math.isnan(value))


def _label(method: str, report_label: str | None) -> str:
    name = METHOD_LABELS.get(method, method)
    return f"{name} [{report_label}]" if report_label else name


def build_blocks(reports: Sequence[dict[str, Any]], labels: Sequence[str | None]
                 ) -> list[Block]:
    """The blocks of the table: every case (when several categories), then each category."""
    categories: list[str] = []
    for report in reports:
        categories += [c for c in report.get("refinement_by_category") or {}
                       if c not in categories]
    names = ([ALL] if len(categories) > 1 else []) + sorted(categories)
    blocks = []
    for name in names:
        rows, cases = [], []
        for report, label in zip(reports, labels, strict=True):
            counts = report.get("refinement_counts") or {}
            if name == ALL:
                methods, total = report.get("refinement") or {}, counts.get("cases")
                scored = counts.get("scored") or {}
            else:
                methods = (report.get("refinement_by_category") or {}).get(name) or {}
                total = (counts.get("by_category") or {}).get(name)
                scored = (counts.get("scored_by_category") or {}).get(name) or {}
            if not methods:
                continue
            if total is not None and total not in cases:
                cases.append(int(total))
            rows += [Row(_label(method, label), method, scored.get(method, total), dict(values))
                     for method, values in methods.items()]
        if rows:
            blocks.append(Block(name, cases, rows))
    return blocks


def metric_columns(blocks: Sequence[Block]) -> list[str]:
    """Every metric of any row, in the report's order (METRIC_ORDER), then any other."""
    found: list[str] = []
    for block in blocks:
        for row in block.rows:
            found += [m for m in row.values if m not in found]
    rank = {m: i for i, m in enumerate(METRIC_ORDER)}
    return sorted(found, key=lambda m: rank.get(m, len(rank)))


def _rounded(metric: str, value: float) -> float:
    return value if math.isinf(value) else round(value, DECIMALS.get(metric, 3))


def best_rows(block: Block, metric: str, unranked: Sequence[str]) -> set[int]:
    """Indices of the rows with the best (displayed) value of ``metric`` in ``block``; ranked
    rows only, ties all marked."""
    values = {i: _rounded(metric, row.values[metric]) for i, row in enumerate(block.rows)
              if row.method not in unranked and _number(row.values.get(metric))}
    if not values:
        return set()
    best = (min if metric in LOWER_IS_BETTER else max)(values.values())
    return {i for i, v in values.items() if v == best}


def _text(metric: str, value: Any, latex: bool) -> str:
    if not _number(value):
        return "--"
    if math.isinf(value):
        return ("$\\infty$" if value > 0 else "$-\\infty$") if latex else (
            "inf" if value > 0 else "-inf")
    return f"{value:.{DECIMALS.get(metric, 3)}f}"


def _header(metric: str, latex: bool) -> str:
    name = METRIC_LABELS.get(metric, metric)
    if latex:
        return f"{latex_escape(name)} $\\{'downarrow' if metric in LOWER_IS_BETTER else 'uparrow'}$"
    return f"{name} {'↓' if metric in LOWER_IS_BETTER else '↑'}"


def _block_title(block: Block) -> str:
    counts = " / ".join(str(n) for n in block.cases) or "?"
    return f"{block.name} ({counts} cases)"


def _row_cases(row: Row) -> str:
    return "?" if row.cases is None else str(row.cases)


def render_markdown(blocks: Sequence[Block], metrics: Sequence[str],
                    unranked: Sequence[str]) -> str:
    lines = []
    for block in blocks:
        lines += [f"**{_block_title(block)}**", "",
                  "| method | n | " + " | ".join(_header(m, False) for m in metrics) + " |",
                  "|---|---:|" + "---:|" * len(metrics)]
        best = {m: best_rows(block, m, unranked) for m in metrics}
        for i, row in enumerate(block.rows):
            cells = [f"**{_text(m, row.values.get(m), False)}**" if i in best[m]
                     else _text(m, row.values.get(m), False) for m in metrics]
            lines.append(f"| {row.label} | {_row_cases(row)} | " + " | ".join(cells) + " |")
        lines.append("")
    lines.append(f"Best per column in bold (↑ higher / ↓ lower is better); not ranked: "
                 f"{', '.join(unranked) or 'none'}; -- = not available.")
    return "\n".join(lines) + "\n"


LATEX_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#",
                 "_": r"\_", "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}",
                 "^": r"\textasciicircum{}"}


def latex_escape(text: str) -> str:
    return "".join(LATEX_SPECIAL.get(ch, ch) for ch in text)


def render_latex(blocks: Sequence[Block], metrics: Sequence[str],
                 unranked: Sequence[str]) -> str:
    """A booktabs tabular (needs ``\\usepackage{booktabs}``); bold best per block column."""
    width = 2 + len(metrics)
    lines = [f"% best per column in bold; not ranked: {', '.join(unranked) or 'none'}; "
             "-- = not available",
             "\\begin{tabular}{lr" + "c" * len(metrics) + "}", "\\toprule",
             "Method & $n$ & " + " & ".join(_header(m, True) for m in metrics) + " \\\\"]
    for block in blocks:
        title = latex_escape(_block_title(block))
        lines += ["\\midrule", f"\\multicolumn{{{width}}}{{l}}{{\\textit{{{title}}}}} \\\\",
                  "\\midrule"]
        best = {m: best_rows(block, m, unranked) for m in metrics}
        for i, row in enumerate(block.rows):
            cells = [f"\\textbf{{{_text(m, row.values.get(m), True)}}}" if i in best[m]
                     else _text(m, row.values.get(m), True) for m in metrics]
            lines.append(f"{latex_escape(row.label)} & {_row_cases(row)} & "
                         + " & ".join(cells) + " \\\\")
    lines += ["\\bottomrule", "\\end{tabular}"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, str]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("reports", type=Path, nargs="+", help="report.json files of eval.py")
    p.add_argument("--labels", nargs="+", default=None,
                   help="one per report, for its rows (default: each report's folder name; "
                        "none with a single report)")
    p.add_argument("--unranked", nargs="*", default=list(UNRANKED),
                   help=f"methods shown but never marked best (default: {' '.join(UNRANKED)})")
    p.add_argument("--out", type=Path, default=None,
                   help="folder for paper_table.md and paper_table.tex")
    args = p.parse_args(argv)
    if args.labels is not None and len(args.labels) != len(args.reports):
        p.error(f"--labels: {len(args.labels)} label(s) for {len(args.reports)} report(s)")
    labels = args.labels or ([p.parent.name or str(p) for p in args.reports]
                             if len(args.reports) > 1 else [None])
    reports = [read_report(path) for path in args.reports]
    blocks = build_blocks(reports, labels)
    if not blocks:
        raise SystemExit("paper_table: no report has refinement results "
                         f"({', '.join(map(str, args.reports))})")
    metrics = metric_columns(blocks)
    out = {"markdown": render_markdown(blocks, metrics, args.unranked),
           "latex": render_latex(blocks, metrics, args.unranked)}
    print(out["markdown"], end="")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "paper_table.md").write_text(out["markdown"])
        (args.out / "paper_table.tex").write_text(out["latex"])
        print(f"written: {args.out / 'paper_table.md'}, {args.out / 'paper_table.tex'}")
    return out


if __name__ == "__main__":
    main()
