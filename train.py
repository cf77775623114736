"""Train the reference-conditioned inpainting model: ``python train.py [overrides]``.

With no arguments: the tiny model on on-the-fly synthetic data on CPU (about 10 minutes on
2 cores), then a summary with the checkpoint, logs, final loss and correspondence mIoU.

What a run writes (``export_dir``, default ``<run>/export``): the EMA weights as a pipeline
folder (models/export.py: ``model_index.json``, ``unet/``, ``reference_encoder/``,
``scheduler/``, ``vae/`` for latent models, ``model.yaml``, ``training_data.yaml``), which
eval.py, scripts/refine.py, the demo and the notebook load with
``RefineByAlignPipeline.from_pretrained``. Its alignment read-out is the preset's uncalibrated
default until eval.py calibrates it (``write_alignment_to_export=true``).

Hyperparameter search: ``main`` returns the logged metric named by ``optimized_metric``
(None when unset), which Hydra sweepers optimize, e.g.
``python train.py -m hparams_search=tiny_optuna`` (configs/hparams_search/).
"""

from __future__ import annotations

import csv
import functools
import logging
import os
import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any

# waiting OpenMP threads sleep instead of spinning: on a shared CPU, spinning threads made a
# 2-thread step 1.5-7x slower than 1 thread (benchmarks/cpu-2026-11-27)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import hydra
import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.loggers import CSVLogger

from data.provenance import (
    UNKNOWN,
    check_unseen_training_data,
    lineage_record,
    write_training_data,
)
from evaluation.report import format_summary
from evaluation.tracker import write_tracker_record
from models.checkpoint import (
    CheckpointAtTrainEnd,
    ExportAtTrainEnd,
    RunRecordsInCheckpoint,
    checkpoint_training_data,
    warm_start,
)
from models.distributed import (
    ValidateAtLastStep,
    check_config,
    fsdp_root,
    use_job_command_for_ddp_children,
    uses_fsdp,
)
from models.export import save_pretrained
from models.lightning_module import val_table_from_metrics
from models.resolution import check_data_fits_model

log = logging.getLogger(__name__)


def instantiate_group(cfg: DictConfig | None) -> list[Any]:
    """Build every entry of a config group that is a dict of ``_target_`` nodes."""
    if not cfg:
        return []
    return [instantiate(node) for node in cfg.values() if node and "_target_" in node]


def check_checkpoint(path: str | Path) -> dict[str, Any] | None:
    """The resume checkpoint, memory-mapped (the pickled structure is read, not the tensors);
    one that cannot be read is refused, naming it (torch's error does not). A folder (a
    sharded FSDP checkpoint) is left to Lightning: None.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"ckpt_path {path} does not exist")
    if not path.is_file():
        return None
    try:
        return torch.load(path, map_location="cpu", mmap=True, weights_only=False)
    except (RuntimeError, EOFError, pickle.UnpicklingError) as err:
        raise ValueError(f"ckpt_path {path}: unreadable, truncated or corrupt checkpoint "
                         f"({str(err).splitlines()[0]})") from err


def keep_csv_history(loggers: list[Any], step: int) -> None:
    """Keep a resumed run's CSV rows logged before `step`, which Lightning's CSV logger would
    delete (it starts a fresh ``metrics.csv`` in a folder that has one); the rest are logged
    again."""
    for logger in loggers:
        if not isinstance(logger, CSVLogger):
            continue
        path = Path(logger.log_dir) / "metrics.csv"
        if not path.is_file():
            continue
        with path.open(newline="") as file:
            reader = csv.DictReader(file)
            header = list(reader.fieldnames or [])
            rows = [row for row in reader if row.get("step") and float(row["step"]) < step]
        writer = logger.experiment  # deletes the file, on global rank 0 only
        if not hasattr(writer, "metrics_keys"):
            continue
        with path.open("w", newline="") as file:
            out = csv.DictWriter(file, fieldnames=header)
            out.writeheader()
            out.writerows(rows)
        writer.metrics_keys = sorted(header)


def check_cpu_precision(trainer_cfg: DictConfig) -> None:
    """Refuse bf16 training on a CPU without bf16 instructions (AVX512-BF16 or AMX), where
    torch computes it in software: a step took 1.7x the fp32 time with AVX-512 alone and 14x
    with AVX2, against 0.66x with AVX512-BF16 (benchmarks/README.md, "bf16 on the CPU")."""
    on_cpu = trainer_cfg.get("accelerator") == "cpu" or (
        trainer_cfg.get("accelerator") in (None, "auto") and not torch.cuda.is_available())
    precision = str(trainer_cfg.get("precision"))
    if not (on_cpu and precision.startswith("bf16")):
        return
    if torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported():
        return
    raise ValueError(f"trainer.precision={precision} on a CPU without bf16 instructions "
                     f"(AVX512-BF16 or AMX) runs bf16 in software, slower than fp32: "
                     f"use trainer.precision=32-true")


def intra_op_threads(cfg: DictConfig) -> int | None:
    """torch's CPU threads for this run: ``num_threads`` if set; on the CPU accelerator, the
    cores of each training process, less its data workers unless OpenMP's waiting threads
    sleep (``OMP_WAIT_POLICY=PASSIVE``, which this script sets unless told otherwise); else
    None (torch's default). Spinning waiters steal the time slices of the working thread: on
    2 cores, 2 spinning threads beside 1 busy data worker made the main job's step about 2x
    slower than 1. Passive ones do not: 2 threads ran the main job 1.1x faster than 1 beside
    its data worker on an idle machine (benchmarks/README.md, "The CPU main job")."""
    if cfg.get("num_threads"):
        return int(cfg.num_threads)
    if cfg.trainer.get("accelerator") != "cpu":
        return None
    devices = cfg.trainer.get("devices")
    processes = devices if isinstance(devices, int) and devices > 0 else 1
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    per_process = (cores or 1) // processes
    if os.environ.get("OMP_WAIT_POLICY", "").upper() == "PASSIVE":
        return max(1, per_process)
    return max(1, per_process - int(cfg.data.get("num_workers") or 0))


def write_export(cfg: DictConfig, export_dir: Path, inherited: dict[str, Any] | None,
                 weights: dict[str, torch.Tensor], trainer: pl.Trainer) -> Path:
    """Write the run's pipeline folder (see the module docstring) and its records; returns it.
    ``inherited``: the training-data record of the export a warm start began from."""
    export_dir = save_pretrained(weights, cfg.model, export_dir)
    write_training_data(cfg.data, export_dir, inherited)
    write_tracker_record(trainer.loggers, export_dir)  # eval.py logger=wandb resumes it
    return export_dir


def train(cfg: DictConfig) -> dict[str, Any]:
    """Fit the module described by ``cfg``; export EMA weights; return the final metrics."""
    check_config(cfg)
    check_cpu_precision(cfg.trainer)
    check_data_fits_model(cfg.model, cfg.data)  # before anything is built or loaded
    stored, resume_step = None, None
    if cfg.get("ckpt_path"):  # read once, memory-mapped, and not held during the fit
        checkpoint = check_checkpoint(cfg.ckpt_path)
        stored = checkpoint_training_data(cfg.ckpt_path, checkpoint)
        resume_step = None if checkpoint is None else int(checkpoint["global_step"])
        del checkpoint
    pl.seed_everything(cfg.seed, workers=True)
    torch.set_float32_matmul_precision("high")
    threads = intra_op_threads(cfg)
    if threads:
        torch.set_num_threads(threads)
        log.info("torch CPU threads: %d", threads)
    datamodule = instantiate(cfg.data)
    module = instantiate(cfg.model)
    inherited, continued = None, []
    if cfg.get("init_from"):
        start = warm_start(module, cfg.init_from)
        inherited = start.training_data or {"unknown": {"source": UNKNOWN}}
        check_unseen_training_data(cfg.data, inherited)
        continued = start.callbacks
    if stored is not None and stored != lineage_record(cfg.data, inherited):
        inherited = stored  # resumed on other data: the data before stays recorded
    # export_dir resolved here: a ddp_spawn child, which exports, has no Hydra config
    exporter = ExportAtTrainEnd(
        functools.partial(write_export, cfg, Path(cfg.export_dir), inherited))
    callbacks = [*instantiate_group(cfg.get("callbacks")), *continued, CheckpointAtTrainEnd(),
                 exporter,
                 RunRecordsInCheckpoint(cfg.model, lineage_record(cfg.data, inherited))]
    if uses_fsdp(cfg.trainer):
        callbacks.append(ValidateAtLastStep())
    loggers = instantiate_group(cfg.get("logger"))
    if resume_step is not None:
        keep_csv_history(loggers, resume_step)
    trainer: pl.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    # stopped between validations (max_time); a ddp_spawn parent (global_step 0) trained nothing
    if trainer.global_step and module.val_step != trainer.global_step:
        if fsdp_root(trainer) is None:
            trainer.validate(module, datamodule=datamodule)
            metrics.update({k: float(v) for k, v in trainer.callback_metrics.items()})
        else:  # see ValidateAtLastStep: trainer.validate after fit fails under FSDP
            log.warning("FSDP: no validation at the final step %d (trainer.validate after fit "
                        "fails under FSDP); metrics are from step %d", trainer.global_step,
                        module.val_step)

    # written by global rank 0 when fitting ended (a ddp_spawn parent only sees its children)
    export_dir = exporter.written
    val_table = module.val_table or val_table_from_metrics(metrics, cfg.model.val_timestep)
    return {"metrics": metrics, "val_table": val_table, "export_dir": export_dir,
            "checkpoint_dir": getattr(trainer.checkpoint_callback, "dirpath", None),
            "log_dir": cfg.paths.output_dir, "global_step": trainer.global_step}




def optimized_metric_value(metrics: Mapping[str, float], name: str | None) -> float | None:
    """The value a sweeper optimizes: ``metrics[name]``, None when no name is set.

    A name that was not logged fails the run, listing what was: returning None or a default
    would let a search rank its trials on nothing.
    """
    if not name:
        return None
    if name not in metrics:
        logged = ", ".join(sorted(metrics)) or "none"
        raise ValueError(f"optimized_metric {name!r} was not logged by this run; logged metrics: "
                       f"{logged}")
    return float(metrics[name])


@hydra.main(version_base="1.3", config_path="configs", config_name="train")
def main(cfg: DictConfig) -> float | None:
    """Train, print the summary, return ``cfg.optimized_metric``'s value (for sweepers)."""
    log.info("config:\n%s", OmegaConf.to_yaml(cfg, resolve=False))
    try:
        check_data_fits_model(cfg.model, cfg.data)
    except ValueError as err:  # a refusal, not a crash: one line, no traceback
        raise SystemExit(f"train.py: {err}") from None
    use_job_command_for_ddp_children()  # DDP children run this job, not the whole sweep
    result = train(cfg)
    print(format_summary(result))
    value = optimized_metric_value(result["metrics"], cfg.get("optimized_metric"))
    if value is not None:
        log.info("optimized metric %s = %.6f", cfg.optimized_metric, value)
    return value


if __name__ == "__main__":
    main()
