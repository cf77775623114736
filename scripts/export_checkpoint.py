"""Turn a Lightning checkpoint of train.py into the pipeline folder that eval.py and refine.py
load (``RefineByAlignPipeline.from_pretrained``), or convert an export of the older layout.

  python scripts/export_checkpoint.py runs/train/<date>/checkpoints/last.ckpt --out export/
  python scripts/export_checkpoint.py .../step0001000.ckpt --out export_raw/ --raw
  python scripts/export_checkpoint.py .../last.ckpt/ --out export/   # FSDP-sharded directory
  python scripts/export_checkpoint.py OLD_EXPORT/ --out export/   # model.safetensors + yaml

Writes the pipeline folder (model_index.json, unet/, reference_encoder/, scheduler/, vae/ for
latent models, model.yaml) to --out; from a checkpoint also source.json (checkpoint, step, EMA
or raw weights, where the model config came from). An older export's calibrated
alignment.yaml becomes the folder's read-out, and its training_data.yaml / tracker.yaml travel.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from models.checkpoint import export_checkpoint


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("checkpoint", type=Path,
                   help=".ckpt file, FSDP-sharded checkpoint dir, or an older export folder")
    p.add_argument("--out", required=True, type=Path, help="pipeline folder to write")
    p.add_argument("--raw", action="store_true",
                   help="export the trained weights, not their EMA (default: EMA if saved)")
    p.add_argument("--config", type=Path, default=None,
                   help="model config when the checkpoint has none: a run's "
                        ".hydra/config.yaml or an export's model.yaml")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        out = export_checkpoint(args.checkpoint, args.out, ema=not args.raw, config=args.config)
    except (FileNotFoundError, ValueError) as err:
        raise SystemExit(f"export_checkpoint: {err}") from err
    print(f"export: {out}")


if __name__ == "__main__":
    main()
