"""Recipe levers of the diffusion objective, and warm starts from an export."""

from __future__ import annotations

from pathlib import Path

import hydra
import pytest
import torch
from diffusers import DDPMScheduler

from data.provenance import check_overlap, read_training_data, write_training_data
from models.checkpoint import warm_start
from models.ema import EMA
from models.export import save_pretrained
from models.losses import min_snr_weights, sample_timesteps
from tests.conftest import compose_config


def test_low_timestep_share_draws_that_share_below_the_bound() -> None:
    g = torch.Generator().manual_seed(0)
    t = sample_timesteps(20000, 1000, torch.device("cpu"), 0.5, 100, generator=g)
    low = (t < 100).float().mean().item()
    assert abs(low - (0.5 + 0.5 * 0.1)) < 0.02  # half forced low, plus uniform's own 10%
    assert t.min() >= 0 and t.max() < 1000
    only_low = sample_timesteps(500, 1000, torch.device("cpu"), 1.0, 50, generator=g)
    assert only_low.max() < 50
    with pytest.raises(ValueError, match="low_fraction"):
        sample_timesteps(4, 1000, torch.device("cpu"), 1.5)
    with pytest.raises(ValueError, match="low_max"):
        sample_timesteps(4, 1000, torch.device("cpu"), 0.5, 0)


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction"])
def test_min_snr_weight_makes_the_x0_weight_min_snr_gamma(kind: str) -> None:
    """MSE of epsilon is SNR x that of x0, MSE of v is (SNR + 1) x; weighted, min(SNR, gamma)."""
    scheduler = DDPMScheduler(beta_schedule="squaredcos_cap_v2", prediction_type=kind)
    t = torch.tensor([1, 50, 300, 700, 999])
    x0 = torch.randn(5, 3, 8, 8)
    x0_hat = x0 + 0.1 * torch.randn_like(x0)
    noise = torch.randn_like(x0)
    a = scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    noisy = a.sqrt() * x0 + (1 - a).sqrt() * noise
    # the prediction that yields x0_hat from noisy, in the scheduler's target space
    eps_hat = (noisy - a.sqrt() * x0_hat) / (1 - a).sqrt()
    v = a.sqrt() * noise - (1 - a).sqrt() * x0
    v_hat = a.sqrt() * eps_hat - (1 - a).sqrt() * x0_hat
    pred, goal = (eps_hat, noise) if kind == "epsilon" else (v_hat, v)
    target_mse = (pred - goal).pow(2).flatten(1).mean(1)
    x0_mse = (x0_hat - x0).pow(2).flatten(1).mean(1)
    snr = (a / (1 - a)).flatten()
    weighted = target_mse * min_snr_weights(scheduler, t, 5.0)
    torch.testing.assert_close(weighted, x0_mse * snr.clamp(max=5.0), rtol=1e-3, atol=1e-6)


def test_warm_start_loads_the_export_and_restarts_ema(tmp_path: Path) -> None:
    cfg = compose_config(["seed=3"])
    source = hydra.utils.instantiate(cfg.model)
    export = save_pretrained(source.inference_state_dict(), cfg.model, tmp_path / "export")
    write_training_data(cfg.data, export)
    torch.manual_seed(99)
    module = hydra.utils.instantiate(compose_config(["seed=4"]).model)
    first = next(module.denoiser.parameters())
    assert not torch.equal(first, next(source.denoiser.parameters()))
    warm_start(module, export)
    for name in ("denoiser", "reference_encoder"):
        ours, theirs = getattr(module, name).state_dict(), getattr(source, name).state_dict()
        assert all(torch.equal(ours[k], theirs[k]) for k in theirs)
    (ema,) = [c for c in module.configure_callbacks() if isinstance(c, EMA)]
    # the average the trainer will keep starts here and its next update is at full decay
    assert ema.ema.get_decay(ema.ema.optimization_step + 1) == cfg.model.ema_decay
    for shadow, param in zip(ema.ema.shadow_params, module.trainable_parameters(),
                             strict=True):
        assert torch.equal(shadow, param)


def test_warm_start_refuses_another_architecture(tmp_path: Path) -> None:
    cfg = compose_config([])
    export = save_pretrained(hydra.utils.instantiate(cfg.model).inference_state_dict(),
                             cfg.model, tmp_path / "export")
    wider = compose_config(["model.denoiser.config.block_out_channels=[32,64,64]"])
    with pytest.raises(ValueError, match="init_from .*denoiser does not fit"):
        warm_start(hydra.utils.instantiate(wider.model), export)


def test_a_warm_started_export_keeps_its_ancestors_training_data(tmp_path: Path) -> None:
    inherited = None
    for name, seed in (("a", 11), ("b", 12), ("c", 13)):  # a chain of two warm starts
        (tmp_path / name).mkdir()
        cfg = compose_config([f"data.train_seed={seed}"])
        write_training_data(cfg.data, tmp_path / name, inherited)
        inherited = read_training_data(tmp_path / name)
    record = inherited
    assert record["train"]["seed"] == 13 and record["ancestors"][0]["train"]["seed"] == 12
    for seed in (11, 12):
        ancestor_case = [{"namespace": "train", "seed": seed, "index": 0}]
        assert check_overlap(record, ancestor_case)["status"] == "overlap", seed
    unknown = {"train": record["train"], "unknown": {"source": "unknown"}}
    assert check_overlap(unknown, [{"namespace": "benchmark", "seed": 0, "index": 0}]
                         )["status"] == "unknown"
