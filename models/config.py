"""The project's Hydra configs, composed outside ``@hydra.main`` (scripts, benchmarks, tests)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from omegaconf import DictConfig

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"


def compose_config(overrides: Sequence[str] = (), config_name: str = "train") -> DictConfig:
    """``configs/<config_name>.yaml`` with Hydra ``overrides``, as ``train.py`` would see it."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(config_name, overrides=list(overrides))
