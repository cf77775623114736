"""Every experiment and model preset composes to data that fits its model, and train.py refuses
compositions that do not fit before it builds anything (models/resolution.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra.utils import instantiate
from omegaconf import OmegaConf

from benchmarks.bench_common import FULL_MODEL_OVERRIDES, SMOKE_MODEL_OVERRIDES
from tests.conftest import CONFIG_DIR, compose_config

EXPERIMENTS = sorted(p.stem for p in Path(CONFIG_DIR, "experiment").glob("*.yaml"))
# each model preset with the data it is made for (a new preset must be added here)
MODEL_RUNS = {
    "tiny": [[]],
    "tiny_no_attention_32px": [[], ["experiment=tiny_gpu"]],
    "sd15_dinov2": [["experiment=sd15"]],
    "sd15_dinov2_random": [["experiment=sd15", "model=sd15_dinov2_random"],
                           FULL_MODEL_OVERRIDES, SMOKE_MODEL_OVERRIDES],
}
SD15_RUNS = ("sd15", "sd15_24gb", "sd15_16gb")


def _check(overrides: list[str]):
    from models.resolution import check_data_fits_model, model_resolution

    cfg = compose_config(overrides)
    OmegaConf.to_container(cfg.model, resolve=True)  # every interpolation resolves
    check_data_fits_model(cfg.model, cfg.data)
    want = model_resolution(cfg.model)
    # every size is stated, so nothing was skipped
    assert want.image_size == cfg.data.image_size, overrides
    assert want.reference_size == cfg.data.reference_size, overrides
    assert want.patch_size and want.reference_size % want.patch_size == 0, overrides
    return cfg, want


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes_to_sizes_that_fit(experiment):
    _check([f"experiment={experiment}"])


def test_every_model_preset_has_data_that_fits():
    presets = sorted(p.stem for p in Path(CONFIG_DIR, "model").glob("*.yaml"))
    assert presets == sorted(MODEL_RUNS)
    for preset, runs in MODEL_RUNS.items():
        for overrides in runs:
            cfg, _ = _check([f"model={preset}", *overrides])
            assert cfg.model.denoiser._target_  # the preset itself, composed


@pytest.mark.parametrize("experiment", SD15_RUNS)
def test_sd15_experiments_are_one_512px_run(experiment):
    cfg, want = _check([f"experiment={experiment}"])
    base = compose_config(["experiment=sd15"])
    assert (cfg.data.image_size, want.latent_size, want.downsample) == (512, 64, 8)
    assert (want.reference_size // want.patch_size) ** 2 == 256  # DINOv2 tokens at 224 px
    assert cfg.model.denoiser.pretrained and cfg.model.reference_encoder.backbone.pretrained
    assert cfg.trainer.precision == "bf16-mixed" and cfg.trainer.accelerator == "gpu"
    # the smaller cards run the same optimisation: batch per step, steps, LR, validation
    effective = cfg.data.batch_size * cfg.trainer.accumulate_grad_batches
    assert effective == base.data.batch_size * base.trainer.accumulate_grad_batches == 32
    for key in ("trainer.max_steps", "trainer.val_check_interval", "model.optimizer.lr",
                "model.lr_scheduler.num_warmup_steps", "data.val_length", "model.val_block",
                "model.val_timestep"):
        assert OmegaConf.select(cfg, key) == OmegaConf.select(base, key), key


def test_no_attention_32px_preset_is_tiny_with_attention_only_at_16px():
    """The architecture candidate differs from model=tiny only in where attention sits."""
    from models.attention_capture import cross_attention_blocks

    tiny = compose_config([]).model
    light = compose_config(["model=tiny_no_attention_32px"]).model
    for key in ("down_block_types", "up_block_types"):
        assert light.denoiser.config[key] != tiny.denoiser.config[key]
        light.denoiser.config[key] = tiny.denoiser.config[key]
    assert OmegaConf.to_container(light) == OmegaConf.to_container(tiny)
    light = compose_config(["model=tiny_no_attention_32px"]).model
    blocks = cross_attention_blocks(instantiate(light.denoiser))
    assert [block.downsample for block in blocks] == [4] * 4
    assert 0 <= light.val_block < len(blocks)


def test_sd15_model_preset_stands_alone():
    """model=sd15_dinov2 is not the tiny preset with patches: nothing of tiny.yaml leaks in."""
    assert "defaults" not in OmegaConf.load(Path(CONFIG_DIR, "model", "sd15_dinov2.yaml"))
    model = compose_config(["experiment=sd15"]).model
    assert model.autoencoder._target_.endswith("build_vae") and model.denoiser.config is None


def test_shrunk_random_preset_builds_to_the_sizes_its_config_states():
    """What the check reads from the config is what the built model has."""
    cfg, want = _check(SMOKE_MODEL_OVERRIDES)
    module = instantiate(cfg.model)
    assert module.denoiser.config.sample_size == want.latent_size
    assert module.autoencoder.downsample == want.downsample
    assert module.reference_encoder.image_size == want.reference_size
    side = want.reference_size // want.patch_size
    assert module.reference_encoder.grid == (side, side)


@pytest.fixture
def no_building(monkeypatch):
    """Anything train() instantiates fails the test: refusals must come first."""
    import train

    def refuse(*args, **kwargs):
        raise AssertionError("train() built something before refusing the config")

    monkeypatch.setattr(train, "instantiate", refuse)
    return train


@pytest.mark.parametrize(("overrides", "named"), [
    # the SD-1.5 layout on the default 64 px data: 8x8 latents for a 64x64-latent UNet
    (["model=sd15_dinov2_random"], ("data.image_size=64", "512 px", "/8")),
    (["model=sd15_dinov2"], ("data.image_size=64", "512 px")),
    (["experiment=sd15", "data.image_size=256"], ("data.image_size=256", "512 px")),
    (["experiment=sd15", "data.reference_size=112"], ("data.reference_size=112", "224 px")),
    (["experiment=sd15", "model.reference_encoder.image_size=230", "data.reference_size=230"],
     ("image_size=230", "patch size 14")),
])
def test_mismatched_sizes_are_refused_in_one_line_before_building(no_building, overrides,
                                                                  named):
    cfg = compose_config(overrides)
    with pytest.raises(ValueError) as refused:
        no_building.train(cfg)
    message = str(refused.value)
    assert "\n" not in message and all(part in message for part in named), message


def test_the_entry_point_refuses_with_the_message_alone(no_building):
    cfg = compose_config(["model=sd15_dinov2_random"])
    with pytest.raises(SystemExit) as refused:
        no_building.main.__wrapped__(cfg)
    assert str(refused.value).startswith("train.py: data.image_size=64 px does not fit")


def test_shipped_model_continuation_trains_on_data_its_lineage_has_not_seen():
    from data.provenance import lineage_uses, read_training_data

    cfg = compose_config(["experiment=tiny_gpu_continue"])
    record = read_training_data(Path(CONFIG_DIR).parent / cfg.init_from)
    assert record is not None
    seen = {use["seed"] for name, use in lineage_uses(record)
            if name.endswith("train") and use.get("namespace") == "train"}
    assert 0 in seen  # the first training's seed: the record is read as meant
    assert cfg.data.train_seed not in seen


# the command line of the shipped model's CPU stages (results/continue_cpu_7/README.md), in
# bf16 from the eighth on (results/cpu_precision)
CPU_STAGE_OVERRIDES = [
    "trainer.precision=bf16-mixed", "trainer.max_steps=100000", "+trainer.max_time=00:01:00:00",
    "trainer.val_check_interval=1000",
    "data.batch_size=8", "data.num_workers=1", "data.val_length=32", "model.optimizer.lr=1e-4",
    "model.lr_scheduler.num_warmup_steps=50", "model.ema_decay=0.999",
    "model.timestep_low_fraction=0.5", "model.timestep_low_max=200",
    "callbacks.model_checkpoint.every_n_train_steps=250",
]


def test_the_cpu_continuation_preset_is_the_cpu_stages_recipe():
    start = ["init_from=runs/stage/checkpoints/last.ckpt", "seed=12"]
    preset = compose_config(["experiment=tiny_cpu_continue", *start])
    stages = compose_config([*CPU_STAGE_OVERRIDES, *start])
    for cfg in (preset, stages):
        cfg.task_name = "any"
    assert OmegaConf.to_container(preset, resolve=True) == OmegaConf.to_container(stages,
                                                                                   resolve=True)
