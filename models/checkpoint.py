"""Lightning checkpoints -> the pipeline folder (see models/export.py).

Takes any checkpoint train.py writes: ``last.ckpt``, ``stepNNNNNNN.ckpt``, or the directory of
an FSDP-sharded one (``trainer=fsdp``: distributed-checkpoint shards + ``meta.pt``), and an
export of the older layout (``model.safetensors`` + ``model.yaml``), which is converted. The
folder holds the EMA weights when the checkpoint has them (what train.py exports), else, or
with ``ema=False``, the trained weights themselves.

The model config that rebuilds the weights comes, in this order, from: an explicit file; the
checkpoint itself (train.py stores the resolved ``cfg.model`` under :data:`MODEL_CONFIG_KEY`);
the Hydra run folder around it (``<run>/checkpoints/x.ckpt`` -> ``<run>/.hydra/config.yaml``).
Lightning's own ``hyper_parameters`` cannot serve: the module is handed built components, so
they hold only its scalar settings.

:class:`ExportAtTrainEnd` is how train.py exports when fitting ends: the same weights
(``inference_state_dict`` inside the EMA swap) handed to a writer of train.py's.
:func:`warm_start` is its ``init_from``: from an export, or continuing a checkpoint's weights,
EMA and optimizer moments on new data.
"""

from __future__ import annotations

import json
import logging
import tempfile
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from data.provenance import normalized, read_training_data
from models.distributed import fsdp_root
from models.ema import CHECKPOINT_KEY as EMA_KEY
from models.ema import EMA, ema_weights
from models.export import (
    CONFIG,
    check_finite,
    convert_legacy,
    is_legacy_export,
    is_pipeline_folder,
    read_weights,
    save_pretrained,
)

log = logging.getLogger(__name__)

MODEL_CONFIG_KEY = "model_config"
TRAINING_DATA_KEY = "training_data"
FSDP_META = "meta.pt"  # Lightning's metadata file inside a sharded checkpoint directory
SOURCE = "source.json"  # provenance written next to the exported weights


class RunRecordsInCheckpoint(pl.Callback):
    """Store the resolved model config and the run's training-data lineage
    (:func:`data.provenance.lineage_record`) in every checkpoint, so that it exports on its
    own and a run continued from it on other data still records what it was trained on."""

    def __init__(self, model_cfg: DictConfig, training_data: dict[str, Any]) -> None:
        self.model_cfg = OmegaConf.to_container(model_cfg, resolve=True)
        self.training_data = training_data

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        checkpoint[MODEL_CONFIG_KEY] = self.model_cfg
        checkpoint[TRAINING_DATA_KEY] = self.training_data


class ExportAtTrainEnd(pl.Callback):
    """When fitting ends, hand the inference weights (the EMA ones when kept) and the trainer
    to ``write`` on global rank 0; what it returns is kept in ``written``.

    Not after an error (Lightning calls no ``on_train_end`` then): a diverged run exports
    nothing. Under FSDP every rank joins the gathering of the weights (a collective).
    """

    def __init__(self, write: Callable[[dict[str, torch.Tensor], pl.Trainer], Any]) -> None:
        self.write = write
        self.written: Any = None

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not (trainer.is_global_zero or fsdp_root(trainer) is not None):
            return
        with ema_weights(trainer, pl_module):
            weights = pl_module.inference_state_dict()
        if trainer.is_global_zero:
            self.written = self.write(weights, trainer)


class CheckpointAtTrainEnd(pl.Callback):
    """Write ``last.ckpt`` when fitting ends. Lightning's ``save_last`` writes it at the end
    only if no ``last.ckpt`` was written during the run, so a run longer than one checkpoint
    interval, stopped by ``max_time`` or by ``max_steps`` between two saves, kept one up to an
    interval behind its export, and a continuation (``init_from=.../last.ckpt``) or a resume
    started there, dropping the last steps (193 of a 2,454-step CPU stage)."""

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        saver = trainer.checkpoint_callback
        if not isinstance(saver, pl.callbacks.ModelCheckpoint) or not saver.save_last:
            return
        if saver.dirpath is None:
            return
        if any(c.save_last and not c.last_model_path for c in trainer.checkpoint_callbacks):
            return  # one that has not saved yet writes last.ckpt after this hook, at this step
        path = Path(saver.dirpath) / f"{saver.CHECKPOINT_NAME_LAST}{saver.FILE_EXTENSION}"
        trainer.save_checkpoint(path)  # every rank: a collective under DDP and FSDP
        saver.last_model_path = str(path)


@dataclass
class WarmStart:
    """What a warm start hands to train.py besides the weights it loaded."""

    training_data: dict[str, Any] | None  # the source's record; None: unknown provenance
    callbacks: list[pl.Callback] = field(default_factory=list)


class ContinueOptimizer(pl.Callback):
    """Load a checkpoint's optimizer moments into the optimizer fitting builds (it exists only
    from ``on_fit_start``); this run's learning rates and schedule stay. Once, then dropped."""

    def __init__(self, states: list[dict[str, Any]], source: Path) -> None:
        self.states: list[dict[str, Any]] | None = states
        self.source = source

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.states is None:
            return
        if len(trainer.optimizers) != len(self.states):
            raise ValueError(f"init_from {self.source}: {len(self.states)} optimizer state(s) "
                             f"for this run's {len(trainer.optimizers)} optimizer(s)")
        for optimizer, saved in zip(trainer.optimizers, self.states, strict=True):
            params = [p for group in optimizer.param_groups for p in group["params"]]
            for index, state in saved["state"].items():
                fits = index < len(params) and all(
                    v.shape == params[index].shape for v in state.values()
                    if torch.is_tensor(v) and v.ndim)
                if not fits:
                    raise ValueError(f"init_from {self.source}: its optimizer state does not "
                                     f"fit this run's trainable parameters (parameter {index})")
            own_groups = optimizer.state_dict()["param_groups"]
            optimizer.load_state_dict({"state": saved["state"], "param_groups": own_groups})
        self.states = None
        log.info("optimizer moments continued from %s", self.source)


def warm_start(module: pl.LightningModule, source: str | Path) -> WarmStart:
    """Start ``module`` from a pipeline folder or from a checkpoint of train.py (strict).

    A folder (an export): its denoiser and reference-encoder weights; the EMA restarts from
    them and the optimizer starts afresh. A ``.ckpt``: its trained weights, its EMA and (by
    the returned callback) its optimizer moments, so that a continuation on new data does not
    restart them; step count, schedule and time budget are this run's (``ckpt_path=`` resumes
    those too).
    """
    source = Path(source)
    if is_sharded_checkpoint(source):
        raise ValueError(f"init_from {source}: a sharded checkpoint cannot be continued; export "
                         f"it (scripts/export_checkpoint.py) and warm-start from the folder")
    if is_lightning_checkpoint(source):
        return _continue_checkpoint(module, source)
    if is_legacy_export(source):
        raise ValueError(f"init_from {source}: an export of the older layout; convert it "
                         f"with `python scripts/export_checkpoint.py {source} --out DIR`")
    weights = read_weights(source)
    check_finite(weights, source)
    for name in ("denoiser", "reference_encoder"):
        own = {k[len(name) + 1:]: v for k, v in weights.items() if k.startswith(f"{name}.")}
        try:
            getattr(module, name).load_state_dict(own)
        except RuntimeError as err:
            raise ValueError(f"init_from {source}: its {name} does not fit this model "
                             f"config ({str(err).splitlines()[0]})") from err
    for callback in module.configure_callbacks() or []:
        if isinstance(callback, EMA):
            callback.restart(module)
    log.info("warm start from %s", source)
    return WarmStart(read_training_data(source))


def _continue_checkpoint(module: pl.LightningModule, path: Path) -> WarmStart:
    checkpoint = read_checkpoint(path)
    check_finite(checkpoint["state_dict"], path)
    try:
        module.load_state_dict(checkpoint["state_dict"], strict=True)
    except RuntimeError as err:
        raise ValueError(f"init_from {path}: its weights do not fit this model config "
                         f"({str(err).splitlines()[0]})") from err
    for callback in module.configure_callbacks() or []:
        if isinstance(callback, EMA):
            average = callback.restart(module)
            if EMA_KEY in checkpoint:
                average.load_state_dict(checkpoint[EMA_KEY])
                average.decay = callback.decay  # this run's setting, not the checkpoint's
    states = checkpoint.get("optimizer_states") or []
    if not states:
        log.warning("%s holds no optimizer state: the optimizer starts afresh", path)
    log.info("continuing %s (step %s): weights, EMA%s", path, checkpoint.get("global_step"),
             ", optimizer moments" if states else "")
    return WarmStart(checkpoint_training_data(path, checkpoint),
                     [ContinueOptimizer(states, path)] if states else [])


def checkpoint_training_data(path: str | Path, checkpoint: dict[str, Any] | None = None
                             ) -> dict[str, Any] | None:
    """The training-data lineage of a checkpoint of train.py: the one it stored or, written
    before checkpoints stored it, the record of the export its run wrote at train.py's default
    place (``<run>/checkpoints/x.ckpt`` -> ``<run>/export/``, found as :func:`model_config`
    finds the run's config); None when neither exists (unknown provenance)."""
    path = Path(path)
    if checkpoint is None:
        meta = path / FSDP_META if path.is_dir() else path
        checkpoint = torch.load(meta, map_location="cpu", mmap=True, weights_only=False)
    if TRAINING_DATA_KEY in checkpoint:
        return normalized(checkpoint[TRAINING_DATA_KEY])
    run_export = path.resolve().parent.parent / "export"
    record = read_training_data(run_export)
    if record is not None:
        log.info("%s stores no training-data record: taking its run's export's (%s)", path,
                 run_export)
    return record


def is_sharded_checkpoint(path: Path) -> bool:
    return path.is_dir() and (path / FSDP_META).is_file()


def is_lightning_checkpoint(path: Path) -> bool:
    return (path.is_file() and path.suffix == ".ckpt") or is_sharded_checkpoint(path)


def read_checkpoint(path: Path) -> dict[str, Any]:
    """The checkpoint dict, with a sharded one consolidated (``state_dict`` from its shards)."""
    if path.is_file():
        return torch.load(path, map_location="cpu", weights_only=False)
    if not is_sharded_checkpoint(path):
        raise FileNotFoundError(f"{path}: neither a .ckpt file nor a sharded checkpoint "
                                f"directory (with {FSDP_META})")
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    checkpoint = torch.load(path / FSDP_META, map_location="cpu", weights_only=False)
    with tempfile.TemporaryDirectory() as tmp:
        dcp_to_torch_save(path, Path(tmp) / "consolidated.pt")
        shards = torch.load(Path(tmp) / "consolidated.pt", map_location="cpu",
                            weights_only=False)
    checkpoint["state_dict"] = shards["model"]
    return checkpoint


def model_config(checkpoint: dict[str, Any], path: Path,
                 config: Path | None = None) -> tuple[DictConfig, str]:
    """(resolved model config, where it came from); raises when no source has one."""
    if config is not None:
        loaded = OmegaConf.load(config)
        node = loaded.model if "model" in loaded and "_target_" not in loaded else loaded
        return _resolved(node, config), str(config)
    if MODEL_CONFIG_KEY in checkpoint:
        return OmegaConf.create(checkpoint[MODEL_CONFIG_KEY]), "checkpoint"
    run_config = path.resolve().parent.parent / ".hydra" / "config.yaml"
    if run_config.is_file():
        loaded = OmegaConf.load(run_config)
        if "model" in loaded:
            return _resolved(loaded.model, run_config), str(run_config)
    raise ValueError(
        f"{path}: no model config to rebuild the weights with: the checkpoint has no "
        f"'{MODEL_CONFIG_KEY}' (train.py stores it) and there is no Hydra run config at "
        f"{run_config}; pass one explicitly (a run's .hydra/config.yaml or an export's "
        f"{CONFIG})")


def _resolved(node: DictConfig, source: Path) -> DictConfig:
    try:
        return OmegaConf.create(OmegaConf.to_container(node, resolve=True))
    except OmegaConfBaseException as err:
        raise ValueError(f"{source}: the model config does not resolve: {err}") from err


def export_checkpoint(path: str | Path, out_dir: str | Path, ema: bool = True,
                      config: str | Path | None = None) -> Path:
    """Write the pipeline folder of checkpoint ``path`` (or of an older-layout export) to
    ``out_dir``; returns ``out_dir``.

    The module is rebuilt from the config and loaded strictly, and the weights come from its
    ``inference_state_dict``: the same code path as train.py's own export.
    """
    path = Path(path)
    if is_legacy_export(path):
        return convert_legacy(path, out_dir)
    if is_pipeline_folder(path):
        raise ValueError(f"{path} is a pipeline folder already: nothing to export")
    checkpoint = read_checkpoint(path)
    model_cfg, source = model_config(checkpoint, path, Path(config) if config else None)
    module = instantiate(model_cfg)
    try:
        module.load_state_dict(checkpoint["state_dict"], strict=True)
    except RuntimeError as err:
        raise ValueError(f"{path}: weights do not fit the model config from {source}: "
                         f"{err}") from err
    use_ema = ema and EMA_KEY in checkpoint
    if ema and not use_ema:
        log.info("%s holds no EMA weights: exporting the trained weights", path)
    swap = nullcontext()
    if use_ema:
        average = EMA(checkpoint[EMA_KEY]["decay"])
        average.track(module).load_state_dict(checkpoint[EMA_KEY])
        swap = average.swapped_in(module)
    with swap:
        weights = module.inference_state_dict()
    out = save_pretrained(weights, model_cfg, Path(out_dir))
    (out / SOURCE).write_text(json.dumps({
        "checkpoint": str(path.resolve()), "global_step": checkpoint.get("global_step"),
        "weights": "ema" if use_ema else "raw", "model_config": source}, indent=1))
    log.info("exported %s (%s weights, step %s) to %s", path, "EMA" if use_ema else "raw",
             checkpoint.get("global_step"), out)
    return out


def as_pipeline_folder(path: str | Path, out_dir: str | Path) -> Path:
    """``path`` itself when it is a pipeline folder; a Lightning checkpoint or an older-layout
    export is exported to ``out_dir``."""
    path = Path(path)
    if is_lightning_checkpoint(path) or is_legacy_export(path):
        return export_checkpoint(path, out_dir)
    return path
