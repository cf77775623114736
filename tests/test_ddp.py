"""Multi-process data parallel on CPU (gloo): shard splitting, checkpoint resume, launching."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD, WORKERS, SHARDS, PER_SHARD = 2, 2, 8, 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _read_rank(rank: int, port: int, urls: list[str], out_dir: str, rank_env: bool) -> None:
    """One rank: iterate its split of the shards with WORKERS loader workers, save the keys."""
    from torch.utils.data import DataLoader

    from data.shards import shard_dataset

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if rank_env:  # what torchrun exports; Lightning's own DDP launcher and SLURM do not
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(WORLD))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        loader = DataLoader(shard_dataset(urls, seed=0, image_size=32, reference_size=56),
                            batch_size=1, num_workers=WORKERS)
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


def test_ddp_child_command_runs_only_its_job(monkeypatch, tmp_path) -> None:
    """Under a multirun, the DDP child gets this job's overrides, not the sweep."""
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig

    from distributed import job_subprocess_command, use_job_command_for_ddp_children
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

