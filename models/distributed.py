"""Distributed training with Hydra and Lightning: DDP under multirun, and FSDP's limits.

DDP + multirun. Started from a shell with ``strategy=ddp`` and ``devices=N``, Lightning starts
local ranks 1..N-1 by re-running ``sys.argv``. Under ``python train.py -m a=1,2`` that command
line is the whole sweep, so every child starts a sweep of its own and rank 0 waits forever (the
known DDP + multirun hang, Lightning issue #11300). :func:`use_job_command_for_ddp_children` makes
each child run exactly the job of its rank 0: that job's own overrides, in RUN mode, in that
job's output directory. Under SLURM (``hydra/launcher=slurm``) nothing is re-launched: each
task is one rank already, and this patch is never called.

FSDP. :func:`check_config` refuses what fails later; :class:`ValidateAtLastStep` moves the
final validation inside the fit. Outside a training or validation step the submodules hold only
this rank's shards: :func:`call_with_full_weights` runs code on the whole weights (through
Lightning's private forward redirection, here and nowhere else), :func:`full_state_dict`
gathers them for an export. Without FSDP both are plain calls.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any, TypeVar

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig

log = logging.getLogger(__name__)
T = TypeVar("T")
_REDIRECTED = "_call_with_full_weights"  # the module attribute Lightning's redirection calls


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


def uses_fsdp(trainer_cfg: DictConfig) -> bool:
    """Whether the trainer config selects Lightning's FSDPStrategy (by name or class)."""
    from hydra.utils import get_class
    from pytorch_lightning.strategies import FSDPStrategy

    strategy = trainer_cfg.get("strategy")
    if isinstance(strategy, str):
        return strategy in FSDPStrategy.get_registered_strategies()
    target = strategy.get("_target_") if isinstance(strategy, DictConfig) else None
    if not target:
        return False
    cls = get_class(target)
    return isinstance(cls, type) and issubclass(cls, FSDPStrategy)


def check_config(cfg: DictConfig) -> None:
    """Refuse, before any work, combinations known to fail later."""
    if uses_fsdp(cfg.trainer) and cfg.model.get("ema_decay"):
        raise ValueError(
            "FSDP shards the parameters, but the module's EMA keeps full unsharded copies "
            "and fails at the first step: run trainer=fsdp with model.ema_decay=null")
    if uses_fsdp(cfg.trainer) and cfg.get("init_from") and Path(cfg.init_from).is_file():
        raise ValueError(
            f"init_from {cfg.init_from}: continuing a checkpoint loads its whole optimizer "
            "state, which FSDP shards; export it (scripts/export_checkpoint.py) and warm-start "
            "from the folder")


class ValidateAtLastStep(pl.Callback):
    """Make the fit loop validate at ``max_steps`` (by asking it to stop there).

    Used under FSDP, where train.py cannot validate after ``fit``: ``trainer.validate`` then
    sets the module up again, finds its layers wrapped already and leaves the FSDP root off,
    so the weights outside the wrapped layers stay flat shards (Lightning issue #19015).
    """

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        if 0 < trainer.max_steps <= trainer.global_step:
            trainer.should_stop = True  # the loop validates on a stop request, then ends


def fsdp_root(trainer: pl.Trainer | None) -> Any:
    """The FSDP wrapper that shards the trainer's module, or None (no trainer, no FSDP)."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    model = trainer.strategy.model if trainer is not None else None
    return model if isinstance(model, FullyShardedDataParallel) else None


def call_with_full_weights(pl_module: pl.LightningModule, fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args)`` with ``pl_module``'s whole weights, from code outside a training or
    validation step (e.g. a callback that samples).

    Under FSDP the call is routed as Lightning routes ``validation_step``: through the root's
    forward (which gathers the weights, in the run's precision) inside the precision plugin's
    step context, without gradients. That is a collective: every rank must make the same call.
    Without FSDP, a plain call.
    """
    root = fsdp_root(pl_module._trainer)
    if root is None:
        return fn(*args)
    strategy = pl_module.trainer.strategy
    setattr(pl_module, _REDIRECTED, fn)
    try:
        with torch.no_grad(), strategy.precision_plugin.val_step_context():
            # Lightning's (private) redirection, the one its FSDP training/validation steps use
            return strategy._forward_redirection(root, pl_module, _REDIRECTED, *args)
    finally:
        delattr(pl_module, _REDIRECTED)


def full_state_dict(pl_module: pl.LightningModule, prefixes: tuple[str, ...] = ("",)
                    ) -> dict[str, torch.Tensor]:
    """CPU copies of ``pl_module``'s state-dict entries whose names start with ``prefixes``.

    Under FSDP the whole weights are gathered to global rank 0 and the other ranks get an empty
    dict: a collective that every rank must call.
    """
    root = fsdp_root(pl_module._trainer)
    gather = nullcontext()
    if root is not None:
        from torch.distributed.fsdp import FullStateDictConfig, StateDictType
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        config = FullStateDictConfig(offload_to_cpu=True, rank0_only=True)
        gather = FSDP.state_dict_type(root, StateDictType.FULL_STATE_DICT, config)
    with gather:
        # copied here: without FSDP the entries are the parameters themselves, which a caller
        # inside an EMA swap gets back as the trained weights when the swap ends
        state = (root or pl_module).state_dict()
        return {k: v.detach().cpu().clone() for k, v in state.items() if k.startswith(prefixes)}
