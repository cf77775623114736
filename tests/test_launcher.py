"""The SLURM launcher config renders to the sbatch script we mean (no cluster needed)."""

from __future__ import annotations

import os

import pytest
import submitit
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from tests.conftest import CONFIG_DIR


class _Submitted(Exception):
    """Raised in place of the sbatch call, carrying the configured executor."""


def test_slurm_launcher_asks_one_task_per_gpu(tmp_path, monkeypatch) -> None:
    fake_bin = tmp_path / "bin"  # submitit only checks that srun exists
    fake_bin.mkdir()
    (fake_bin / "srun").write_text("#!/bin/sh\nexit 1\n")
    (fake_bin / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake_bin}:{os.environ['PATH']}")
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("train", return_hydra_config=True, overrides=[
            "hydra/launcher=slurm", "trainer=ddp", "trainer.devices=4", "trainer.num_nodes=2",
            "hydra.launcher.partition=a100", "experiment=ablation_mixed"])
    cfg.hydra.sweep.dir = str(tmp_path / "sweep")
    launcher = instantiate(cfg.hydra.launcher)
    launcher.setup(hydra_context=None, task_function=None, config=cfg)

    def submit(executor, *args):
        raise _Submitted(executor)

    monkeypatch.setattr(submitit.AutoExecutor, "map_array", submit)
    with pytest.raises(_Submitted) as submitted:
        launcher.launch([["seed=1"], ["seed=2"]], initial_job_idx=0)
    executor = submitted.value.args[0]
    script = executor._executor._make_submission_file_text("python -u train.py", "uid")
    for line in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=4", "#SBATCH --gpus-per-node=4",
                 "#SBATCH --partition=a100", "#SBATCH --time=1440",
                 "#SBATCH --job-name=ablation_mixed", "export NCCL_ASYNC_ERROR_HANDLING=1"):
        assert line in script, line
    assert "srun" in script  # one task per rank: Lightning reads SLURM_PROCID, spawns nothing
