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
"""

from __future__ import annotations

import json
import logging
import tempfile
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

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
FSDP_META = "meta.pt"  # Lightning's metadata file inside a sharded checkpoint directory
SOURCE = "source.json"  # provenance written next to the exported weights


class ModelConfigInCheckpoint(pl.Callback):
    """Store the resolved model config in every checkpoint, so that it exports on its own."""

    def __init__(self, model_cfg: DictConfig) -> None:
        self.model_cfg = OmegaConf.to_container(model_cfg, resolve=True)

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        checkpoint[MODEL_CONFIG_KEY] = self.model_cfg


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


def warm_start(module: pl.LightningModule, export_dir: str | Path) -> None:
    """Load a pipeline folder's denoiser and reference-encoder weights into ``module``
    (strict), and restart its EMA from them: a warm start needs no optimizer state."""
    export_dir = Path(export_dir)
    if is_legacy_export(export_dir):
        raise ValueError(f"init_from {export_dir}: an export of the older layout; convert it "
                         f"with `python scripts/export_checkpoint.py {export_dir} --out DIR`")
    weights = read_weights(export_dir)
    check_finite(weights, export_dir)
    for name in ("denoiser", "reference_encoder"):
        own = {k[len(name) + 1:]: v for k, v in weights.items() if k.startswith(f"{name}.")}
        try:
            getattr(module, name).load_state_dict(own)
        except RuntimeError as err:
            raise ValueError(f"init_from {export_dir}: its {name} does not fit this model "
                             f"config ({str(err).splitlines()[0]})") from err
    for callback in module.configure_callbacks() or []:
        if isinstance(callback, EMA):
            callback.restart(module)
    log.info("warm start from %s", export_dir)


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
