"""The project's Hydra configs, composed outside ``@hydra.main`` (scripts, benchmarks, tests)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"


def register_configs() -> None:
    """Config-store nodes the YAML configs use: ``open_dict/empty``, an empty mapping that
    accepts new keys from the command line (``external_methods.NAME=DIR`` in eval.yaml), which
    a YAML ``{}`` refuses without Hydra's ``+``."""
    from hydra.core.config_store import ConfigStore

    node = OmegaConf.create({})
    OmegaConf.set_struct(node, False)
    ConfigStore.instance().store(group="open_dict", name="empty", node=node)


def compose_config(overrides: Sequence[str] = (), config_name: str = "train") -> DictConfig:
    """``configs/<config_name>.yaml`` with Hydra ``overrides``, as ``train.py`` would see it."""
    from hydra import compose, initialize_config_dir

    register_configs()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(config_name, overrides=list(overrides))
