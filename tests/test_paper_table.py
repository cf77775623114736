"""scripts/paper_table.py: blocks per category with case counts, best per column by the metric's
direction, "--" for what is not available, several reports merged, LaTeX that is well formed."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from evaluation.report import validate_report
from scripts.paper_table import main as paper_table
from tests.test_report import good_report

REPO = Path(__file__).resolve().parents[1]
NA = "not available (no weights)"


def _metrics(psnr: float, l1: float, gms: float) -> dict:
    return {"psnr": psnr, "ssim": 0.5, "l1": l1, "gms": gms, "clip": NA, "fid": NA}


def minimal_report() -> dict:
    """A schema-3 report.json (docs/report_schema.md) with refinement results in two
    categories; an external system missing one logo case."""
    logo = {"input": _metrics(30.0, 0.01, 0.9),  # best everywhere, but a reference row
            "telea": _metrics(18.0, 0.10, 0.6),
            "aligned_crop": _metrics(17.0, 0.05, 0.7),
            "pbe": _metrics(19.5, 0.08, 0.7)}
    try_on = {"input": _metrics(12.0, 0.2, 0.5), "telea": _metrics(14.0, 0.12, 0.55),
              "aligned_crop": _metrics(16.0, 0.15, 0.65), "pbe": _metrics(11.0, 0.3, 0.4)}
    overall = {m: _metrics(15.0 + i, 0.1 - 0.01 * i, 0.6) for i, m in enumerate(logo)}
    report = good_report()
    report.update({
        "refinement": overall,
        "refinement_by_category": {"logo": logo, "try_on": try_on},
        "refinement_counts": {
            "cases": 5, "by_category": {"logo": 3, "try_on": 2},
            "scored": {"input": 5, "telea": 5, "aligned_crop": 5, "pbe": 4},
            "scored_by_category": {"logo": {"input": 3, "telea": 3, "aligned_crop": 3, "pbe": 2},
                                   "try_on": {"input": 2, "telea": 2, "aligned_crop": 2,
                                              "pbe": 2}}},
    })
    validate_report(report)
    return report


def _block(markdown: str, title: str) -> dict[str, list[str]]:
    """{row label: cells} of the markdown block whose title starts with ``title``."""
    lines = markdown.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"**{title}"))
    rows = {}
    for line in lines[start + 4:]:
        if not line.startswith("|"):
            break
        label, *cells = [c.strip() for c in line.strip("|").split("|")]
        rows[label] = cells
    return rows


def test_blocks_counts_best_marks_and_not_available(tmp_path: Path) -> None:
    path = tmp_path / "run" / "report.json"
    path.parent.mkdir()
    path.write_text(json.dumps(minimal_report()))
    out = paper_table([str(path), "--out", str(tmp_path / "tables")])
    md = out["markdown"]
    assert (tmp_path / "tables" / "paper_table.md").read_text() == md
    assert "**all categories (5 cases)**" in md and "**logo (3 cases)**" in md
    assert "**try_on (2 cases)**" in md
    header = next(line for line in md.splitlines() if line.startswith("| method"))
    assert header.split("|")[3:10] == [" PSNR ↑ ", " SSIM ↑ ", " L1 ↓ ", " GMS ↑ ", " CLIP ↑ ",
                                       " FID ↓ ", ""]
    logo = _block(md, "logo")
    # n per row: the external system scored 2 of the 3 logo cases
    assert logo["pbe"][0] == "2" and logo["Ours, aligned crop"][0] == "3"
    # columns: n, psnr, ssim, l1, gms, clip, fid; input is best everywhere but not ranked
    assert logo["Input (unrefined)"][1:5] == ["30.00", "0.500", "0.010", "0.900"]
    assert logo["pbe"][1] == "**19.50**"  # highest PSNR
    assert logo["Ours, aligned crop"][3] == "**0.050**"  # lowest L1: lower is better
    assert logo["Telea inpainting"][3] == "0.100"
    assert logo["Ours, aligned crop"][4] == logo["pbe"][4] == "**0.700**"  # a tie: both
    assert logo["pbe"][2] == "**0.500**"  # every ranked row ties on SSIM
    assert logo["pbe"][5] == logo["pbe"][6] == "--"  # not available, never bold
    try_on = _block(md, "try_on")
    assert try_on["Ours, aligned crop"][1] == "**16.00**"
    assert try_on["Telea inpainting"][3] == "**0.120**"
    # ranking everyone: input wins the logo block
    everyone = paper_table([str(path), "--unranked"])["markdown"]
    assert _block(everyone, "logo")["Input (unrefined)"][1] == "**30.00**"


def _check_latex(tex: str) -> None:
    """Well-formed tabular: balanced braces and environments, the column count on every row."""
    body = re.sub(r"\\[{}&%$#_]", "", tex)  # escaped characters are text
    body = "\n".join(line for line in body.splitlines() if not line.startswith("%"))
    depth = 0
    for ch in body:
        depth += {"{": 1, "}": -1}.get(ch, 0)
        assert depth >= 0, "a } closes nothing"
    assert depth == 0, "unclosed {"
    assert body.count("\\begin{tabular}") == body.count("\\end{tabular}") == 1
    assert body.index("\\toprule") < body.index("\\midrule") < body.index("\\bottomrule")
    spec = re.search(r"\\begin\{tabular\}\{([lrc]+)\}", body).group(1)
    rows = [line for line in body.splitlines() if line.rstrip().endswith("\\\\")]
    assert rows
    for line in rows:
        if line.startswith("\\multicolumn"):
            assert line.startswith(f"\\multicolumn{{{len(spec)}}}") and "&" not in line
        else:
            assert line.count("&") == len(spec) - 1, line


def test_latex_is_well_formed_and_marks_the_same_best(tmp_path: Path) -> None:
    path = tmp_path / "report.json"
    path.write_text(json.dumps(minimal_report()))
    tex = paper_table([str(path)])["latex"]
    _check_latex(tex)
    assert "\\usepackage" not in tex and "\\toprule" in tex  # booktabs tabular, no preamble
    assert "L1 $\\downarrow$" in tex and "PSNR $\\uparrow$" in tex
    logo = tex[tex.index("logo (3 cases)"):tex.index("try\\_on (2 cases)")]
    assert "pbe & 2 & \\textbf{19.50}" in logo
    assert "Input (unrefined) & 3 & 30.00 & 0.500 & 0.010 & 0.900 & -- & --" in logo
    assert logo.count("\\textbf") == 7  # PSNR, L1, GMS (a tie of 2), SSIM (a tie of 3)
    assert "\\textbf{--}" not in tex


def test_reports_merge_as_rows_labelled_by_report_and_old_names_are_read(tmp_path) -> None:
    new = tmp_path / "new.json"
    new.write_text(json.dumps(minimal_report()))
    old = REPO / "results" / "recipe_gpu" / "eval_default" / "report.json"  # schema 2
    out = paper_table([str(new), str(old), "--labels", "tiny", "gpu_default"])
    md = out["markdown"]
    synthetic = _block(md, "synthetic")  # only the old report has this category
    assert "Ours, whole reference [gpu_default]" in synthetic  # was whole_reference
    assert all(label.endswith("[gpu_default]") for label in synthetic)
    assert synthetic["Ours, aligned crop [gpu_default]"][0] == "100"
    everything = _block(md, "all categories")
    assert {"pbe [tiny]", "Telea inpainting [gpu_default]"} <= set(everything)
    assert "**all categories (5 / 100 cases)**" in md
    _check_latex(out["latex"])
    with pytest.raises(SystemExit):
        paper_table([str(new), str(old), "--labels", "one"])
