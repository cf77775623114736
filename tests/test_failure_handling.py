"""Failure handling: what is skipped (bad shards), what stops a run (non-finite steps, too
many bad shards, corrupt exports and checkpoints), and resuming after a kill -9."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader

from data.datamodule import PairDataModule
from data.shards import ShardReadError, synthetic_records, write_shards
from models.callbacks import LogShardSkips, NonFiniteError, StopOnNonFinite
from models.export import COMPONENT_WEIGHTS, ExportError, load_pipeline, save_pretrained
from tests.conftest import compose_config
from tests.test_refine_cli import _argv, _write_inputs, refine
from tests.test_training import FAST
from train import train


# ----------------------------------------------------------------------------- non-finite
class _Quadratic(pl.LightningModule):
    """Sum over samples of (w . x)^2, or of its square root, whose gradient at a sample with
    w . x = 0 is NaN while the loss stays finite."""

    def __init__(self, sqrt: bool = False) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(2))
        self.sqrt = sqrt

    def training_step(self, batch, batch_idx):
        value = (batch["x"] @ self.w).pow(2)
        loss = (value.sqrt() if self.sqrt else value).sum()
        self.loss_terms = {"quadratic": loss.detach()}
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def _batches(bad: int, value: float) -> DataLoader:
    """4 batches of 2 samples keyed s0..s7; sample `bad` has x = `value`."""
    samples = [{"x": torch.full((2,), value if i == bad else 1.0), "mode": torch.tensor(i % 2),
                "__key__": f"s{i}"} for i in range(8)]
    return DataLoader(samples, batch_size=2)


def _fit(module: pl.LightningModule, data: DataLoader, guard: StopOnNonFinite,
         tmp_path: Path) -> pl.Trainer:
    trainer = pl.Trainer(accelerator="cpu", max_epochs=1, logger=False, callbacks=[guard],
                         enable_progress_bar=False, enable_model_summary=False,
                         enable_checkpointing=False, default_root_dir=tmp_path)
    trainer.fit(module, data)
    return trainer


def test_nan_loss_stops_naming_step_samples_modes_and_terms(tmp_path):
    with pytest.raises(NonFiniteError) as caught:
        _fit(_Quadratic(), _batches(3, float("nan")), StopOnNonFinite(), tmp_path)
    message = str(caught.value)
    assert "global step 1" in message and "quadratic=nan" in message
    assert "s2 (alignment), s3 (refinement)" in message


def test_nan_gradient_with_a_finite_loss_stops(tmp_path):
    with pytest.raises(NonFiniteError, match=r"gradients in 1 parameters \(w\).*s4 \(alignment\)"):
        _fit(_Quadratic(sqrt=True), _batches(4, 0.0), StopOnNonFinite(), tmp_path)


def test_skipped_steps_leave_the_weights_alone_until_the_limit(tmp_path, caplog):
    guard = StopOnNonFinite(max_skipped_steps=1)
    module = _Quadratic()
    with caplog.at_level(logging.WARNING, logger="models.callbacks"):
        trainer = _fit(module, _batches(3, float("nan")), guard, tmp_path)
    assert trainer.global_step == 4 and guard.skipped == 1
    assert torch.isfinite(module.w).all()
    clean = _Quadratic()  # the same run without the bad batch
    _fit(clean, DataLoader([b for i, b in enumerate(_batches(3, 1.0)) if i != 1], batch_size=None),
         StopOnNonFinite(), tmp_path)
    torch.testing.assert_close(module.w, clean.w)
    assert "skipping non-finite training step at global step 1" in caplog.text


def test_diverging_training_stops_before_exporting(tmp_path):
    """The reported case: `python train.py model.optimizer.lr=1e8`, short."""
    cfg = compose_config(FAST + ["model.optimizer.lr=1e8", "trainer.max_steps=20"])
    cfg.paths.output_dir = str(tmp_path)
    with pytest.raises(NonFiniteError, match=r"step \d+: loss nan \(diffusion=nan.*item \d+"):
        train(cfg)
    assert not (tmp_path / "export").exists()


# ----------------------------------------------------------------------------- exports
def test_export_refuses_non_finite_weights(tmp_path):
    weights = {"denoiser.w": torch.tensor([1.0, float("nan")]), "denoiser.b": torch.ones(1)}
    with pytest.raises(ExportError, match=rf"{tmp_path / 'export'}: non-finite .* 1 of 2 .*w"):
        save_pretrained(weights, compose_config([]).model, tmp_path / "export")
    assert not (tmp_path / "export").exists()


def test_corrupt_or_non_finite_export_is_refused_naming_the_file(tmp_path, tiny_pipeline_dir):
    export = shutil.copytree(tiny_pipeline_dir, tmp_path / "nan_export")
    unet = export / "unet" / COMPONENT_WEIGHTS
    weights = load_file(unet)
    first = next(iter(weights))
    weights[first] = weights[first].clone().fill_(float("inf"))
    save_file(weights, unet)
    with pytest.raises(ExportError, match=rf"{unet}: non-finite .*{first}"):
        load_pipeline(export)

    cut = shutil.copytree(tiny_pipeline_dir, tmp_path / "cut_export")
    unet = cut / "unet" / COMPONENT_WEIGHTS
    unet.write_bytes(unet.read_bytes()[: unet.stat().st_size // 2])
    with pytest.raises(ExportError, match=rf"{cut}: unreadable, truncated or corrupt .*{unet}"):
        load_pipeline(cut)


def test_refine_cli_names_a_truncated_export(tmp_path, tiny_pipeline_dir, caplog):
    cut = shutil.copytree(tiny_pipeline_dir, tmp_path / "cut_export")
    encoder = cut / "reference_encoder" / COMPONENT_WEIGHTS
    encoder.write_bytes(encoder.read_bytes()[:1000])
    with caplog.at_level(logging.ERROR):
        assert refine.main(_argv(_write_inputs(tmp_path), tmp_path / "out", cut)) == 2
    assert "unreadable" in caplog.text and str(encoder) in caplog.text
    assert not (tmp_path / "out").exists()


def test_truncated_resume_checkpoint_is_named(tmp_path):
    ckpt = tmp_path / "last.ckpt"
    torch.save({"state_dict": {"w": torch.randn(1000)}, "global_step": 3}, ckpt)
    ckpt.write_bytes(ckpt.read_bytes()[:2000])
    cfg = compose_config(FAST + [f"ckpt_path={ckpt}"])
    with pytest.raises(ValueError, match=rf"ckpt_path {ckpt}: unreadable, truncated or corrupt"):
        train(cfg)


# ----------------------------------------------------------------------------- shards
@pytest.fixture
def cut_shards(tmp_path) -> list[str]:
    """Two shards of 8 samples from the shard writer, the first cut in half."""
    paths = write_shards(synthetic_records(16, seed=9), tmp_path / "shards", per_shard=8)
    data = paths[0].read_bytes()
    paths[0].write_bytes(data[: len(data) // 2])
    return [str(p) for p in paths]


def _shard_data(urls: list[str], **kwargs) -> PairDataModule:
    """Shards through the DataModule, read by one loader worker unless told otherwise."""
    data = PairDataModule(**{"source": "shards", "shard_urls": urls, "batch_size": 4,
                             "num_workers": 1, "image_size": 32, "val_length": 4, **kwargs})
    data.setup("fit")
    return data


def test_training_reads_past_a_truncated_shard_and_reports_the_skip(cut_shards, tmp_path,
                                                                     caplog):
    # batch 1: no partial last batch dropped, whatever survives of the cut shard
    data = _shard_data(cut_shards, resampled=False, shuffle_buffer=0, num_workers=0,
                       batch_size=1)
    keys = [k for batch in data.train_dataloader() for k in batch["__key__"]]
    assert {f"000009_{i:08d}" for i in range(8, 16)} <= set(keys)  # the whole second shard
    assert data.shard_errors.skipped >= 1 and data.shard_errors.read == len(keys)
    assert "shard-000000.tar" in caplog.text

    module = instantiate(compose_config(FAST).model)
    trainer = pl.Trainer(accelerator="cpu", max_steps=3, logger=False, limit_val_batches=0,
                         enable_progress_bar=False, enable_model_summary=False,
                         enable_checkpointing=False, default_root_dir=tmp_path,
                         callbacks=[LogShardSkips()])
    # resampled (the default): both shards drawn forever; counted in the loader worker
    trainer.fit(module, datamodule=_shard_data(cut_shards))
    assert trainer.global_step == 3
    assert trainer.callback_metrics["train/data_skipped"] >= 1


def test_too_many_unreadable_shard_samples_stop_with_the_reason(cut_shards):
    data = _shard_data(cut_shards, resampled=False, shuffle_buffer=0, max_skip_fraction=0.05,
                       skip_check_after=1)
    with pytest.raises(ShardReadError, match=r"data.max_skip_fraction=0.05.*shard-000000.tar"):
        list(data.train_dataloader())


# ----------------------------------------------------------------------------- kill -9
def test_default_checkpoints_give_the_main_job_a_mid_run_checkpoint():
    from pytorch_lightning.callbacks import ModelCheckpoint

    from train import instantiate_group

    cfg = compose_config([])  # `python train.py`
    saving = [c for c in instantiate_group(cfg.callbacks) if isinstance(c, ModelCheckpoint)]
    by_steps = [c._every_n_train_steps for c in saving if c._every_n_train_steps]
    assert by_steps and min(by_steps) < cfg.trainer.max_steps
    assert any(c._train_time_interval is not None and c.save_last for c in saving)


def _train_steps(run: Path) -> list[int]:
    """Steps at which the run logged a training loss (CSV logger, every step)."""
    import csv

    with open(run / "csv" / "metrics.csv") as f:
        return [int(row["step"]) for row in csv.DictReader(f) if row.get("train/loss")]


@pytest.mark.slow
def test_kill_9_after_a_mid_run_checkpoint_then_resume_continues(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    root = Path(__file__).resolve().parents[1]
    common = [sys.executable, "train.py", *FAST, "trainer.log_every_n_steps=1",
              "callbacks.model_checkpoint.every_n_train_steps=3", "~callbacks.progress_bar"]
    first = tmp_path / "first"
    proc = subprocess.Popen([*common, "trainer.max_steps=200", f"hydra.run.dir={first}"],
                            cwd=root, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    last, deadline = first / "checkpoints" / "last.ckpt", time.time() + 600
    try:
        while proc.poll() is None and time.time() < deadline:
            if (first / "checkpoints" / "step0000003.ckpt").exists() and last.exists():
                try:  # written after the step checkpoint; read it once it is complete
                    step = torch.load(last, map_location="cpu", weights_only=False)["global_step"]
                    break
                except (RuntimeError, EOFError):
                    pass
            time.sleep(0.2)
        assert proc.poll() is None, "the run ended before it could be killed"
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL and step >= 3
    killed_at = max(_train_steps(first))

    second = tmp_path / "second"
    done = subprocess.run([*common, f"trainer.max_steps={step + 3}", f"hydra.run.dir={second}",
                           f"ckpt_path={last}"], cwd=root, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"steps            : {step + 3}" in done.stdout
    resumed = _train_steps(second)
    assert resumed == list(range(step, step + 3)), resumed  # continues, no restart from 0
    assert killed_at >= step - 1  # the killed run had logged up to the checkpoint
