"""Train the reference-conditioned inpainting model: ``python train.py [overrides]``.

With no arguments: the tiny model on on-the-fly synthetic data on CPU (about 10 minutes on
2 cores), then a summary with the checkpoint, logs, final loss and correspondence mIoU.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import hydra
import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from distributed import (
    ValidateAtLastStep,
    check_config,
    use_job_command_for_ddp_children,
    uses_fsdp,
)
from models.checkpoint import ModelConfigInCheckpoint
from models.export import save_export
from models.lightning_module import val_table_from_metrics

log = logging.getLogger(__name__)


def instantiate_group(cfg: DictConfig | None) -> list[Any]:
    """Build every entry of a config group that is a dict of ``_target_`` nodes."""
    if not cfg:
        return []
    return [instantiate(node) for node in cfg.values() if node and "_target_" in node]


def train(cfg: DictConfig) -> dict[str, Any]:
    """Fit the module described by ``cfg``; export EMA weights; return the final metrics."""
    check_config(cfg)
    pl.seed_everything(cfg.seed, workers=True)
    torch.set_float32_matmul_precision("high")
    datamodule = instantiate(cfg.data)
    module = instantiate(cfg.model)
    callbacks = [*instantiate_group(cfg.get("callbacks")), ModelConfigInCheckpoint(cfg.model)]
    if uses_fsdp(cfg.trainer):
        callbacks.append(ValidateAtLastStep())
    trainer: pl.Trainer = instantiate(
        cfg.trainer, callbacks=callbacks, logger=instantiate_group(cfg.get("logger")) or False,
    )
    trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    # stopped between validations (max_time); a ddp_spawn parent (global_step 0) trained nothing
    if trainer.global_step and module.val_step != trainer.global_step:
        if module.fsdp_root() is None:
            trainer.validate(module, datamodule=datamodule)
            metrics.update({k: float(v) for k, v in trainer.callback_metrics.items()})
        else:  # see ValidateAtLastStep: trainer.validate after fit fails under FSDP
            log.warning("FSDP: no validation at the final step %d (trainer.validate after fit "
                        "fails under FSDP); metrics are from step %d", trainer.global_step,
                        module.val_step)

    export_dir = None
    # under FSDP, gathering the whole weights (to rank 0) is a collective: every rank joins
    if trainer.is_global_zero or module.fsdp_root() is not None:
        weights = module.inference_state_dict()
        if trainer.is_global_zero:
            export_dir = save_export(weights, cfg.model, Path(cfg.export_dir))
    val_table = module.val_table or val_table_from_metrics(metrics, cfg.model.val_timestep)
    return {"metrics": metrics, "val_table": val_table, "export_dir": export_dir,
            "checkpoint_dir": getattr(trainer.checkpoint_callback, "dirpath", None),
            "log_dir": cfg.paths.output_dir, "global_step": trainer.global_step}


def format_summary(result: dict[str, Any]) -> str:
    """Human-readable end-of-run summary: where things are, final loss, the mIoU table."""
    metrics, table = result["metrics"], result["val_table"]
    lines = [
        "", "=" * 64, "Training finished",
        f"  steps            : {result['global_step']}",
        f"  logs             : {result['log_dir']}",
        f"  checkpoints      : {result['checkpoint_dir']}",
        f"  exported weights : {result['export_dir']}",
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


@hydra.main(version_base="1.3", config_path="configs", config_name="train")
def main(cfg: DictConfig) -> None:
    log.info("config:\n%s", OmegaConf.to_yaml(cfg, resolve=False))
    use_job_command_for_ddp_children()  # DDP children run this job, not the whole sweep
    result = train(cfg)
    print(format_summary(result))


if __name__ == "__main__":
    main()
