"""Convert an export (model.safetensors + model.yaml) into the diffusers pipeline folder.

  python scripts/convert_export.py checkpoints/tiny_synthetic \
      --out checkpoints/tiny_synthetic/diffusers

Writes model_index.json, unet/, reference_encoder/, scheduler/ (and vae/ for latent models),
all weights as safetensors, plus model.yaml, the export's calibrated alignment.yaml and
training_data.yaml (when it has them) and refine_by_align_pipeline.py. Load it with
``RefineByAlignPipeline.from_pretrained(out)``; the UNet alone with
``UNet2DConditionModel.from_pretrained(out, subfolder="unet")``. train.py writes the same
folder to <export>/diffusers at the end of a run.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from models.diffusers_pipeline import convert_export


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("export", type=Path, help="export folder (model.safetensors + model.yaml)")
    p.add_argument("--out", required=True, type=Path, help="diffusers pipeline folder to write")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        out = convert_export(args.export, args.out)
    except (FileNotFoundError, ValueError) as err:
        raise SystemExit(f"convert_export: {args.export}: {err}") from err
    print(f"diffusers pipeline: {out}")


if __name__ == "__main__":
    main()
