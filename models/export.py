"""The saved model: one folder in diffusers' pipeline layout.

train.py writes it at the end of a run (:func:`save_pretrained`), scripts/export_checkpoint.py
turns a Lightning checkpoint or an export of the older layout into it, and eval.py,
scripts/refine.py, the demo and the notebook load it (:func:`load_pipeline`, i.e.
``RefineByAlignPipeline.from_pretrained``). ``checkpoints/tiny_synthetic`` is one::

    model_index.json              components, alignment read-out and what calibrated it
    unet/ reference_encoder/ scheduler/ [vae/]    config.json + safetensors each
    model.yaml                    the training config (rebuilds the LightningModule)
    training_data.yaml            the data the weights saw (eval.py's provenance check)
    tracker.yaml, source.json     the wandb run / the checkpoint it came from, when known
    refine_by_align_pipeline.py   lets DiffusionPipeline.from_pretrained find the class
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import asdict
from pathlib import Path

import torch
from diffusers.utils import logging as diffusers_logging
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from safetensors import SafetensorError
from safetensors.torch import load_file
from yaml import YAMLError

from models.pipeline import AlignmentConfig, RefineByAlignPipeline, read_alignment

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_EXPORT = REPO_ROOT / "checkpoints" / "tiny_synthetic"
DEFAULT_ALIGNMENT = REPO_ROOT / "configs" / "alignment" / "default.yaml"
CONFIG = "model.yaml"
PIPELINE_INDEX = "model_index.json"
COMPONENT_WEIGHTS = "diffusion_pytorch_model.safetensors"
COMPONENTS = ("unet", "reference_encoder", "scheduler", "vae")
# the trained component folders and the prefixes of the LightningModule's state dict they hold
PREFIXES = {"unet": "denoiser.", "reference_encoder": "reference_encoder."}
# the older export layout (one flat state dict + alignment.yaml), converted by
# scripts/export_checkpoint.py
LEGACY_WEIGHTS, LEGACY_ALIGNMENT = "model.safetensors", "alignment.yaml"
# files that travel with the weights when an export is converted
RECORDS = ("training_data.yaml", "tracker.yaml", "source.json", "MODEL_CARD.md")


class ExportError(ValueError):
    """An export that is unreadable, corrupt or non-finite; the message names the file."""


def check_finite(weights: dict[str, torch.Tensor], file: Path) -> None:
    """Refuse NaN or inf weights (a diverged run): they would refine into garbage silently."""
    bad = [k for k, v in weights.items() if v.is_floating_point() and not v.isfinite().all()]
    if bad:
        shown = ", ".join(bad[:5]) + (", ..." if len(bad) > 5 else "")
        raise ExportError(f"{file}: non-finite (NaN/inf) values in {len(bad)} of {len(weights)} "
                          f"tensors ({shown}); the training run diverged")


def is_pipeline_folder(path: Path) -> bool:
    return (Path(path) / PIPELINE_INDEX).is_file()


def is_legacy_export(path: Path) -> bool:
    return (Path(path) / LEGACY_WEIGHTS).is_file() and (Path(path) / CONFIG).is_file()


def preset_alignment(model_cfg: DictConfig) -> AlignmentConfig:
    """The uncalibrated read-out of a model preset: its documented ``val_timestep`` /
    ``val_block`` (e.g. block 9 for SD-1.5, the paper's best) with configs/alignment's
    post-processing; eval.py's sweep replaces it with a calibrated one."""
    defaults = read_alignment(DEFAULT_ALIGNMENT)
    return AlignmentConfig(**{**asdict(defaults), "timestep": int(model_cfg.val_timestep),
                              "block": int(model_cfg.val_block)})


def build_pipeline(state_dict: dict[str, torch.Tensor], model_cfg: DictConfig,
                   alignment: AlignmentConfig | None = None, calibration: str | None = None,
                   source: Path | None = None) -> RefineByAlignPipeline:
    """The pipeline of a model config (``cfg.model``) and a state dict with its
    ``denoiser.`` / ``reference_encoder.`` weights (``inference_state_dict``'s); without
    ``alignment``, the preset's uncalibrated read-out. ``source`` names the weights in errors."""
    where = source or Path("state dict")
    check_finite(state_dict, where)
    parts = {name: instantiate(model_cfg[name]) for name in
             ("denoiser", "reference_encoder", "autoencoder", "noise_scheduler")}
    for prefix in PREFIXES.values():
        name = prefix.rstrip(".")
        own = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
        try:
            parts[name].load_state_dict(own, strict=True)
        except RuntimeError as err:
            raise ExportError(f"{where}: its {name} weights do not fit the model config "
                              f"({err})") from err
    return RefineByAlignPipeline.from_modules(
        **parts, alignment=alignment or preset_alignment(model_cfg), calibration=calibration)


def save_pretrained(state_dict: dict[str, torch.Tensor], model_cfg: DictConfig,
                    out_dir: str | Path, alignment: AlignmentConfig | None = None,
                    calibration: str | None = None) -> Path:
    """Write the pipeline folder of trained weights (what train.py does at the end): the
    components, ``model.yaml`` (interpolations resolved) and the read-out; refuses non-finite
    weights before writing anything. Returns ``out_dir``."""
    out_dir = Path(out_dir)
    pipe = build_pipeline(state_dict, model_cfg, alignment, calibration, out_dir)
    pipe.save_pretrained(out_dir)
    OmegaConf.save(model_cfg, out_dir / CONFIG, resolve=True)
    return out_dir


def load_pipeline(path: str | Path | None = None, device: str | torch.device = "cpu"
                  ) -> RefineByAlignPipeline:
    """The pipeline of a folder (default: the shipped tiny model) on ``device``, its weights
    checked finite; clear errors name the file at fault."""
    path = Path(path) if path else DEFAULT_EXPORT
    if not is_pipeline_folder(path):
        if is_legacy_export(path):
            raise ExportError(f"{path} is an export of the older layout ({LEGACY_WEIGHTS} + "
                              f"{CONFIG}); convert it once with `python "
                              f"scripts/export_checkpoint.py {path} --out NEW_FOLDER`")
        raise FileNotFoundError(f"{path} is not a pipeline folder: expected {PIPELINE_INDEX} "
                                "in it (train.py and scripts/export_checkpoint.py write one)")
    bar = diffusers_logging.is_progress_bar_enabled()
    diffusers_logging.disable_progress_bar()  # three small files: no "Loading" bar in logs
    try:
        pipe = RefineByAlignPipeline.from_pretrained(path, low_cpu_mem_usage=False)
    except (SafetensorError, OSError, ValueError) as err:
        raise ExportError(f"{path}: unreadable, truncated or corrupt pipeline folder "
                          f"({err.__class__.__name__}: {err})") from err
    finally:
        if bar:
            diffusers_logging.enable_progress_bar()
    for name in ("unet", "reference_encoder", "vae"):
        part = getattr(pipe, name, None)
        if part is not None:
            check_finite(part.state_dict(), path / name / COMPONENT_WEIGHTS)
            part.eval().requires_grad_(False)
    return pipe.to(device)


def read_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """The trained weights of a pipeline folder as one state dict with the LightningModule's
    prefixes (``denoiser.``, ``reference_encoder.``): what validate_export.py loads into a
    rebuilt module and what tests compare."""
    out = {}
    for part, prefix in PREFIXES.items():
        file = Path(path) / part / COMPONENT_WEIGHTS
        try:
            weights = load_file(str(file))
        except (SafetensorError, FileNotFoundError) as err:
            raise ExportError(f"{file}: unreadable, truncated or missing ({err})") from err
        out.update({prefix + k: v for k, v in weights.items()})
    return out


def write_alignment(path: str | Path, alignment: AlignmentConfig, calibration: str) -> Path:
    """Deploy a calibrated read-out in a pipeline folder (its ``model_index.json``); returns
    the file written."""
    index = Path(path) / PIPELINE_INDEX
    config = json.loads(index.read_text())
    config.update(alignment=asdict(alignment), calibration=calibration)
    index.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return index


def convert_legacy(export_dir: str | Path, out_dir: str | Path) -> Path:
    """An export of the older layout (``model.safetensors`` + ``model.yaml``, perhaps with a
    calibrated ``alignment.yaml``) -> a pipeline folder with the same weights and read-out
    (an uncalibrated export stays uncalibrated); its records travel along."""
    export_dir, out_dir = Path(export_dir), Path(out_dir)
    try:
        model_cfg = OmegaConf.load(export_dir / CONFIG)
    except (YAMLError, UnicodeDecodeError) as err:
        raise ExportError(f"{export_dir / CONFIG}: not a readable model config ({err})") from err
    try:
        weights = load_file(str(export_dir / LEGACY_WEIGHTS))
    except SafetensorError as err:
        raise ExportError(f"{export_dir / LEGACY_WEIGHTS}: unreadable, truncated or corrupt "
                          f"({err})") from err
    alignment = calibration = None
    if (export_dir / LEGACY_ALIGNMENT).is_file():
        alignment = read_alignment(export_dir / LEGACY_ALIGNMENT)
        notes = [line.removeprefix("#").strip() for line in
                 (export_dir / LEGACY_ALIGNMENT).read_text().splitlines() if line.startswith("#")]
        calibration = " ".join(notes) or f"{export_dir / LEGACY_ALIGNMENT}"
    build_pipeline(weights, model_cfg, alignment, calibration,
                   export_dir / LEGACY_WEIGHTS).save_pretrained(out_dir)
    shutil.copyfile(export_dir / CONFIG, out_dir / CONFIG)
    for record in RECORDS:
        if (export_dir / record).is_file() and export_dir.resolve() != out_dir.resolve():
            shutil.copyfile(export_dir / record, out_dir / record)
    log.info("converted %s to the pipeline folder %s", export_dir, out_dir)
    return out_dir
