"""Speed settings of the training job change its speed, never its results."""

from __future__ import annotations

import os

import pytest
import torch
from diffusers.training_utils import EMAModel
from hydra.utils import instantiate

from tests.conftest import compose_config
from train import check_cpu_precision, intra_op_threads

FAST = ["data.image_size=32", "data.batch_size=4", "data.num_workers=0", "data.val_length=4"]


@pytest.mark.parametrize(("overrides", "expected"), [
    ([], 1),  # the main job: 2 cores, 1 data worker -> 1 thread, 1 core each
    (["data.num_workers=0"], 2),
    (["data.num_workers=4"], 1),  # never below one
    (["num_threads=3"], 3),  # explicit wins
    (["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "data.num_workers=0"], 1),
    (["trainer=gpu"], None),  # GPU runs keep torch's default
])
def test_spinning_threads_get_the_cores_left_after_data_workers(monkeypatch, overrides,
                                                                 expected):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    assert intra_op_threads(compose_config(overrides)) == expected


@pytest.mark.parametrize(("overrides", "expected"), [
    ([], 2),  # the main job: passive waiters share the data worker's core
    (["data.num_workers=4"], 2),
    (["num_threads=1"], 1),
    (["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2"], 1),
    (["experiment=cpu_ddp"], 1),  # 2 processes on 2 cores: 1 each
    (["trainer=gpu"], None),
])
def test_passive_threads_get_every_core_of_their_process(monkeypatch, overrides, expected):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    monkeypatch.setenv("OMP_WAIT_POLICY", "passive")
    assert intra_op_threads(compose_config(overrides)) == expected


@pytest.mark.parametrize(("overrides", "native", "refused"), [
    (["trainer.precision=bf16-mixed"], False, True),
    (["trainer.precision=bf16-mixed"], True, False),
    (["trainer.precision=bf16-mixed", "trainer.accelerator=auto"], False, True),  # no GPU here
    (["trainer.precision=bf16-true"], False, True),
    ([], False, False),  # fp32, the main job
])
def test_bf16_training_on_a_cpu_needs_bf16_instructions(monkeypatch, overrides, native,
                                                         refused):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: native)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    trainer = compose_config(overrides).trainer
    if refused:
        with pytest.raises(ValueError, match="without bf16 instructions .* use trainer.precis"):
            check_cpu_precision(trainer)
    else:
        check_cpu_precision(trainer)


def test_bf16_on_a_gpu_is_not_the_cpus_business(monkeypatch):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    check_cpu_precision(compose_config(["trainer=gpu"]).trainer)


def test_cpu_ddp_keeps_the_main_jobs_run():
    """experiment=cpu_ddp changes how the main job's work is spread, not the work: the same
    effective batch, steps and validation point, on 2 CPU processes."""
    main, ddp = compose_config([]), compose_config(["experiment=cpu_ddp"])
    assert ddp.trainer.accelerator == "cpu" and ddp.trainer.devices == 2
    assert ddp.data.batch_size * ddp.trainer.devices == main.data.batch_size * main.trainer.devices
    for key in ("max_steps", "val_check_interval", "precision", "accumulate_grad_batches"):
        assert ddp.trainer[key] == main.trainer[key], key
    assert ddp.model == main.model


def test_module_ema_equals_a_per_parameter_ema():
    """The EMA callback's average (foreach kernels) keeps the shadow weights of diffusers'
    per-tensor loop over the same sequence of weights (warm-up decay included)."""
    from models.ema import EMA

    module = instantiate(compose_config(FAST).model)
    ema = EMA(0.999).track(module)
    params = module.trainable_parameters()
    def copies() -> list[torch.Tensor]:  # requires_grad: EMAModel copies frozen tensors as is
        return [p.detach().clone().requires_grad_(True) for p in params]

    reference = EMAModel(copies(), decay=0.999, use_ema_warmup=True, foreach=False)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _ in range(3):
            for p in params:
                p.add_(torch.randn(p.shape, generator=generator))
            ema.step(params)
            reference.step(copies())
    for ours, theirs in zip(ema.shadow_params, reference.shadow_params, strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)
    moved = sum(not torch.equal(s, p) for s, p in zip(ema.shadow_params, params,
                                                      strict=True))
    assert moved == len(params)  # the averages lag the weights: the EMA did average
