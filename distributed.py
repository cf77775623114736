"""Multi-GPU launching with Hydra: make Lightning's DDP child processes run one job only.

Started from a shell with ``strategy=ddp`` and ``devices=N``, Lightning starts local ranks
1..N-1 by re-running ``sys.argv``. Under ``python train.py -m a=1,2`` that command line is
the whole sweep, so every child starts a sweep of its own and rank 0 waits forever (the known
DDP + multirun hang, Lightning issue #11300). :func:`use_job_command_for_ddp_children` makes
each child run exactly the job of its rank 0: that job's own overrides, in RUN mode, in that
job's output directory. Under SLURM (``hydra/launcher=slurm``) nothing is re-launched: each
task is one rank already, and this patch is never called.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence

log = logging.getLogger(__name__)


def job_subprocess_command(local_rank: int) -> tuple[Sequence[str], str]:
    """(command, cwd) that re-runs the current Hydra job alone as local rank ``local_rank``."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.utils import get_original_cwd, to_absolute_path

    import __main__

    hc = HydraConfig.get()
    if __main__.__spec__ is None:
        command = [sys.executable, to_absolute_path(sys.argv[0])]
    else:
        command = [sys.executable, "-m", __main__.__spec__.name]
    if hc.job.config_name:
        command.append(f"--config-name={hc.job.config_name}")
    command += list(hc.overrides.task)  # this job's overrides, sweep values already chosen
    command += [f'hydra.run.dir="{hc.runtime.output_dir}"',
                f"hydra.job.name={hc.job.name}_ddp_rank{local_rank}", "hydra.output_subdir=null"]
    return command, get_original_cwd()


def use_job_command_for_ddp_children() -> None:
    """Point Lightning's DDP launcher at :func:`job_subprocess_command` (idempotent)."""
    from pytorch_lightning.strategies.launchers import subprocess_script

    subprocess_script._hydra_subprocess_cmd = job_subprocess_command
