"""TEST HARNESS ONLY: Lightning's FSDPStrategy on CPU processes (gloo), for tests without GPUs.

Lightning 2.6 does not support FSDP on CPU, and production configs (configs/trainer/fsdp.yaml)
stay GPU-only. Two things stop the stock strategy on CPU, and this subclass changes just those:

- the accelerator connector rejects ``FSDPStrategy`` with any accelerator but CUDA ("requires a
  GPU accelerator"); it checks ``type(strategy) is FSDPStrategy``, so a subclass instance gets
  past it unchanged;
- ``_setup_model`` passes torch FSDP ``device_id=root_device.index``, which is ``None`` for a
  CPU device, and torch then looks for an accelerator ("FSDP needs a non-CPU accelerator
  device"): here the wrapper gets ``device_id=torch.device("cpu")``.

Everything else (auto-wrap policy, sharding strategy, use_orig_params, state-dict type,
checkpointing, the gloo process group Lightning picks for CPU devices) is the stock strategy's.
Lightning launches FSDP only by re-running the script (``_SubprocessScriptLauncher``), so a test
starts the ranks itself, torchrun-style (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_* in the env;
Lightning then launches nothing): see :func:`torchrun_env`.
"""

from __future__ import annotations

import os

import torch
from pytorch_lightning.strategies import FSDPStrategy
from torch.nn import Module


class CPUFSDPStrategy(FSDPStrategy):
    """FSDPStrategy that wraps the model with ``device_id=cpu`` (test harness, see module doc)."""

    strategy_name = "cpu_fsdp_test_harness"

    def _setup_model(self, model: Module) -> Module:
        from pytorch_lightning.strategies.fsdp import (
            _move_torchmetrics_to_device,
            _setup_activation_checkpointing,
        )
        from torch.distributed.fsdp import FullyShardedDataParallel

        # on a GPU, or a model that is wrapped already (nothing to wrap): the stock code path
        if self.root_device.type != "cpu" or any(
                isinstance(m, FullyShardedDataParallel) for m in model.modules()):
            return super()._setup_model(model)
        model = FullyShardedDataParallel(
            module=model, cpu_offload=self.cpu_offload, mixed_precision=self.mixed_precision_config,
            sharding_strategy=self.sharding_strategy, device_id=torch.device("cpu"),
            **self.kwargs,
        )
        _move_torchmetrics_to_device(model, self.root_device)
        _setup_activation_checkpointing(model, self._activation_checkpointing_kwargs)
        return model


def torchrun_env(rank: int, world_size: int, port: int) -> None:
    """Export what torchrun would for ``rank`` (one node), so Lightning starts no processes."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world_size),
                      RANK=str(rank), LOCAL_RANK=str(rank), NODE_RANK="0")
