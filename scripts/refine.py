"""Refine images: align on the whole reference, then refine the masked region from the crop.

  python scripts/refine.py --image gen.png --mask mask.png --reference ref.png --out out/
  python scripts/refine.py ... --ckpt checkpoints/tiny_synthetic --alignment alignment.yaml
  python scripts/refine.py ... --padding-mask-crop 16        # a small artifact, large image
  python scripts/refine.py --bench-dir cases/ --out out/      # every case of a folder
  python scripts/refine.py ... --device cuda --dtype bf16      # reduced precision on a GPU

Writes out/refined.png (pixels outside the mask are the input file's, bit for bit),
out/correspondence.png (reference, heat map of the chosen block/timestep, chosen box) and
out/crop.png; with --bench-dir, one such folder per case (out/<case id>/). Images may be any
size: models.pipeline.RefineByAlignPipeline runs the model at its own resolution (on the whole
image, or on a padded crop around the mask with --padding-mask-crop) and blends the generated
content back at the image's.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from data.benchmark import load_benchmark
from evaluation.figures import correspondence_image
from models.export import load_pipeline
from models.pipeline import RefineByAlignPipeline, RefinementConfig, check_case, read_alignment
from models.refinement import SAMPLERS

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

log = logging.getLogger("refine")


def optional_int(text: str) -> int | None:
    """An int, or None for 'none' / 'off'."""
    return None if text.lower() in ("none", "off") else int(text)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--image", type=Path, help="generated image with artifacts")
    p.add_argument("--mask", type=Path, help="artifact mask, nonzero = artifact")
    p.add_argument("--reference", type=Path, help="reference image, any size")
    p.add_argument("--bench-dir", type=Path, default=None,
                   help="refine every case of a benchmark folder (docs/benchmark_format.md) "
                        "instead of --image/--mask/--reference")
    p.add_argument("--out", required=True, type=Path, help="output folder")
    p.add_argument("--ckpt", type=Path, default=None,
                   help="pipeline folder (model_index.json, unet/, ...); default: shipped one")
    p.add_argument("--alignment", type=Path, default=None,
                   help="yaml with timestep, block, threshold, margin (as eval.py writes into "
                        "its run folder); default: the folder's own read-out (calibrated by "
                        "eval.py, else the model preset's default, with a warning)")
    defaults = RefinementConfig()
    tuned = "chosen for the shipped model; another model: scripts/compare_samplers.py"
    p.add_argument("--steps", type=int, default=defaults.num_steps,
                   help=f"sampling steps (default {defaults.num_steps}, {tuned})")
    p.add_argument("--guidance", type=float, default=defaults.guidance_scale,
                   help=f"classifier-free guidance scale, 1 = none (default "
                        f"{defaults.guidance_scale:g}, {tuned})")
    p.add_argument("--sampler", choices=sorted(SAMPLERS), default=defaults.sampler,
                   help=f"default {defaults.sampler}")
    p.add_argument("--dilate", type=int, default=defaults.dilate,
                   help="grow the mask by this many pixels (of the input image) before blending")
    p.add_argument("--feather", type=int, default=defaults.feather)
    p.add_argument("--padding-mask-crop", type=optional_int, default=defaults.padding_mask_crop,
                   help="refine a square crop around the mask grown by this many px (at least "
                        "the model's size) instead of the whole image; 'none': the whole image "
                        f"(default {defaults.padding_mask_crop})")
    p.add_argument("--final-x0-timestep", type=optional_int, default=defaults.final_x0_timestep,
                   help="stop sampling at the first step at or below this timestep and keep the "
                        "model's clean-image prediction; 'none': sample to the end (default "
                        f"{defaults.final_x0_timestep})")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32",
                   help="bf16 / fp16 autocast on a GPU")
    args = p.parse_args(argv)
    single = (args.image, args.mask, args.reference)
    if args.bench_dir is None and not all(single):
        p.error("give --image, --mask and --reference, or --bench-dir")
    if args.bench_dir is not None and any(single):
        p.error("--bench-dir refines a folder: leave out --image, --mask and --reference")
    return args


def read_rgb(path: Path) -> np.ndarray:
    """Any Pillow-readable image -> uint8 HxWx3, with a clear error for missing/unreadable."""
    if not path.is_file():
        raise FileNotFoundError(f"file not found: {path}")
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB")).copy()
    except (UnidentifiedImageError, OSError) as err:
        raise ValueError(f"cannot read image {path}: {err}") from err


def read_mask(path: Path) -> np.ndarray:
    """Mask file -> bool HxW: any nonzero channel is artifact (grayscale or RGB)."""
    if not path.is_file():
        raise FileNotFoundError(f"file not found: {path}")
    try:
        with Image.open(path) as im:
            arr = np.asarray(im.convert("RGB") if im.mode not in ("1", "L", "I", "F") else im)
    except (UnidentifiedImageError, OSError) as err:
        raise ValueError(f"cannot read mask {path}: {err}") from err
    return arr.any(axis=-1) if arr.ndim == 3 else arr != 0


def save_correspondence(reference: np.ndarray, heat: np.ndarray, box: tuple[int, ...],
                        path: Path) -> None:
    """The reference at its own pixel size with the heat map and the chosen box drawn over."""
    Image.fromarray(correspondence_image(reference, heat, box)).save(path)


def write_outputs(out: Path, refined: np.ndarray, reference: np.ndarray, found) -> dict[str, Path]:
    """refined.png, correspondence.png and crop.png of one case."""
    out.mkdir(parents=True, exist_ok=True)
    crop = (found.crop.float().cpu().clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
    files = {"refined": out / "refined.png", "correspondence": out / "correspondence.png",
             "crop": out / "crop.png"}
    Image.fromarray(refined).save(files["refined"])
    save_correspondence(reference, found.heat.float().cpu().numpy(), found.box,
                        files["correspondence"])
    Image.fromarray(crop).save(files["crop"])
    return files


def build_pipeline(args: argparse.Namespace) -> tuple[RefineByAlignPipeline, RefinementConfig]:
    """The loaded pipeline (with --alignment deployed, if given) and the sampling settings."""
    pipe = load_pipeline(args.ckpt, args.device)
    if args.alignment is not None:
        pipe.set_alignment(read_alignment(args.alignment), f"--alignment {args.alignment}")
    pipe.autocast_dtype = DTYPES[args.dtype]
    refinement = RefinementConfig(
        sampler=args.sampler, num_steps=args.steps, guidance_scale=args.guidance,
        dilate=args.dilate, feather=args.feather, padding_mask_crop=args.padding_mask_crop,
        final_x0_timestep=args.final_x0_timestep)
    log.info("model size %d px, %s", pipe.image_size, pipe.describe(refinement))
    return pipe, refinement


def run(args: argparse.Namespace) -> dict[str, Path]:
    """Both stages on one image, or on every case of --bench-dir; returns the written files."""
    if args.bench_dir is not None:
        return run_folder(args)
    image, mask = read_rgb(args.image), read_mask(args.mask)
    reference = read_rgb(args.reference)
    check_case(image, mask, reference)
    pipe, refinement = build_pipeline(args)
    out = pipe(image, mask, reference, refinement, seed=args.seed, progress=True)
    found = out.alignments[0]
    log.info("alignment box (x0, y0, x1, y1) on the reference: %s", found.box)
    return write_outputs(args.out, out.images[0], reference, found)


def run_folder(args: argparse.Namespace) -> dict[str, Path]:
    """Every readable case of a benchmark folder; malformed cases are named and skipped."""
    from tqdm.auto import tqdm

    if not args.bench_dir.is_dir():
        raise FileNotFoundError(f"benchmark folder not found: {args.bench_dir}")
    cases, skipped = load_benchmark(args.bench_dir)
    for case_id, reason in skipped:
        log.warning("skipped case %s: %s", case_id, reason)
    if not cases:
        raise ValueError(f"no case of {args.bench_dir} could be read ({len(skipped)} skipped)")
    pipe, refinement = build_pipeline(args)
    files = {}
    for case in tqdm(cases, desc="refine", unit="case"):
        out = pipe(case.image, case.mask, case.reference, refinement, seed=args.seed)
        files[case.id] = write_outputs(args.out / case.id, out.images[0], case.reference,
                                       out.alignments[0])["refined"]
    log.info("refined %d cases, skipped %d", len(cases), len(skipped))
    return files


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    try:
        files = run(args)
    except (FileNotFoundError, ValueError) as err:
        log.error("%s", err)
        return 2
    for name, path in files.items():
        log.info("wrote %s: %s", name, path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
