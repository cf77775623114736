"""The validation sample grid: labelled columns, sampled as refinement is deployed."""

from __future__ import annotations

import numpy as np
import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from PIL import Image
from pytorch_lightning.loggers import CSVLogger
from torchvision.utils import make_grid

import models.sample_grid as sg
from models.pipeline import RefinementConfig
from models.refinement import SAMPLERS, build_sampler
from tests.conftest import CONFIG_DIR, compose_config


def test_deployed_refinement_settings_are_the_refinement_config():
    """RefinementConfig (refine.py, the pipeline, the grid) and eval.py's config agree."""
    yaml = OmegaConf.load(f"{CONFIG_DIR}/refinement/default.yaml")
    deployed = RefinementConfig()
    for key in ("sampler", "num_steps", "guidance_scale", "dilate", "feather"):
        assert yaml[key] == getattr(deployed, key), key


def _captured_sampling(monkeypatch, overrides: list[str]) -> dict:
    seen: dict = {}

    def spy(denoiser, autoencoder, scheduler, image, mask, context, null, steps, guidance,
            generator):
        seen.update(scheduler=scheduler, steps=steps, guidance=guidance)
        return image

    monkeypatch.setattr(sg, "sample_inpaint", spy)
    module = instantiate(compose_config(["data.image_size=32", *overrides]).model)
    (grid,) = [c for c in module.configure_callbacks() if isinstance(c, sg.ValidationSampleGrid)]
    batch = {"target": torch.zeros(1, 3, 32, 32), "mask": torch.ones(1, 1, 32, 32),
             "reference": torch.zeros(1, 3, 224, 224)}
    grid.sample(module, batch)
    seen["module"] = module
    return seen


def test_the_grid_samples_with_the_deployed_sampler_steps_and_guidance(monkeypatch):
    seen = _captured_sampling(monkeypatch, [])
    deployed = RefinementConfig()
    assert (seen["steps"], seen["guidance"]) == (deployed.num_steps, deployed.guidance_scale)
    assert type(seen["scheduler"]) is SAMPLERS[deployed.sampler]
    module = seen["module"]
    expected = build_sampler(deployed.sampler, module.noise_scheduler.config, module.autoencoder)
    assert dict(seen["scheduler"].config) == dict(expected.config)


def test_the_grid_settings_can_be_overridden(monkeypatch):
    seen = _captured_sampling(monkeypatch, ["model.val_sample_steps=2", "model.val_sampler=ddim",
                                            "model.val_guidance_scale=1.5"])
    assert (seen["steps"], seen["guidance"]) == (2, 1.5)
    assert type(seen["scheduler"]) is SAMPLERS["ddim"]


def test_labels_are_drawn_above_their_columns():
    g = torch.Generator().manual_seed(0)
    images = [torch.rand(2, 3, 32, 32, generator=g) for _ in range(3)]
    plain = make_grid(torch.stack(images, 1).flatten(0, 1), nrow=3, padding=2, pad_value=1.0)
    grid = sg.labelled_grid(list(zip(("target", "mask", "result"), images, strict=True)))
    other = sg.labelled_grid(list(zip(("a", "b", "c"), images, strict=True)))
    header = grid.shape[1] - plain.shape[1]
    assert header > 8 and grid.shape[2] == plain.shape[2]
    assert torch.equal(grid[:, header:], plain)  # the images untouched below the labels
    for col in range(3):
        cell = slice(2 + col * 34, (col + 1) * 34)
        assert (grid[:, :header, cell] < 0.5).any()  # text in every column's header
        assert not torch.equal(grid[:, :header, cell], other[:, :header, cell])


def test_validation_writes_the_labelled_grid(tmp_path):
    cfg = compose_config(["data.image_size=32", "data.batch_size=2", "data.num_workers=0",
                          "data.val_length=2", "model.val_sample_steps=2",
                          "model.val_num_samples=2"])
    module = instantiate(cfg.model)
    logger = CSVLogger(tmp_path, name="csv")
    trainer = pl.Trainer(accelerator="cpu", logger=logger, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=tmp_path)
    trainer.validate(module, datamodule=instantiate(cfg.data))
    (path,) = (tmp_path / "csv").glob("*/samples/step*.png")
    image = np.asarray(Image.open(path))
    columns = len(sg.COLUMNS)
    assert image.shape[1] == columns * 34 + 2  # 5 columns of 32 px, 2 px padding
    assert image.shape[0] > 2 * 34 + 2 + 8  # 2 rows and a label strip above them
