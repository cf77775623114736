"""Refine one image: align on the whole reference, then refine the masked region from the crop.

  python scripts/refine.py --image gen.png --mask mask.png --reference ref.png --out out/
  python scripts/refine.py ... --ckpt checkpoints/tiny_synthetic --alignment alignment.yaml

Writes out/refined.png (pixels outside the mask are the input file's, bit for bit),
out/correspondence.png (reference, heat map of the chosen block/timestep, chosen box) and
out/crop.png. The image may be any size: the model runs at its own resolution and the
generated content is upsampled and blended at the image's.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

if __package__ in (None, ""):  # run as a file: make the repo root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from evaluation.figures import correspondence_overlay  # noqa: E402
from evaluation.refinement import reference_tensor, refine_batch, to_model_inputs  # noqa: E402
from evaluation.sweep import model_image_size  # noqa: E402
from models.export import load_export  # noqa: E402
from models.pipeline import RefineByAlign, RefinementConfig, load_alignment  # noqa: E402
from models.refinement import SAMPLERS  # noqa: E402

log = logging.getLogger("refine")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--image", required=True, type=Path, help="generated image with artifacts")
    p.add_argument("--mask", required=True, type=Path, help="artifact mask, nonzero = artifact")
    p.add_argument("--reference", required=True, type=Path, help="reference image, any size")
    p.add_argument("--out", required=True, type=Path, help="output folder")
    p.add_argument("--ckpt", type=Path, default=None,
                   help="export folder (model.safetensors + model.yaml); default: shipped one")
    p.add_argument("--alignment", type=Path, default=None,
                   help="yaml with timestep, block, threshold, margin (as written by eval.py); "
                        "default: the export's alignment.yaml (written by eval.py's calibration), "
                        "else configs/alignment/default.yaml")
    defaults = RefinementConfig()
    p.add_argument("--steps", type=int, default=defaults.num_steps)
    p.add_argument("--guidance", type=float, default=defaults.guidance_scale)
    p.add_argument("--sampler", choices=sorted(SAMPLERS), default=defaults.sampler)
    p.add_argument("--dilate", type=int, default=defaults.dilate,
                   help="grow the mask by this many pixels (of the input image) before blending")
    p.add_argument("--feather", type=int, default=defaults.feather)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return p.parse_args(argv)


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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    height, width = reference.shape[:2]
    fig = plt.figure(figsize=(width / 100, height / 100), dpi=100)
    correspondence_overlay(fig.add_axes((0, 0, 1, 1)), reference, heat, box=box)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run(args: argparse.Namespace) -> dict[str, Path]:
    """Both stages on one image; returns the written files."""
    image, mask = read_rgb(args.image), read_mask(args.mask)
    reference = read_rgb(args.reference)
    if mask.shape != image.shape[:2]:
        raise ValueError(f"mask size {mask.shape[1]}x{mask.shape[0]} does not match image size "
                         f"{image.shape[1]}x{image.shape[0]}")
    if not mask.any():
        raise ValueError(f"mask {args.mask} is empty: nothing to refine")

    components = load_export(args.ckpt, args.device)
    alignment_cfg = load_alignment(args.alignment, args.ckpt)
    pipeline = RefineByAlign(
        components, alignment_cfg,
        RefinementConfig(args.sampler, args.steps, args.guidance, args.dilate, args.feather),
    )
    size = model_image_size(components)
    log.info("model size %d px, image %dx%d, alignment %s", size, image.shape[1],
             image.shape[0], alignment_cfg)
    model_image, model_mask = to_model_inputs(image, mask, size)
    device = pipeline.device
    found = pipeline.align(model_image.to(device), model_mask.to(device),
                           reference_tensor(reference)[None].to(device), args.seed)
    log.info("alignment box (x0, y0, x1, y1) on the reference: %s", found.box)
    refined = refine_batch(pipeline, [image], [mask], [found.crop.float().cpu()], args.seed,
                           progress=True)[0]

    args.out.mkdir(parents=True, exist_ok=True)
    crop = (found.crop.float().cpu().clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
    files = {"refined": args.out / "refined.png", "correspondence": args.out / "correspondence.png",
             "crop": args.out / "crop.png"}
    Image.fromarray(refined).save(files["refined"])
    save_correspondence(reference, found.heat.float().cpu().numpy(), found.box,
                        files["correspondence"])
    Image.fromarray(crop).save(files["crop"])
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
