"""Multi-process data parallel on CPU (gloo): shard splitting, checkpoint resume, launching."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD, WORKERS, SHARDS, PER_SHARD = 2, 2, 8, 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _read_rank(rank: int, port: int, urls: list[str], out_dir: str, rank_env: bool,
               resampled: bool = False) -> None:
    """One rank: iterate its split of the shards with WORKERS loader workers, save the keys."""
    from torch.utils.data import DataLoader

    from data.shards import shard_dataset

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if rank_env:  # what torchrun exports; Lightning's own DDP launcher and SLURM do not
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(WORLD))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        dataset = shard_dataset(urls, seed=0, image_size=32, reference_size=56,
                                resampled=resampled, epoch_length=8 if resampled else None)
        loader = DataLoader(dataset, batch_size=1, num_workers=WORKERS)
        keys = [k for batch in loader for k in batch["__key__"]]
        Path(out_dir, f"rank{rank}.txt").write_text("\n".join(keys))
        dist.barrier()
    finally:
        dist.destroy_process_group()


# rank_env=False is Lightning's own DDP launcher and SLURM: no RANK for webdataset to read in
# the loader workers, so the split must be resolved from the process group in the main process
@pytest.mark.parametrize("rank_env", [True, False])
def test_shards_split_disjoint_over_ranks_and_workers(tmp_path, rank_env: bool) -> None:
    from data.shards import synthetic_records, write_shards

    shards = write_shards(synthetic_records(SHARDS * PER_SHARD, seed=0, image_size=32,
                                            reference_size=56), tmp_path / "shards", PER_SHARD)
    assert len(shards) == SHARDS
    urls = [str(s) for s in shards]
    mp.start_processes(_read_rank, args=(_free_port(), urls, str(tmp_path), rank_env),
                       nprocs=WORLD,
                       start_method="spawn")
    seen = [Path(tmp_path, f"rank{r}.txt").read_text().split() for r in range(WORLD)]
    assert all(len(keys) == SHARDS * PER_SHARD // WORLD for keys in seen)
    assert not set(seen[0]) & set(seen[1])
    expected = {f"{0:06d}_{i:08d}" for i in range(SHARDS * PER_SHARD)}
    assert set(seen[0]) | set(seen[1]) == expected


def test_resampled_streams_differ_between_ranks_and_replay_on_rerun(tmp_path) -> None:
    """Resampling (the default for shards) with the same data seed on every rank: each rank
    and worker reads its own stream, and a second run reads the same streams again."""
    from data.shards import synthetic_records, write_shards

    shards = write_shards(synthetic_records(SHARDS * PER_SHARD, seed=0, image_size=32,
                                            reference_size=56), tmp_path / "shards", PER_SHARD)
    runs = []
    for run in ("first", "second"):
        out = tmp_path / run
        out.mkdir()
        mp.start_processes(_read_rank, args=(_free_port(), [str(s) for s in shards], str(out),
                                             False, True), nprocs=WORLD, start_method="spawn")
        runs.append([Path(out, f"rank{r}.txt").read_text().split() for r in range(WORLD)])
    seen = runs[0]
    assert all(len(keys) == 8 * WORKERS for keys in seen)
    assert seen[0] != seen[1]
    assert seen[0][0::2] != seen[0][1::2]  # the loader alternates its two workers
    assert runs[1] == runs[0]


def _resume_rank(rank: int, port: int, urls: list[str], out_dir: str) -> None:
    """One rank: two epochs of its resampled stream, then epoch 1 again resumed at batch 3."""
    from data.resumable_loader import ResumableStream, ResumableStreamLoader
    from data.shards import shard_dataset

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)

    def loader() -> ResumableStreamLoader:
        stream = shard_dataset(urls, seed=0, image_size=32, reference_size=56, resampled=True,
                               epoch_length=4, rank=rank, world_size=WORLD)
        return ResumableStreamLoader(ResumableStream(stream, 4, 1, WORKERS), batch_size=1,
                                     num_workers=WORKERS, persistent_workers=True)

    try:
        whole = loader()
        epochs = [[k for batch in whole for k in batch["__key__"]] for _ in range(2)]
        resumed = loader()
        resumed.load_state_dict({"epoch": 1, "batches": 3, "processes": WORLD,
                                 "workers": WORKERS})
        tail = [k for batch in resumed for k in batch["__key__"]]
        lines = [" ".join(epochs[0]), " ".join(epochs[1]), " ".join(tail)]
        Path(out_dir, f"rank{rank}.txt").write_text("\n".join(lines))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_a_resampled_stream_resumes_in_each_of_two_processes(tmp_path) -> None:
    from data.shards import synthetic_records, write_shards

    shards = write_shards(synthetic_records(SHARDS * PER_SHARD, seed=0, image_size=32,
                                            reference_size=56), tmp_path / "shards", PER_SHARD)
    mp.start_processes(_resume_rank, args=(_free_port(), [str(s) for s in shards],
                                           str(tmp_path)), nprocs=WORLD, start_method="spawn")
    ranks = [[line.split() for line in Path(tmp_path, f"rank{r}.txt").read_text().splitlines()]
             for r in range(WORLD)]
    for first, second, tail in ranks:
        assert len(first) == len(second) == 4 * WORKERS and first != second
        assert tail == second[3:]
    assert ranks[0][1] != ranks[1][1]


def test_ddp_child_command_runs_only_its_job(monkeypatch, tmp_path) -> None:
    """Under a multirun, the DDP child gets this job's overrides, not the sweep."""
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig

    from models.distributed import job_subprocess_command, use_job_command_for_ddp_children
    from tests.conftest import CONFIG_DIR

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("train", overrides=["experiment=ablation_mixed", "seed=3"],
                      return_hydra_config=True)
    cfg.hydra.runtime.output_dir = str(tmp_path / "multirun" / "1")
    cfg.hydra.job.name = "train"
    HydraConfig.instance().set_config(cfg)
    monkeypatch.setattr("sys.argv", ["train.py", "-m", "experiment=ablation_mixed,x", "seed=3"])
    monkeypatch.setattr("hydra.utils.get_original_cwd", lambda: str(tmp_path))
    command, cwd = job_subprocess_command(1)
    job_args = command[command.index("--config-name=train"):]
    assert "-m" not in job_args and "experiment=ablation_mixed,x" not in job_args
    assert "experiment=ablation_mixed" in command and "seed=3" in command
    assert f'hydra.run.dir="{tmp_path / "multirun" / "1"}"' in command
    assert cwd == str(tmp_path)
    use_job_command_for_ddp_children()
    from pytorch_lightning.strategies.launchers import subprocess_script

    assert subprocess_script._hydra_subprocess_cmd is job_subprocess_command


@pytest.mark.slow
def test_two_process_checkpoint_resumes_in_one(tmp_path) -> None:
    """A 2-process (ddp_spawn, gloo) run's last.ckpt resumes in 1 process, and back in 2."""
    from tests.conftest import compose_config
    from train import train

    common = ["model.val_sample_steps=2", "model.val_num_samples=1", "data.num_workers=0",
              "data.batch_size=2", "data.val_length=2", "trainer.val_check_interval=2",
              "logger=csv", "callbacks.model_checkpoint.every_n_train_steps=2",
              "callbacks.progress_bar.refresh_rate=0"]
    cfg = compose_config(common + ["trainer.max_steps=2", "+trainer.strategy=ddp_spawn",
                                   "trainer.devices=2"])
    cfg.paths.output_dir = str(tmp_path / "two")
    first = train(cfg)
    ckpt = Path(first["checkpoint_dir"]) / "last.ckpt"
    assert ckpt.is_file()  # (ddp_spawn trains in children: the parent's trainer stays at 0)
    assert first["val_table"]["blocks"]  # rebuilt from rank 0's metrics in the parent
    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    assert "ema" in state and state["global_step"] == 2

    cfg = compose_config(common + ["trainer.max_steps=4", f"ckpt_path={ckpt}"])
    cfg.paths.output_dir = str(tmp_path / "one")
    second = train(cfg)
    assert second["global_step"] == 4

    # and the reverse: the 1-process checkpoint resumes in 2 processes
    one_ckpt = Path(second["checkpoint_dir"]) / "last.ckpt"
    cfg = compose_config(common + ["trainer.max_steps=6", "+trainer.strategy=ddp_spawn",
                                   "trainer.devices=2", f"ckpt_path={one_ckpt}"])
    cfg.paths.output_dir = str(tmp_path / "two_again")
    third = train(cfg)
    state = torch.load(Path(third["checkpoint_dir"]) / "last.ckpt", map_location="cpu",
                       weights_only=False)
    assert state["global_step"] == 6 and "ema" in state


class _SaveRankValidation(pl.Callback):
    """Writes what each rank validated (sample indices) and its `val_table` to `out_dir`."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir = out_dir

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        torch.save({"indices": list(trainer.val_dataloaders.sampler),
                    "val_table": pl_module.val_table},
                   Path(self.out_dir, f"rank{trainer.global_rank}.pt"))


@pytest.mark.slow
def test_validation_metrics_reduce_over_two_processes(tmp_path) -> None:
    """2-process (ddp_spawn, gloo) validation logs the baseline mIoUs of the whole set.

    The set is ordered so that the two ranks' halves (DistributedSampler, no shuffle: rank r
    takes positions r, r+2, ...) have clearly different baseline mIoU: an unsynced rank 0
    would log its own half's mean, not the whole set's. (An earlier version passed without the
    sync too: a CPU ddp_spawn launch hands the module to the ranks through shared memory and
    Lightning unshares only parameters and buffers, so the MeanMetric states were one tensor
    that both ranks updated; the module now resets them at the start of each validation.)
    Fails with MeanMetric(sync_on_compute=False): each value is then rank 0's half.
    """
    from hydra.utils import instantiate
    from torch.utils.data import DataLoader, DistributedSampler, Subset

    from models.correspondence import baseline_scores
    from models.lightning_module import BASELINES
    from tests.conftest import compose_config

    cfg = compose_config(["data.val_length=8", "data.batch_size=2", "data.num_workers=0",
                          "model.val_sample_steps=1", "model.val_num_samples=1"])
    datamodule = instantiate(cfg.data)
    datamodule.setup("validate")
    items = [datamodule.val_set[i] for i in range(len(datamodule.val_set))]
    scores = baseline_scores(torch.stack([x["mask"] for x in items]),
                             torch.stack([x["reference_mask"] for x in items]))
    keys = [f"{name}_{kind}" for name in BASELINES for kind in ("mask", "box")]
    per_sample = {f"{n}_{k}": scores[n][k].double() for n in BASELINES for k in ("mask", "box")}
    # best half (by the sum of the four scores) at even positions, worst half at odd ones
    ranked = torch.stack(list(per_sample.values())).sum(0).argsort(descending=True).tolist()
    half = len(ranked) // 2
    order = [i for pair in zip(ranked[:half], ranked[half:], strict=True) for i in pair]
    val_set = Subset(datamodule.val_set, order)
    split = [[order[j] for j in DistributedSampler(val_set, num_replicas=WORLD, rank=r,
                                                   shuffle=False)] for r in range(WORLD)]
    whole = {k: float(v.mean()) for k, v in per_sample.items()}
    halves = [{k: float(v[idx].mean()) for k, v in per_sample.items()} for idx in split]
    for k in keys:  # the test is only meaningful if the halves clearly differ
        assert abs(halves[0][k] - halves[1][k]) > 0.02, (k, halves)

    def validate(devices: int, out_dir: Path) -> dict[str, float]:
        pl.seed_everything(0)
        module = instantiate(cfg.model)
        out_dir.mkdir()
        trainer = pl.Trainer(
            accelerator="cpu", devices=devices, logger=False, enable_progress_bar=False,
            enable_model_summary=False, enable_checkpointing=False,
            callbacks=[_SaveRankValidation(str(out_dir))],
            **({"strategy": "ddp_spawn"} if devices > 1 else {}))
        loader = DataLoader(val_set, batch_size=cfg.data.batch_size, shuffle=False)
        (logged,) = trainer.validate(module, dataloaders=loader, verbose=False)
        return {k: logged[f"val/baseline_{k}"] for k in keys}  # rank 0's, in a ddp_spawn parent

    one = validate(1, tmp_path / "one")
    two = validate(WORLD, tmp_path / "two")
    ranks = [torch.load(tmp_path / "two" / f"rank{r}.pt", weights_only=False)
             for r in range(WORLD)]
    assert [sorted(order[j] for j in r["indices"]) for r in ranks] == [sorted(s) for s in split]
    table = ranks[0]["val_table"]["baselines"]
    values = {"1 process": one, "2 processes, logged": two,
              "2 processes, rank-0 val_table": {f"{n}_{k}": table[n][k] for n in table
                                                for k in table[n]}}
    for k in keys:
        for source, got in values.items():
            assert got[k] == pytest.approx(whole[k], abs=1e-6), (k, source, got[k], whole[k],
                                                                 halves)
            assert all(abs(got[k] - h[k]) > 0.005 for h in halves), (k, source, halves)
    # every block's mIoU (model-dependent) is the same on both ranks once reduced
    assert ranks[1]["val_table"] == ranks[0]["val_table"]


def test_fsdp_config_without_norm_clipping_and_refused_with_ema() -> None:
    """trainer=fsdp (which Lightning runs on CUDA only): no norm clipping, no EMA."""
    from models.distributed import check_config, uses_fsdp
    from tests.conftest import compose_config
    from train import train

    cfg = compose_config(["trainer=fsdp"])
    assert uses_fsdp(cfg.trainer)
    assert cfg.trainer.gradient_clip_val is None  # FSDPPrecision rejects norm clipping
    with pytest.raises(ValueError, match="model.ema_decay=null"):
        train(cfg)
    check_config(compose_config(["trainer=fsdp", "model.ema_decay=null"]))
    check_config(compose_config(["trainer=ddp"]))  # EMA is fine without sharding
    assert not uses_fsdp(compose_config(["+trainer.strategy=ddp_spawn"]).trainer)
    assert uses_fsdp(compose_config(["+trainer.strategy=fsdp"]).trainer)


def _fsdp_rank(rank: int, port: int, overrides: list[str], out_dir: str) -> None:
    """One rank of a torchrun-style FSDP run: the whole of train.py's ``train()``."""
    from tests.conftest import compose_config
    from tests.cpu_fsdp import torchrun_env
    from train import train

    torch.set_num_threads(1)  # 2 ranks on 2 cores
    torchrun_env(rank, WORLD, port)
    cfg = compose_config(overrides)
    cfg.paths.output_dir = out_dir
    result = train(cfg)
    torch.save({k: result[k] for k in ("export_dir", "global_step", "checkpoint_dir")},
               Path(out_dir, f"rank{rank}.pt"))


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_fsdp_train_completes_on_two_cpu_processes(tmp_path, precision: str) -> None:
    """trainer=fsdp, 2 gloo processes (CPU test harness): fit, validation with the sample grid,
    sharded checkpoint and export; the export holds the trained whole weights.

    Ranks start torchrun-style (each runs ``train()``): FSDPStrategy only launches by re-running
    the script, and a ddp_spawn-style launch would not run train.py's export on every rank.
    max_steps=3 with validation every 2 steps: the last validation (step 3) comes from
    ValidateAtLastStep (trainer.validate after fit fails under FSDP).
    """
    import time

    import numpy as np
    from hydra.utils import instantiate
    from PIL import Image
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    from models.export import read_weights
    from tests.conftest import compose_config

    common = ["model.ema_decay=null", "model.val_sample_steps=1", "model.val_num_samples=1",
              "model.lr_scheduler.num_warmup_steps=0", "data.num_workers=0",
              "data.batch_size=2", "data.val_length=4", "logger=csv",
              "callbacks.progress_bar.refresh_rate=0"]
    fsdp = ["trainer=fsdp", "trainer.accelerator=cpu", f"trainer.devices={WORLD}",
            f"trainer.precision={precision}", "trainer.max_steps=3",
            "trainer.val_check_interval=2", "callbacks.model_checkpoint.every_n_train_steps=3",
            "trainer.strategy._target_=tests.cpu_fsdp.CPUFSDPStrategy"]
    out = tmp_path / "fsdp"
    ranks = mp.start_processes(_fsdp_rank, args=(_free_port(), common + fsdp, str(out)),
                               nprocs=WORLD, start_method="spawn", join=False)
    deadline = time.monotonic() + 600
    while not ranks.join(timeout=5):  # raises if a rank failed (and ends the other one)
        if time.monotonic() > deadline:
            for process in ranks.processes:
                process.kill()
            pytest.fail("FSDP ranks still running after 600 s: a collective some rank skipped?")

    results = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    assert [r["global_step"] for r in results] == [3] * WORLD
    assert results[0]["export_dir"] == out / "export" and results[1]["export_dir"] is None
    samples = out / "csv" / "samples"
    assert sorted(p.name for p in samples.iterdir()) == ["step0000002.png", "step0000003.png"]

    # the export is the trained whole weights: those of the sharded (distcp) checkpoint
    ckpt = Path(results[0]["checkpoint_dir"]) / "last.ckpt"
    assert ckpt.is_dir()  # state_dict_type: sharded
    assert torch.load(ckpt / "meta.pt", weights_only=False)["global_step"] == 3
    dcp_to_torch_save(ckpt, tmp_path / "consolidated.pt")
    trained = torch.load(tmp_path / "consolidated.pt", weights_only=False)["model"]
    exported = read_weights(out / "export")

    def part(name: str) -> dict[str, torch.Tensor]:
        return {k[len(name) + 1:]: v for k, v in exported.items() if k.startswith(f"{name}.")}

    pl.seed_everything(0)  # cfg.seed: the weights train() started from
    initial = instantiate(compose_config(common).model)
    changed = 0
    for name in ("denoiser", "reference_encoder"):
        got = part(name)
        start = getattr(initial, name).state_dict()
        want = {k[len(name) + 1:]: v for k, v in trained.items() if k.startswith(f"{name}.")}
        assert got.keys() == want.keys() == start.keys()
        for k in got:
            assert got[k].dtype == torch.float32 and got[k].shape == start[k].shape, k
            assert torch.equal(got[k], want[k]), k
            changed += not torch.equal(got[k], start[k])
    assert changed > len(trained) // 2, (changed, len(trained))

    if precision == "32-true":
        # the last grid was sampled with the whole weights: the same grid as one process gives
        # with the exported weights (rank 0's first validation sample is the set's first)
        cfg = compose_config(common)
        module = instantiate(cfg.model)
        module.denoiser.load_state_dict(part("denoiser"))
        module.reference_encoder.load_state_dict(part("reference_encoder"))
        trainer = pl.Trainer(accelerator="cpu", devices=1, limit_val_batches=1,
                             enable_progress_bar=False, enable_checkpointing=False,
                             logger=pl.loggers.CSVLogger(str(tmp_path / "eager"), name="",
                                                         version=""))
        trainer.validate(module, datamodule=instantiate(cfg.data), verbose=False)
        grids = [np.asarray(Image.open(path)) for path in
                 (samples / "step0000003.png", tmp_path / "eager" / "samples" / "step0000000.png")]
        assert np.array_equal(*grids)


@pytest.mark.slow
def test_cpu_ddp_main_job_runs_on_two_processes(tmp_path):
    """``python train.py experiment=cpu_ddp`` end to end for 2 steps: Lightning's subprocess
    launcher starts rank 1 from this job's command, both ranks train, rank 0 validates and
    exports. (About 40 s on 2 cores: two processes, each importing the stack.)"""
    cmd = [sys.executable, "train.py", "experiment=cpu_ddp", "data.image_size=32",
           "data.num_workers=0", "data.val_length=4", "model.val_sample_steps=2",
           "model.val_num_samples=2", "trainer.max_steps=2", f"hydra.run.dir={tmp_path}"]
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    log = done.stdout + done.stderr
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in log and "Starting with 2 processes" in log
    assert "baseline: whole_reference" in done.stdout
    assert (tmp_path / "export" / "model_index.json").is_file()
