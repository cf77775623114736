"""The training loop: the loss goes down, resumes are exact, the entry point runs end to end."""

import csv
import subprocess
import sys
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from pytorch_lightning.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader

from data.datamodule import PairDataModule
from data.resumable_loader import ResumableLoader, ResumableSampler
from data.shards import synthetic_records, write_shards
from models.callbacks import ResumableProgressBar
from models.ema import EMA, ema_callback
from tests.conftest import compose_config

FAST = ["data.image_size=32", "data.batch_size=4", "data.num_workers=0", "data.val_length=4",
        "model.val_sample_steps=2", "model.val_num_samples=2"]


def test_optimizer_steps_on_a_fixed_batch_lower_both_losses(tiny_batch):
    torch.manual_seed(0)
    module = instantiate(compose_config(FAST).model)
    optimizer = torch.optim.AdamW(module.trainable_parameters(), lr=2e-3)
    timesteps = torch.tensor([100, 400, 700, 900])
    kept = torch.ones(4, dtype=torch.bool)

    def losses():
        out = module.model_step(tiny_batch, torch.Generator().manual_seed(0), [0, 3], timesteps)
        return out["diffusion"].mean(), module.alignment_loss(out["attention"], tiny_batch, kept)

    first = [float(v) for v in losses()]
    for _ in range(15):
        diffusion, attention = losses()
        optimizer.zero_grad()
        (diffusion + attention).backward()
        optimizer.step()
    last = [float(v) for v in losses()]
    assert last[0] < 0.9 * first[0]
    assert last[1] < first[1]


class _RecordStart(pl.Callback):
    def on_train_start(self, trainer, module):
        optimizer = trainer.optimizers[0]
        steps = [float(s["step"]) for s in optimizer.state.values() if "step" in s]
        ema = ema_callback(trainer)
        self.seen = (trainer.global_step, steps[0] if steps else 0.0,
                     ema.ema.optimization_step if ema else None)


def _trainer(tmp_path: Path, max_steps: int, *callbacks, accumulate: int = 1) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu", max_steps=max_steps, logger=False, enable_progress_bar=False,
        default_root_dir=tmp_path, limit_val_batches=0, callbacks=list(callbacks),
        enable_model_summary=False, accumulate_grad_batches=accumulate,
    )


class _CountBatches(pl.Callback):
    seen = 0

    def on_train_batch_end(self, *args) -> None:
        self.seen += 1


class _KeepBatch(pl.Callback):
    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        self.batch = batch


def test_training_step_receives_the_float_contract_from_compact_batches(tmp_path):
    """The synthetic loader sends uint8 / bool pixels; the step gets the float32 samples of
    the dataset, exactly (decoded after the transfer by the DataModule's hook)."""
    cfg = compose_config(FAST)
    datamodule, kept = instantiate(cfg.data), _KeepBatch()
    _trainer(tmp_path, 1, kept).fit(instantiate(cfg.model), datamodule=datamodule)
    batch, size = kept.batch, cfg.data.image_size
    items = [datamodule.train_set[int(i)] for i in batch["index"]]
    assert batch["target"].shape == (4, 3, size, size)
    assert batch["reference"].shape == (4, 3, cfg.data.reference_size, cfg.data.reference_size)
    for k in ("target", "mask", "reference", "reference_mask", "mode", "index"):
        expected = torch.stack([x[k] for x in items])
        assert batch[k].dtype == expected.dtype and torch.equal(batch[k], expected), k
    assert batch["target"].dtype == torch.float32 and batch["mode"].dtype == torch.int64


def test_ema_steps_once_per_optimizer_step_under_accumulation(tmp_path):
    cfg = compose_config(FAST)
    module, batches = instantiate(cfg.model), _CountBatches()
    trainer = _trainer(tmp_path, 2, batches, accumulate=2)
    trainer.fit(module, datamodule=instantiate(cfg.data))
    assert batches.seen == 4 and trainer.global_step == 2
    assert ema_callback(trainer).ema.optimization_step == 2


def test_resume_continues_step_count_optimizer_and_ema(tmp_path):
    cfg = compose_config(FAST)
    pl.seed_everything(0)
    first = _trainer(tmp_path, 3)
    first.fit(instantiate(cfg.model), datamodule=instantiate(cfg.data))
    ckpt = tmp_path / "resume.ckpt"
    first.save_checkpoint(ckpt)
    saved = torch.load(ckpt, weights_only=False)
    saved_moment = next(iter(saved["optimizer_states"][0]["state"].values()))["exp_avg"]

    record = _RecordStart()
    second = _trainer(tmp_path, 5, record)
    module = instantiate(cfg.model)
    second.fit(module, datamodule=instantiate(cfg.data), ckpt_path=str(ckpt))
    assert record.seen == (3, 3.0, int(saved["ema"]["optimization_step"]))
    assert second.global_step == 5
    assert saved_moment.abs().sum() > 0


class _RecordIndices(pl.Callback):
    def __init__(self) -> None:
        self.indices: list[list[int]] = []

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        self.indices.append(batch["index"].tolist())


@pytest.mark.parametrize("workers", [0, 1])
def test_mid_epoch_resume_draws_the_next_batches_not_the_epoch_start_again(tmp_path, workers):
    """A resume from a step-3 checkpoint trains on the items an uninterrupted run trains on at
    steps 4-6; a plain shuffled loader draws the epoch's first batches (items seen) again."""
    cfg = compose_config([*FAST, f"data.num_workers={workers}"])
    pl.seed_everything(0)
    whole = _RecordIndices()
    saves = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=3, save_top_k=-1,
                            filename="{step}")
    _trainer(tmp_path, 6, whole, saves).fit(instantiate(cfg.model),
                                            datamodule=instantiate(cfg.data))
    pl.seed_everything(0)
    resumed = _RecordIndices()
    _trainer(tmp_path, 6, resumed).fit(instantiate(cfg.model), datamodule=instantiate(cfg.data),
                                       ckpt_path=str(tmp_path / "ckpt/step=3.ckpt"))
    assert len(whole.indices) == 6 and len(set(map(tuple, whole.indices))) == 6
    assert resumed.indices == whole.indices[3:]


class _RecordKeys(pl.Callback):
    def __init__(self) -> None:
        self.keys: list[list[str]] = []

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        self.keys.append(list(batch["__key__"]))


@pytest.mark.parametrize("workers", [0, 2])
def test_a_resampled_shard_stream_resumes_where_it_stopped_in_its_epoch(tmp_path, workers):
    """Epochs of 4 batches: resumes from steps 3 and 5 train on what an uninterrupted run
    trains on next, across the epoch's end; the stream used to play epoch 0 from its start.
    The shards come as a list, which a checkpoint must hold as plain types to load again."""
    shards = write_shards(synthetic_records(12, seed=9, image_size=32), tmp_path / "shards",
                          per_shard=3)
    cfg = compose_config([*FAST, "data=shards", f"data.shard_urls={[str(p) for p in shards]}",
                          "data.batch_size=2", "data.train_length=8",
                          f"data.num_workers={workers}"])
    whole = _RecordKeys()
    saves = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=1, save_top_k=-1,
                            filename="{step}")
    _trainer(tmp_path, 7, whole, saves).fit(instantiate(cfg.model),
                                            datamodule=instantiate(cfg.data))
    assert len(whole.keys) == 7 and whole.keys[:3] != whole.keys[4:7]
    for step in (3, 5):
        resumed = _RecordKeys()
        _trainer(tmp_path, 7, resumed).fit(instantiate(cfg.model),
                                           datamodule=instantiate(cfg.data),
                                           ckpt_path=str(tmp_path / f"ckpt/step={step}.ckpt"))
        assert resumed.keys == whole.keys[step:]


def _shard_data(shards: list, workers: int, batch_size: int, length: int) -> PairDataModule:
    data = PairDataModule(source="shards", shard_urls=[str(p) for p in shards],
                          batch_size=batch_size, image_size=32, train_length=length,
                          val_length=2, num_workers=workers)
    data.setup("fit")
    return data


def _shard_loader(shards: list, workers: int, batch_size: int, length: int,
                  state: dict | None = None) -> DataLoader:
    loader = _shard_data(shards, workers, batch_size, length).train_dataloader()
    if state:
        loader.load_state_dict(state)
    return loader


def test_a_resampled_shard_stream_resumes_at_each_batch_of_three_workers(tmp_path):
    shards = write_shards(synthetic_records(6, seed=9, image_size=32), tmp_path, per_shard=2)
    whole = _shard_loader(shards, 3, 1, 6)
    epochs = [[b["__key__"] for b in whole] for _ in range(2)]
    for skip in range(1, 6):
        state = {"epoch": 1, "batches": skip, "processes": 1, "workers": 3}
        resumed = _shard_loader(shards, 3, 1, 6, state)
        assert [b["__key__"] for b in resumed] == epochs[1][skip:], skip


def test_a_resumed_shard_stream_drops_undecoded_and_warns_in_another_placement(
        tmp_path, caplog):
    shards = write_shards(synthetic_records(6, seed=9, image_size=32), tmp_path, per_shard=3)
    data = _shard_data(shards, 0, 2, 8)
    loader = data.train_dataloader()
    epochs = [[b["__key__"] for b in loader] for _ in range(2)]
    assert len(epochs[0]) == 4 and epochs[0] != epochs[1]
    loader.load_state_dict({"epoch": 1, "batches": 1, "processes": 1, "workers": 1})
    decoded = data.shard_errors.read
    assert [b["__key__"] for b in loader] == epochs[1][1:]
    assert data.shard_errors.read - decoded == 6  # the first batch's 2 samples not decoded
    loader.load_state_dict({"epoch": 1, "batches": 1, "processes": 2, "workers": 1})
    assert [b["__key__"] for b in loader] == epochs[1]
    assert "plays epoch 1 from its start" in caplog.text
    loader.load_state_dict({"epoch": 0, "batches": 4, "processes": 1, "workers": 1})
    assert [b["__key__"] for b in loader] == epochs[1]


class _RecordBar(pl.Callback):
    seen: tuple | None = None

    def on_train_batch_start(self, trainer, *args) -> None:
        bar = trainer.progress_bar_callback.train_progress_bar
        self.seen = self.seen or (bar.desc, bar.total, bar.initial, bar.n)


def test_a_progress_bar_resumed_mid_epoch_starts_at_the_restored_batch(tmp_path):
    """Lightning's bar showed `3/?` and counted the restored batches as done in the first
    second; the bar starts at them, with the epoch's total, so its rate is this run's."""
    cfg = compose_config([*FAST, "data.train_length=40"])
    saves = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=3, filename="{step}")
    _trainer(tmp_path, 3, saves).fit(instantiate(cfg.model), datamodule=instantiate(cfg.data))
    record = _RecordBar()
    trainer = pl.Trainer(accelerator="cpu", max_steps=6, logger=False, limit_val_batches=0,
                         callbacks=[ResumableProgressBar(), record],
                         enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(instantiate(cfg.model), datamodule=instantiate(cfg.data),
                ckpt_path=str(tmp_path / "step=3.ckpt"))
    assert record.seen == ("Epoch 0: ", 6, 3, 3)  # 3 steps to go of 10 batches


def test_a_finished_epoch_resumes_at_the_start_of_the_next_permutation():
    datamodule = instantiate(compose_config([*FAST, "data.train_length=12"]).data)
    datamodule.setup("fit")
    loader = datamodule.train_dataloader()
    loader.sampler.set_epoch(1)
    next_epoch = [b["index"].tolist() for b in loader]
    loader.load_state_dict({"epoch": 0, "items": 12})
    assert [b["index"].tolist() for b in loader] == next_epoch
    loader.sampler.set_epoch(0)
    first_epoch = [b["index"].tolist() for b in loader]
    assert first_epoch != next_epoch and len(next_epoch) == 3
    loader.load_state_dict({"epoch": 0, "items": 4})
    assert [b["index"].tolist() for b in loader] == first_epoch[1:]


@pytest.mark.parametrize("before, after", [(2, 1), (1, 2), (2, 3)])
def test_a_resume_in_another_number_of_processes_draws_each_item_once(before, after):
    """What `before` ranks drew, then what `after` ranks draw from the saved state: no item
    twice, and only the epoch's last partial batch left out (the state counts the items of
    all ranks, not the batches of one)."""
    items = list(range(48))

    def loaders(world: int) -> list[ResumableLoader]:
        return [ResumableLoader(items, batch_size=2, drop_last=True,
                                sampler=ResumableSampler(items, seed=3, num_replicas=world, rank=r))
                for r in range(world)]

    first, drawn = loaders(before), []
    for loader in first:
        batches = iter(loader)
        drawn += [i for _ in range(3) for i in next(batches).tolist()]
    state = first[0].state_dict()
    assert state == {"epoch": 0, "items": 6 * before}
    for loader in loaders(after):
        loader.load_state_dict(state)
        drawn += [i for batch in loader for i in batch.tolist()]
    assert len(set(drawn)) == len(drawn) and len(items) - len(drawn) < 2 * after


def test_a_resume_in_the_same_run_folder_keeps_the_csv_rows_before_its_step(tmp_path):
    """Lightning's CSV logger deletes a folder's metrics.csv when it starts: a run resumed in
    its own folder lost everything logged before the checkpoint."""
    from train import train

    def run(*extra: str) -> list[dict[str, str]]:
        cfg = compose_config([*FAST, "logger=csv", "trainer.log_every_n_steps=1",
                              "trainer.val_check_interval=2",
                              "callbacks.model_checkpoint.every_n_train_steps=2",
                              "callbacks.progress_bar.refresh_rate=0", *extra])
        cfg.paths.output_dir = str(tmp_path)
        train(cfg)
        with open(tmp_path / "csv" / "metrics.csv", newline="") as file:
            return list(csv.DictReader(file))

    def losses(rows: list[dict[str, str]]) -> dict[int, str]:
        return {int(r["step"]): r["train/loss"] for r in rows if r.get("train/loss")}

    first = run("trainer.max_steps=4")
    resumed = run("trainer.max_steps=5", f"ckpt_path={tmp_path}/checkpoints/step0000002.ckpt")
    before = {k: v for k, v in losses(first).items() if k < 2}  # logged step = batch index
    assert before and all(losses(resumed)[k] == v for k, v in before.items())
    assert [int(r["step"]) for r in resumed if r.get("train/loss")] == list(range(5))
    assert any(r.get("val/loss") for r in resumed if int(r["step"]) < 2)


SEARCH_CONFIG = Path(__file__).resolve().parents[1] / "configs/hparams_search/tiny_optuna.yaml"


@pytest.fixture(scope="module")
def entry_point_run(tmp_path_factory) -> tuple[subprocess.CompletedProcess, Path]:
    """``python train.py`` end to end for 2 steps: the one real run the tests below share.

    It returns the search's optimized metric, so a search config naming a metric that a real
    run does not log fails here.
    """
    log_dir = tmp_path_factory.mktemp("train_entry")
    metric = OmegaConf.load(SEARCH_CONFIG).optimized_metric
    cmd = [sys.executable, "train.py", *FAST, "trainer.max_steps=2", "trainer.val_check_interval=2",
           f"paths.log_dir={log_dir}", "callbacks.model_checkpoint.every_n_train_steps=2",
           f"optimized_metric={metric}"]
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done, log_dir


def test_train_entry_point_runs_and_exports(entry_point_run):
    done, log_dir = entry_point_run
    assert "Training finished" in done.stdout and "baseline: whole_reference" in done.stdout
    metric = OmegaConf.load(SEARCH_CONFIG).optimized_metric
    assert f"optimized metric {metric} = " in done.stdout  # main() returned it
    exports = [p.parent for p in log_dir.glob("train/*/export/model_index.json")]
    assert len(exports) == 1
    assert f"exported pipeline: {exports[0]}" in done.stdout
    from data.provenance import read_training_data

    record = read_training_data(exports[0])  # eval.py checks benchmarks against it
    assert record["train"]["namespace"] == "train" and record["train"]["seed"] == 0
    assert record["validation"]["namespace"] == "validation"
    assert list(log_dir.glob("train/*/checkpoints/last.ckpt"))
    assert list(log_dir.glob("train/*/csv/metrics.csv"))


def test_train_exports_one_pipeline_folder(entry_point_run, tmp_path):
    """The export is the diffusers layout, once; it loads and refines, uncalibrated until
    eval.py says otherwise, with the EMA weights the run ended with."""
    import numpy as np

    from data.benchmark import load_benchmark, write_synthetic_benchmark
    from models.export import load_pipeline

    _, log_dir = entry_point_run
    (export,) = [p.parent for p in log_dir.glob("train/*/export/model_index.json")]
    for part in ("unet", "reference_encoder"):
        assert (export / part / "config.json").is_file()
        assert (export / part / "diffusion_pytorch_model.safetensors").is_file()
    assert (export / "scheduler" / "scheduler_config.json").is_file()
    assert (export / "model.yaml").is_file()
    assert not (export / "vae").exists()  # the tiny model is pixel-space
    assert not list(export.glob("*.safetensors")) and not (export / "diffusers").exists()

    pipe = load_pipeline(export)
    model_cfg = OmegaConf.load(export / "model.yaml")
    assert not pipe.calibrated
    assert (pipe.alignment.timestep, pipe.alignment.block) == (model_cfg.val_timestep,
                                                                model_cfg.val_block)
    write_synthetic_benchmark(tmp_path, 1, seed=3)
    (case,), _ = load_benchmark(tmp_path)
    from models.pipeline import RefinementConfig

    out = pipe(case.image, case.mask, case.reference, RefinementConfig(num_steps=2), seed=5)
    assert not np.array_equal(out.images[0][case.mask], case.image[case.mask])
    assert np.array_equal(out.images[0][~case.mask], case.image[~case.mask])


def test_cls_token_ablation_trains_and_validates_without_a_map(tmp_path):
    cfg = compose_config(FAST + ["experiment=ablation_cls_token", "model.attn_loss_weight=0.5"])
    module = instantiate(cfg.model)
    assert not module.has_token_grid and module.hparams.attn_loss_weight == 0
    trainer = pl.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_progress_bar=False,
                         default_root_dir=tmp_path, limit_val_batches=1, val_check_interval=1,
                         enable_model_summary=False, enable_checkpointing=False)
    trainer.fit(module, datamodule=instantiate(cfg.data))
    assert "val/loss" in trainer.callback_metrics
    assert "val/miou_mask" not in trainer.callback_metrics


@pytest.mark.parametrize("scope", ["true", "full", "regional"])
def test_compiled_denoiser_keeps_parameter_names(scope):
    """Compiling in place leaves state-dict keys alone: checkpoints, EMA and export load.
    Regional compiles each transformer block and leaves the UNet's own forward eager."""
    module = instantiate(compose_config(FAST + [f"model.compile_denoiser={scope}"]).model)
    keys = list(module.state_dict())
    blocks = [m for m in module.denoiser.modules() if type(m).__name__ == "BasicTransformerBlock"]
    module.setup("validate")
    assert module.denoiser._compiled_call_impl is None
    module.setup("fit")
    assert (module.denoiser._compiled_call_impl is None) == (scope == "regional")
    assert blocks and all((b._compiled_call_impl is not None) == (scope == "regional")
                          for b in blocks)
    assert list(module.state_dict()) == keys


def test_compile_scope_is_checked():
    module = instantiate(compose_config(FAST + ["model.compile_denoiser=everything"]).model)
    with pytest.raises(ValueError, match="compile scope 'everything'"):
        module.setup("fit")


@pytest.mark.slow
def test_compiled_denoiser_gives_the_eager_losses_and_gradients(tiny_batch):
    """torch.compile (inductor, CPU) of the denoiser, full and regional, with attention
    captured for the loss."""
    results = []
    for compiled in (False, True, "regional"):
        torch.manual_seed(0)
        module = instantiate(compose_config(FAST + [f"model.compile_denoiser={compiled}"]).model)
        module.setup("fit")
        timesteps = torch.tensor([100, 400, 700, 900])
        out = module.model_step(tiny_batch, torch.Generator().manual_seed(0), [0, 3], timesteps)
        loss = out["diffusion"].mean() + module.alignment_loss(
            out["attention"], tiny_batch, torch.ones(4, dtype=torch.bool))
        loss.backward()
        results.append((loss.detach(), module.denoiser.conv_in.weight.grad.clone()))
    (eager_loss, eager_grad), *compiled = results
    for compiled_loss, compiled_grad in compiled:
        torch.testing.assert_close(compiled_loss, eager_loss, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(compiled_grad, eager_grad, rtol=1e-3, atol=1e-5)


def test_ema_shadow_weights_become_private_to_the_process():
    """ddp_spawn on CPU hands ranks shared-memory tensors; each rank must average on its own."""
    module = instantiate(compose_config(FAST).model)
    ema = EMA(0.999)
    for p in ema.track(module).shadow_params:
        p.share_memory_()
    before = [p.clone() for p in ema.ema.shadow_params]
    ema.on_fit_start(None, module)
    assert not any(p.is_shared() for p in ema.ema.shadow_params)
    assert all(torch.equal(a, b) for a, b in zip(before, ema.ema.shadow_params, strict=True))


class _FailInValidation(pl.Callback):
    """Records the trained weights before validation, then fails inside it."""

    def on_train_batch_end(self, trainer, module, *args) -> None:
        self.trained = [p.detach().clone() for p in module.trainable_parameters()]

    def on_validation_batch_end(self, trainer, module, *args) -> None:
        self.seen = [p.detach().clone() for p in module.trainable_parameters()]
        raise RuntimeError("failed inside validation")


def test_a_validation_that_raises_leaves_the_trained_weights_in_place(tmp_path):
    """The EMA weights are swapped in for validation; an error there must not leave them in
    the module (a resumed or continued run would train on the average)."""
    cfg = compose_config(FAST)
    module, spy = instantiate(cfg.model), _FailInValidation()
    trainer = pl.Trainer(accelerator="cpu", max_steps=3, logger=False, enable_progress_bar=False,
                         default_root_dir=tmp_path, limit_val_batches=1, val_check_interval=3,
                         enable_model_summary=False, enable_checkpointing=False,
                         num_sanity_val_steps=0, callbacks=[spy])
    with pytest.raises(RuntimeError, match="failed inside validation"):
        trainer.fit(module, datamodule=instantiate(cfg.data))
    shadow = ema_callback(trainer).ema.shadow_params
    # validation did run on the EMA weights, which differ from the trained ones
    assert all(torch.equal(a, b) for a, b in zip(spy.seen, shadow, strict=True))
    assert any(not torch.equal(a, b) for a, b in zip(spy.trained, shadow, strict=True))
    now = module.trainable_parameters()
    assert all(torch.equal(a, b) for a, b in zip(now, spy.trained, strict=True))


def test_val_table_rebuilt_from_logged_metrics_equals_the_modules(tmp_path):
    """What a ddp_spawn parent prints (it only gets rank 0's logged metrics)."""
    from models.lightning_module import val_table_from_metrics
    from train import train

    cfg = compose_config(FAST + ["trainer.max_steps=1", "trainer.val_check_interval=1",
                                 "logger=csv", "callbacks.progress_bar.refresh_rate=0"])
    cfg.paths.output_dir = str(tmp_path)
    result = train(cfg)
    table = result["val_table"]
    assert table["blocks"] and table["baselines"]
    rebuilt = val_table_from_metrics(result["metrics"], cfg.model.val_timestep)
    assert rebuilt.keys() == table.keys() and rebuilt["best_block"] == table["best_block"]
    for part in ("blocks", "baselines"):
        assert rebuilt[part].keys() == table[part].keys()
        for name, scores in table[part].items():
            assert rebuilt[part][name] == pytest.approx(scores, abs=1e-6)
    assert val_table_from_metrics({}, 300) == {}
