"""The benchmark folder format (docs/benchmark_format.md): synthetic writer and strict reader.

BENCH_DIR/<case_id>/ image.* mask.* reference.* [reference_mask.*] [target.*] [meta.json]
Any Pillow-readable extension is accepted. Malformed cases are returned with a reason rather
than dropped, so every report can say what it skipped.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from data.artifacts import ARTIFACTS, apply_artifact
from data.masks import MaskConfig
from data.modes import resize_image, resize_mask
from data.synthetic import item_generators, make_pair, working_sizes

log = logging.getLogger(__name__)

REQUIRED = ("image", "mask", "reference")
OPTIONAL = ("reference_mask", "target")
# artifacts sit mostly on logos / lettering, as in generated images
BENCHMARK_MASKS = MaskConfig(p_detail=0.8, p_brush=0.1, p_box=0.1, min_area=0.02, max_area=0.35)


@dataclass
class BenchmarkCase:
    """One benchmark case as arrays (masks are bool, images uint8 RGB)."""

    id: str
    image: np.ndarray
    mask: np.ndarray
    reference: np.ndarray
    reference_mask: np.ndarray | None = None
    target: np.ndarray | None = None
    meta: dict = field(default_factory=dict)

    @property
    def category(self) -> str:
        return str(self.meta.get("category", "uncategorised"))


# ----------------------------------------------------------------------------- writing
def _save_png(path: Path, array: np.ndarray) -> None:
    if array.dtype == bool:
        array = array.astype(np.uint8) * 255
    Image.fromarray(array).save(path)


def write_case(case_dir: str | Path, image: np.ndarray, mask: np.ndarray, reference: np.ndarray,
               reference_mask: np.ndarray | None = None, target: np.ndarray | None = None,
               meta: dict | None = None) -> Path:
    """Write one case folder in the benchmark format."""
    d = Path(case_dir)
    d.mkdir(parents=True, exist_ok=True)
    if mask.shape != image.shape[:2]:
        raise ValueError(f"mask {mask.shape} does not match image {image.shape[:2]}")
    _save_png(d / "image.png", image)
    _save_png(d / "mask.png", mask.astype(bool))
    _save_png(d / "reference.png", reference)
    if reference_mask is not None:
        _save_png(d / "reference_mask.png", reference_mask.astype(bool))
    if target is not None:
        _save_png(d / "target.png", target)
    if meta is not None:
        (d / "meta.json").write_text(json.dumps(meta, indent=1))
    return d


def write_synthetic_benchmark(
    root: str | Path, num: int, seed: int, image_size: int = 64, reference_size: int = 224,
    artifacts: Sequence[str] | None = None, mask_config: MaskConfig | None = None,
    progress: Callable[[int], None] | None = None, namespace: str = "benchmark",
) -> list[str]:
    """Write `num` synthetic cases (artifact kinds cycled for balance); returns case ids.

    Case i is item i of the generator seeded with `seed` in the "benchmark" seed namespace
    (data/synthetic.py), so it is no training or validation item whatever the seeds; meta.json
    records namespace, seed and index (data/provenance.py checks them against an export).

    image.png is the target view with an artifact inside mask.png; reference.png is the
    complete reference view at max(image_size, reference_size); reference_mask.png is the
    mask's true region on it; target.png is the artifact-free target view.
    """
    kinds = list(artifacts) if artifacts else list(ARTIFACTS)
    ref_res, tgt_res = working_sizes(image_size, reference_size)
    root = Path(root)
    ids = []
    for i in range(num):
        content, art_rng = item_generators(seed, i, namespace)
        pair = make_pair(content, ref_res, tgt_res, mask_config or BENCHMARK_MASKS)
        target = resize_image(pair.target.rgb, image_size)
        mask = resize_mask(pair.mask, image_size)
        kind = kinds[i % len(kinds)]
        image = apply_artifact(kind, target, mask, art_rng)
        case_id = f"{i:05d}"
        meta = {"category": "synthetic", "artifact": kind, "namespace": namespace,
                "seed": seed, "index": i, "mask_kind": pair.mask_kind}
        write_case(root / case_id, image, mask, pair.reference.rgb, pair.reference_region,
                   target, meta)
        ids.append(case_id)
        if progress is not None:
            progress(1)
    return ids


# ----------------------------------------------------------------------------- reading
class CaseError(ValueError):
    """A malformed case; the message is the reason reported to the user."""


def _find(case_dir: Path, stem: str) -> Path | None:
    """The file named `stem` with any extension; .png preferred if several exist."""
    cands = sorted(p for p in case_dir.iterdir() if p.is_file() and p.stem == stem)
    if not cands:
        return None
    pngs = [p for p in cands if p.suffix.lower() == ".png"]
    return (pngs or cands)[0]


def _read(path: Path, as_mask: bool) -> np.ndarray:
    try:
        with Image.open(path) as im:
            im.load()
            if not as_mask:
                return np.asarray(im.convert("RGB"))
            if im.mode in ("RGB", "RGBA", "P", "PA", "CMYK", "YCbCr", "LAB", "HSV", "LA"):
                arr = np.asarray(im.convert("RGB"))
                return arr.any(axis=-1)
            return np.asarray(im) != 0
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as err:
        raise CaseError(f"unreadable {path.name}: {err.__class__.__name__}: {err}") from err


def load_case(case_dir: str | Path) -> BenchmarkCase:
    """Read one case folder; raises CaseError with the reason when it is malformed."""
    d = Path(case_dir)
    paths = {name: _find(d, name) for name in (*REQUIRED, *OPTIONAL)}
    missing = [n for n in REQUIRED if paths[n] is None]
    if missing:
        raise CaseError(f"missing required file(s): {', '.join(missing)}")
    image = _read(paths["image"], as_mask=False)
    mask = _read(paths["mask"], as_mask=True)
    reference = _read(paths["reference"], as_mask=False)
    if mask.shape != image.shape[:2]:
        raise CaseError(f"mask size {mask.shape[::-1]} != image size {image.shape[1::-1]}")
    if not mask.any():
        raise CaseError("empty mask")
    reference_mask = target = None
    if paths["reference_mask"] is not None:
        reference_mask = _read(paths["reference_mask"], as_mask=True)
        if reference_mask.shape != reference.shape[:2]:
            raise CaseError(f"reference_mask size {reference_mask.shape[::-1]} != reference "
                            f"size {reference.shape[1::-1]}")
        if not reference_mask.any():
            raise CaseError("empty reference_mask")
    if paths["target"] is not None:
        target = _read(paths["target"], as_mask=False)
        if target.shape != image.shape:
            raise CaseError(f"target size {target.shape[1::-1]} != image size "
                            f"{image.shape[1::-1]}")
    meta: dict = {}
    meta_path = d / "meta.json"
    if meta_path.is_file():
        try:
            meta = json.loads(meta_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise CaseError(f"invalid meta.json: {err}") from err
        if not isinstance(meta, dict):
            raise CaseError("meta.json is not a JSON object")
    return BenchmarkCase(d.name, image, mask, reference, reference_mask, target, meta)


def load_benchmark(root: str | Path) -> tuple[list[BenchmarkCase], list[tuple[str, str]]]:
    """All cases under `root` in sorted order, plus (case_id, reason) for each skipped one.

    A malformed optional file (reference_mask / target / meta.json) also skips the case:
    silently ignoring it would score the case differently from what its author intended.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"benchmark folder not found: {root}")
    cases: list[BenchmarkCase] = []
    skipped: list[tuple[str, str]] = []
    for case_dir in sorted(p for p in root.iterdir() if p.is_dir() and p.name[0] != "."):
        try:
            cases.append(load_case(case_dir))
        except CaseError as err:
            log.warning("skipping case %s: %s", case_dir.name, err)
            skipped.append((case_dir.name, str(err)))
    log.info("loaded %d cases from %s, skipped %d", len(cases), root, len(skipped))
    return cases, skipped
