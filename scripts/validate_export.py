"""Re-measure an export's held-out correspondence mIoU exactly as training validation does.

    python scripts/validate_export.py [--ckpt PIPELINE_DIR] [--val-length 256] [--timestep 300]

Rebuilds the LightningModule from the folder's model.yaml, loads its (EMA) weights and runs
one validation epoch over the synthetic alignment-mode validation set (same seed as training),
then prints the per-block table next to the two trivial baselines. This is how the numbers in
checkpoints/tiny_synthetic/MODEL_CARD.md are reproduced on any machine.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytorch_lightning as pl
from hydra.utils import instantiate
from omegaconf import OmegaConf

from data.datamodule import PairDataModule
from evaluation.report import format_summary
from models.export import CONFIG, DEFAULT_EXPORT, read_weights


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", type=Path, default=DEFAULT_EXPORT)
    parser.add_argument("--val-length", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=128,
                        help="as in training: the validation noise is drawn per batch")
    parser.add_argument("--timestep", type=int, default=None, help="default: the export's")
    parser.add_argument("--accelerator", default="auto")
    parser.add_argument("--out", type=Path, default=None, help="write the table as JSON")
    args = parser.parse_args(argv)

    cfg = OmegaConf.load(args.ckpt / CONFIG)
    cfg.ema_decay = None  # the export already holds the EMA weights
    if args.timestep is not None:
        cfg.val_timestep = args.timestep
    module = instantiate(cfg)
    weights = read_weights(args.ckpt)
    for name in ("denoiser", "reference_encoder"):
        prefix = f"{name}."
        getattr(module, name).load_state_dict(
            {k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)})
    image_size = int(cfg.denoiser.config.sample_size) if cfg.denoiser.get("config") else 512
    data = PairDataModule(image_size=image_size, val_length=args.val_length,
                          batch_size=args.batch_size)
    trainer = pl.Trainer(accelerator=args.accelerator, devices=1, logger=False,
                         enable_checkpointing=False, enable_model_summary=False)
    trainer.validate(module, datamodule=data)
    result = {"metrics": {k: float(v) for k, v in trainer.callback_metrics.items()},
              "val_table": module.val_table, "export_dir": args.ckpt, "checkpoint_dir": None,
              "log_dir": None, "global_step": "(export)"}
    print(format_summary(result).replace("Training finished", f"Validation of {args.ckpt}"))
    if args.out:
        args.out.write_text(json.dumps(module.val_table, indent=1))
    return module.val_table


if __name__ == "__main__":
    main()
