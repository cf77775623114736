"""Hyperparameter search: the Optuna sweeper config, and main() returning the named metric.

Training is stubbed (seconds, not minutes); that the metric is really logged by a training run
is checked in tests/test_training.py on its tiny run.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf

import train as train_script
from tests.conftest import CONFIG_DIR, compose_config

SEARCH = "hparams_search=tiny_optuna"


def _fake_result(metrics: dict[str, float]) -> dict[str, Any]:
    """What train() returns, without training."""
    return {"metrics": metrics, "val_table": {}, "export_dir": None, "diffusers_dir": None,
            "checkpoint_dir": None, "log_dir": "-", "global_step": 0}


def _fake_objective(cfg: DictConfig) -> float:
    """A known function of the searched params, peaked at lr = 1e-3 (log scale)."""
    return -abs(math.log10(cfg.model.optimizer.lr) + 3) + 0.01 * cfg.model.attn_loss_weight


def test_search_config_composes_with_the_optuna_sweeper() -> None:
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("train", overrides=[SEARCH], return_hydra_config=True)
    sweeper = cfg.hydra.sweeper
    assert sweeper._target_ == "hydra_plugins.hydra_optuna_sweeper.optuna_sweeper.OptunaSweeper"
    assert sweeper.direction == "maximize"
    assert sweeper.sampler._target_ == "optuna.samplers.TPESampler"
    assert sweeper.sampler.seed is not None  # a rerun asks the same trials
    assert cfg.optimized_metric == "val/best_miou_mask"  # held-out validation pairs
    for key in sweeper.params:  # every searched key exists: a typo would search nothing
        assert OmegaConf.select(cfg, key, default=None) is not None, key
    assert cfg.trainer.val_check_interval == cfg.trainer.max_steps <= 100  # tiny, validated
    # without the search, main returns None and the run is unchanged
    assert compose_config([]).optimized_metric is None


def test_main_returns_the_named_metric(monkeypatch: pytest.MonkeyPatch) -> None:
    metrics = {"val/best_miou_mask": 0.25, "val/miou_mask": 0.125, "val/loss": 0.5}
    monkeypatch.setattr(train_script, "train", lambda cfg: _fake_result(metrics))
    cfg = compose_config([SEARCH])
    assert train_script.main(cfg) == 0.25  # hydra.main passes a given config straight through
    cfg.optimized_metric = "val/miou_mask"
    assert train_script.main(cfg) == 0.125
    cfg.optimized_metric = None
    assert train_script.main(cfg) is None


def test_a_metric_that_was_not_logged_fails_loudly(monkeypatch: pytest.MonkeyPatch) -> None:
    metrics = {"val/loss": 0.5, "train/loss": 0.75}
    monkeypatch.setattr(train_script, "train", lambda cfg: _fake_result(metrics))
    cfg = compose_config([SEARCH])  # the cls-token ablation, e.g., logs no mIoU
    with pytest.raises(ValueError, match=r"'val/best_miou_mask' was not logged.*"
                                         r"logged metrics: train/loss, val/loss"):
        train_script.main(cfg)


def test_optuna_maximizes_what_main_returns(tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """The whole sweep in-process (Hydra's basic launcher): the best trial is the maximum."""
    monkeypatch.setattr(train_script, "train",
                        lambda cfg: _fake_result({"val/best_miou_mask": _fake_objective(cfg)}))
    # imported, train.py's relative config_path would be read as a package: name the folder
    monkeypatch.setattr(sys, "argv", ["train.py", "-m", f"--config-path={CONFIG_DIR}", SEARCH,
                                      "hydra.sweeper.n_trials=3", f"hydra.sweep.dir={tmp_path}"])
    train_script.main()

    trials = sorted(p for p in tmp_path.iterdir() if p.is_dir())
    assert [p.name for p in trials] == ["0", "1", "2"]
    values = [_fake_objective(OmegaConf.load(p / ".hydra" / "config.yaml")) for p in trials]
    assert len(set(values)) == 3  # the sampler did vary the params
    results = OmegaConf.load(tmp_path / "optimization_results.yaml")
    assert results.best_value == pytest.approx(max(values))
    best = OmegaConf.load(trials[values.index(max(values))] / ".hydra" / "config.yaml")
    assert results.best_params["model.optimizer.lr"] == pytest.approx(best.model.optimizer.lr)
