"""Other systems' outputs, scored beside ours: ``python eval.py external_methods.NAME=DIR``.

``DIR`` holds one ``<case id>.png`` per benchmark case: the system's full edited image at the
case's image size (another size is resized, with a warning naming the cases). Each NAME is
scored by the refinement evaluation with the same metrics as our methods, in the same tables
(overall, per category, per case), and paired case by case with each of our methods
(:func:`paired_with_ours`). A case without a file is named (log, report warnings,
``external_methods.NAME.missing``): the NAME's rows average the cases it has, and the paired
statistics use the cases both have, with the count shown.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from data.benchmark import BenchmarkCase
from evaluation.paired import paired_metrics

log = logging.getLogger(__name__)

EXTENSION = ".png"
PAIRED_METRICS = ("psnr", "ssim", "l1", "gms", "clip", "dino")


class ExternalError(ValueError):
    """An external method that cannot be scored (no folder, no case, a clashing name)."""


def _listed(ids: Sequence[str], limit: int = 10) -> str:
    return ", ".join(ids[:limit]) + (f" ... ({len(ids)} in all)" if len(ids) > limit else "")


@dataclass
class ExternalOutputs:
    """One external system's images for the cases it has, and what it lacks."""

    name: str
    directory: Path
    outputs: dict[str, np.ndarray] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)
    resized: list[str] = field(default_factory=list)
    unused: list[str] = field(default_factory=list)  # files that are no case evaluated here

    def summary(self) -> dict[str, Any]:
        """report.json's ``external_methods.<name>``."""
        return {"dir": str(self.directory), "cases_scored": len(self.outputs),
                "missing": list(self.missing), "resized": list(self.resized),
                "unused_files": len(self.unused)}

    def warning(self, total: int) -> str | None:
        """The report's warning when cases are missing, else None."""
        if not self.missing:
            return None
        return (f"EXTERNAL {self.name}: {len(self.missing)} of {total} case(s) have no "
                f"{EXTENSION} in {self.directory} ({_listed(self.missing)}); its rows average "
                f"the other {len(self.outputs)}, paired statistics use the cases both have")


def read_output(path: Path, size: tuple[int, int]) -> tuple[np.ndarray, bool]:
    """An RGB uint8 image at ``size`` (H, W), and whether it had to be resized."""
    try:
        with Image.open(path) as im:
            image = im.convert("RGB")
    except Exception as err:
        raise ExternalError(f"{path}: unreadable image ({err.__class__.__name__}: {err})"
                            ) from err
    if image.size == (size[1], size[0]):
        return np.asarray(image).copy(), False
    return np.asarray(image.resize((size[1], size[0]), Image.Resampling.BICUBIC)), True


def load_external(name: str, directory: str | Path, cases: Sequence[BenchmarkCase]
                  ) -> ExternalOutputs:
    """``directory``'s ``<case id>.png`` for each of ``cases``; loud when it has none."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ExternalError(f"external method {name}: {directory} is not a folder")
    found = ExternalOutputs(name, directory)
    wanted = {c.id for c in cases}
    found.unused = sorted(p.name for p in directory.iterdir()
                          if p.suffix.lower() != EXTENSION or p.stem not in wanted)
    for case in cases:
        path = directory / f"{case.id}{EXTENSION}"
        if not path.is_file():
            found.missing.append(case.id)
            continue
        image, resized = read_output(path, case.image.shape[:2])
        found.outputs[case.id] = image
        if resized:
            found.resized.append(case.id)
    if not found.outputs:
        raise ExternalError(f"external method {name}: none of the {len(cases)} case(s) has a "
                            f"<case id>{EXTENSION} in {directory} (e.g. {cases[0].id}"
                            f"{EXTENSION})")
    if found.resized:
        log.warning("external method %s: %d output(s) not at their case's image size, resized "
                    "(bicubic): %s", name, len(found.resized), _listed(found.resized))
    if found.missing:
        log.warning("external method %s: no output for %d case(s): %s", name,
                    len(found.missing), _listed(found.missing))
    log.info("external method %s: %d case(s) from %s", name, len(found.outputs), directory)
    return found


def load_external_methods(methods: Mapping[str, str] | None, cases: Sequence[BenchmarkCase],
                          reserved: Sequence[str] = ()) -> dict[str, ExternalOutputs]:
    """Every ``external_methods`` entry {NAME: DIR}; a NAME among ``reserved`` (our methods)
    is refused."""
    clash = sorted(set(methods or {}) & set(reserved))
    if clash:
        raise ExternalError(f"external method name(s) {clash} are names of our methods; "
                            "choose others")
    return {name: load_external(name, directory, cases)
            for name, directory in (methods or {}).items()}


def paired_with_ours(per_case: Mapping[str, Mapping[str, Mapping[str, Any]]],
                     external: Iterable[str], ours: Sequence[str],
                     metrics: Sequence[str] = PAIRED_METRICS) -> dict[str, Any]:
    """For each method named in ``external`` (other systems, baselines such as
    Paint-by-Example) and each of ``ours``: ours minus it per metric, over the cases both
    scored (:func:`evaluation.paired.paired_metrics`), with the case count and how many cases
    ours wins."""
    out: dict[str, Any] = {}
    for name in external:
        rows = {}
        for method in ours:
            if method not in per_case:
                continue
            found = paired_metrics(per_case[name], per_case[method], metrics)
            rows[method] = {metric: {"cases": r["cases"],
                                     "mean_difference": r["mean_difference"],
                                     "ci95": r["ci95"], "ours_better_cases": r["b_better_cases"]}
                            for metric, r in found.items()}
        out[name] = {"difference": f"ours - {name}", "vs": rows}
    return out
