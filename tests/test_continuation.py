"""Continuing a checkpoint of train.py on new data (``init_from=CKPT``) and resuming on other
data (``ckpt_path=`` with another seed): what carries over, and the record of the data."""

from __future__ import annotations

import shutil
from pathlib import Path
from types import SimpleNamespace

import hydra
import pytest
import pytorch_lightning as pl
import torch

from data.provenance import read_training_data
from models.checkpoint import TRAINING_DATA_KEY, ContinueOptimizer, warm_start
from models.distributed import check_config
from models.ema import CHECKPOINT_KEY as EMA_KEY
from models.ema import EMA
from tests.conftest import compose_config
from tests.test_training import FAST

RUN = FAST + ["logger=csv", "callbacks.progress_bar.refresh_rate=0",
              "callbacks.model_checkpoint.every_n_train_steps=1"]


class RecordTrainStart(pl.Callback):
    """Saves what training starts from: weights, EMA step, optimizer moments and rates."""

    def __init__(self, path: str) -> None:
        self.path = path

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        (ema,) = [c for c in trainer.callbacks if isinstance(c, EMA)]
        optimizer = trainer.optimizers[0]
        torch.save({"weights": {k: v.clone() for k, v in pl_module.state_dict().items()},
                    "ema_step": ema.ema.optimization_step,
                    "moments": optimizer.state_dict()["state"],
                    "initial_lr": [g["initial_lr"] for g in optimizer.param_groups]}, self.path)


def _train(out: Path, overrides: list[str]) -> Path:
    from train import train

    cfg = compose_config(RUN + overrides)
    cfg.paths.output_dir = str(out)
    cfg.export_dir = str(out / "export")
    train(cfg)
    return out


@pytest.fixture(scope="module")
def first(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """2 steps on train seed 21: the checkpoint the tests continue."""
    out = _train(tmp_path_factory.mktemp("first"),
                 ["trainer.max_steps=2", "trainer.val_check_interval=2", "seed=21"])
    return out / "checkpoints" / "last.ckpt"


def test_init_from_a_checkpoint_continues_its_weights_ema_and_moments(first, tmp_path):
    saved = torch.load(first, weights_only=False)
    seen_path = tmp_path / "seen.pt"
    out = _train(tmp_path / "second", [
        "trainer.max_steps=1", "trainer.val_check_interval=1", "seed=22", f"init_from={first}",
        "model.optimizer.lr=5e-4",
        "+callbacks.record._target_=tests.test_continuation.RecordTrainStart",
        f"+callbacks.record.path={seen_path}"])
    seen = torch.load(seen_path, weights_only=False)
    assert seen["weights"].keys() == saved["state_dict"].keys()
    for name, tensor in saved["state_dict"].items():  # the trained weights, not their EMA
        assert torch.equal(seen["weights"][name], tensor), name
    assert seen["ema_step"] == saved["ema"]["optimization_step"] == 2
    moments = saved["optimizer_states"][0]["state"]
    assert seen["moments"].keys() == moments.keys() and moments
    for index, state in moments.items():
        assert torch.equal(seen["moments"][index]["exp_avg_sq"], state["exp_avg_sq"])
    assert saved["optimizer_states"][0]["param_groups"][0]["initial_lr"] != 5e-4
    assert seen["initial_lr"] == [5e-4]  # this run's rate and schedule, not the checkpoint's

    record = read_training_data(out / "export")
    assert record["train"]["seed"] == 22 and record["ancestors"][0]["train"]["seed"] == 21
    stored = torch.load(out / "checkpoints" / "last.ckpt", weights_only=False)
    assert stored[TRAINING_DATA_KEY] == record  # a continuation of this one keeps both


def test_last_ckpt_holds_the_final_step_between_two_saves(tmp_path):
    """A save at step 2, none at 3: Lightning alone leaves last.ckpt at step 2."""
    out = _train(tmp_path / "run", ["trainer.max_steps=3", "trainer.val_check_interval=100",
                                    "callbacks.model_checkpoint.every_n_train_steps=2",
                                    "callbacks.time_checkpoint=null"])
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["last.ckpt",
                                                                       "step0000002.ckpt"]
    last = torch.load(out / "checkpoints" / "last.ckpt", weights_only=False)
    assert last["global_step"] == 3  # the step the export was written at, not the last save
    assert last[EMA_KEY]["optimization_step"] == 3


def test_resuming_on_other_data_keeps_the_earlier_data_recorded(first, tmp_path):
    same = _train(tmp_path / "same", ["trainer.max_steps=3", "trainer.val_check_interval=3",
                                      "seed=21", f"ckpt_path={first}"])
    assert read_training_data(same / "export") == torch.load(
        first, weights_only=False)[TRAINING_DATA_KEY]  # a plain resume: the same record
    other = _train(tmp_path / "other", ["trainer.max_steps=3", "trainer.val_check_interval=3",
                                        "seed=23", f"ckpt_path={first}"])
    record = read_training_data(other / "export")
    assert record["train"]["seed"] == 23 and record["ancestors"][0]["train"]["seed"] == 21


def test_continuing_refuses_another_architecture_and_fsdp(first):
    wider = compose_config(["model.denoiser.config.block_out_channels=[32,64,64]"])
    with pytest.raises(ValueError, match="init_from .*weights do not fit"):
        warm_start(hydra.utils.instantiate(wider.model), first)
    fsdp = compose_config(["trainer=fsdp", "model.ema_decay=null", f"init_from={first}"])
    with pytest.raises(ValueError, match="FSDP shards"):
        check_config(fsdp)


def test_a_warm_start_on_a_seed_its_lineage_trained_on_is_refused(first, tmp_path):
    with pytest.raises(ValueError, match=r"seed=21: .* train seed 21 already \(train in"):
        _train(tmp_path / "again", ["trainer.max_steps=1", "seed=21", f"init_from={first}"])
    export = first.parent.parent / "export"
    with pytest.raises(ValueError, match=r"seed=21: .* \(train in .*not in \[21\]"):
        _train(tmp_path / "again_export", ["trainer.max_steps=1", "seed=21",
                                           f"init_from={export}"])
    assert not (tmp_path / "again" / "checkpoints").exists()


def test_optimizer_state_of_other_parameters_is_refused() -> None:
    small = torch.nn.Parameter(torch.zeros(3))
    optimizer = torch.optim.Adam([small])
    small.grad = torch.ones(3)
    optimizer.step()
    continued = ContinueOptimizer([optimizer.state_dict()], Path("old.ckpt"))
    other = torch.optim.Adam([torch.nn.Parameter(torch.zeros(4))])
    with pytest.raises(ValueError, match="old.ckpt: its optimizer state does not fit"):
        continued.on_fit_start(SimpleNamespace(optimizers=[other]), None)
    same_shape = torch.optim.Adam([torch.nn.Parameter(torch.zeros(3))], lr=0.5)
    ContinueOptimizer([optimizer.state_dict()], Path("old.ckpt")).on_fit_start(
        SimpleNamespace(optimizers=[same_shape]), None)
    assert torch.equal(same_shape.state_dict()["state"][0]["exp_avg"],
                       optimizer.state_dict()["state"][0]["exp_avg"])
    assert same_shape.param_groups[0]["lr"] == 0.5


def test_an_older_checkpoint_takes_the_record_of_its_runs_export(first, tmp_path):
    """Checkpoints written before they stored the lineage: the run's own export has it."""
    older = torch.load(first, weights_only=False)
    record = older.pop(TRAINING_DATA_KEY)
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    torch.save(older, ckpt)
    module = hydra.utils.instantiate(compose_config(FAST).model)
    assert warm_start(module, ckpt).training_data is None  # no export beside it: unknown
    shutil.copytree(first.parent.parent / "export", tmp_path / "run" / "export")
    assert warm_start(module, ckpt).training_data == record
