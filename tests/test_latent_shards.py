"""Latent shards: the step without VAE encodes sees exactly what the pixel step computes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from torch.utils.data import default_collate

from benchmarks.bench_common import SMOKE_MODEL_OVERRIDES
from data.latent_shards import (
    MANIFEST,
    latent_shard_dataset,
    shard_samples,
    write_latent_shards,
)
from data.shards import SampleDecoder, split_webdataset, synthetic_records, write_shards
from models.autoencoder import autoencoder_fingerprint, check_autoencoder
from tests.conftest import compose_config

SEEDS = (5, 6)
CONTRACT = ("mask", "reference", "reference_mask", "mode")


@pytest.fixture(scope="module")
def vae_module():
    """The SD-1.5 layout shrunk to CPU size, with a random VAE (latents at 1/8)."""
    cfg = compose_config(SMOKE_MODEL_OVERRIDES)
    torch.manual_seed(0)
    return cfg, instantiate(cfg.model).eval()


@pytest.fixture(scope="module")
def shards(tmp_path_factory, vae_module):
    """Pixel shards, and latent shards of them (two seeds) in float32 and float16."""
    cfg, module = vae_module
    size, ref = cfg.data.image_size, cfg.data.reference_size
    root = tmp_path_factory.mktemp("latent")
    pixel = [str(p) for p in write_shards(
        synthetic_records(6, seed=0, image_size=size, reference_size=ref), root / "px", 3)]
    latent = {}
    for dtype in ("float32", "float16"):
        paths = write_latent_shards(
            shard_samples(pixel, SEEDS, size, ref), module.autoencoder, root / dtype,
            per_shard=5, image_size=size, reference_size=ref, batch_size=4, dtype=dtype)
        latent[dtype] = {s["__key__"]: s for s in latent_shard_dataset([str(p) for p in paths])}
    return pixel, latent, root


def test_latent_samples_match_pixel_decoding_and_reproduce_the_step(vae_module, shards):
    cfg, module = vae_module
    pixel, latent, _ = shards
    exact = latent["float32"]
    assert len(exact) == 6 * len(SEEDS)
    pairs = []
    for seed in SEEDS:
        decode = SampleDecoder(seed, cfg.data.image_size, cfg.data.reference_size)
        for raw in split_webdataset(pixel):
            px, lt = decode(raw), exact[f"{raw['__key__']}_s{seed}"]
            for field in CONTRACT:
                assert torch.equal(px[field], lt[field]), field
            pairs.append((px, lt))
    first = [lt["mask"] for key, lt in sorted(exact.items()) if key.endswith(f"_s{SEEDS[0]}")]
    second = [lt["mask"] for key, lt in sorted(exact.items()) if key.endswith(f"_s{SEEDS[1]}")]
    assert any(not torch.equal(a, b) for a, b in zip(first, second, strict=True))

    px_batch = default_collate([{k: v for k, v in px.items() if k != "__key__"}
                                for px, _ in pairs[:4]])
    lt_batch = default_collate([{k: v for k, v in lt.items() if k != "__key__"}
                                for _, lt in pairs[:4]])
    assert "target" not in lt_batch
    t = torch.tensor([10, 200, 500, 900])
    with torch.no_grad():
        from_pixels = module.model_step(px_batch, torch.Generator().manual_seed(0), timesteps=t)
        from_latents = module.model_step(lt_batch, torch.Generator().manual_seed(0), timesteps=t)
    torch.testing.assert_close(from_latents["diffusion"], from_pixels["diffusion"],
                               rtol=1e-4, atol=1e-6)

    for key, sample in latent["float16"].items():  # storage rounding only
        for field in ("latents", "masked_latents"):
            torch.testing.assert_close(sample[field], exact[key][field], rtol=2e-3, atol=2e-3)


def test_datamodule_checks_the_manifest(shards, tmp_path):
    from data.datamodule import PairDataModule

    _, _, root = shards
    urls = str(root / "float16" / "latent-{000000..000002}.tar")
    dm = PairDataModule(source="latent_shards", shard_urls=urls, image_size=64, reference_size=56)
    dm.setup("fit")
    assert dm.latent_manifest["count"] == 12 and dm.latent_manifest["autoencoder"]["kind"] == "VAE"
    with pytest.raises(ValueError, match="image_size=64"):
        PairDataModule(source="latent_shards", shard_urls=urls, image_size=128,
                       reference_size=56).setup("fit")
    with pytest.raises(FileNotFoundError, match="make_latent_shards"):
        PairDataModule(source="latent_shards", shard_urls=str(tmp_path / "latent-000000.tar"),
                       image_size=64, reference_size=56).setup("fit")
    with pytest.raises(ValueError, match="shard_urls"):
        PairDataModule(source="latent_shards")


def test_latents_of_another_autoencoder_are_refused(vae_module, shards):
    cfg, module = vae_module
    _, latent, root = shards
    sample = next(iter(latent["float16"].values()))
    batch = default_collate([{k: v for k, v in sample.items() if k != "__key__"}])
    batch["latents"] = batch["latents"][:, :3]
    with pytest.raises(ValueError, match="do not fit"):
        module.model_step(batch)

    made_by = json.loads((root / "float16" / MANIFEST).read_text())["autoencoder"]
    check_autoencoder(made_by, module.autoencoder)
    from models.autoencoder import PixelSpace

    with pytest.raises(ValueError, match="kind"):
        check_autoencoder(made_by, PixelSpace())
    assert autoencoder_fingerprint(module.autoencoder)["downsample"] == 8


def test_make_latent_shards_in_parts_then_train(tmp_path: Path) -> None:
    """Two writers split the items; train.py reads both parts through one glob."""
    from data.latent_shards import read_manifest
    from scripts.make_latent_shards import main as make_latent_shards
    from train import train

    out = tmp_path / "lat"
    for part in ("0", "1"):
        make_latent_shards(["--synthetic", "5", "--seeds", "0", "1", "--per-shard", "4",
                            "--out", str(out), "--part", part, "--parts", "2"])
    urls = str(out / "part-*" / "latent-*.tar")
    keys = [{s["__key__"] for s in latent_shard_dataset(sorted(map(str, (out / p).glob("*.tar"))))}
            for p in ("part-000", "part-001")]
    assert not keys[0] & keys[1]
    assert keys[0] | keys[1] == {f"{i:08d}_s{seed}" for i in range(5) for seed in (0, 1)}
    assert read_manifest(urls)["count"] == 10 and read_manifest(urls)["folders"] == 2

    manifest = json.loads((out / "part-001" / MANIFEST).read_text())
    manifest["image_size"] = 32
    (out / "part-001" / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="image_size=32"):
        read_manifest(urls)
    manifest["image_size"] = 64
    (out / "part-001" / MANIFEST).write_text(json.dumps(manifest))

    cfg = compose_config(["data=latent_shards", f"data.shard_urls='{urls}'",
                          "trainer.max_steps=2", "trainer.val_check_interval=2",
                          "data.val_length=2", "data.batch_size=4", "data.num_workers=0",
                          "model.val_sample_steps=1", "model.val_num_samples=1",
                          "callbacks.progress_bar.refresh_rate=0"])
    cfg.paths.output_dir = str(tmp_path / "run")
    result = train(cfg)
    assert result["global_step"] == 2
    assert (Path(result["export_dir"]) / "model_index.json").is_file()


def test_pixel_space_shards_store_the_exact_samples(tmp_path: Path) -> None:
    """A pixel-space model's shards hold the target itself: read back, float or compact, every
    field is the sample the generator made, to the bit."""
    from data.latent_shards import PIXEL_STORAGE, synthetic_samples
    from data.modes import decode_pixels
    from models.autoencoder import PixelSpace

    samples = list(synthetic_samples(4, [0, 1], 32, 56))
    paths = write_latent_shards(iter(samples), PixelSpace(), tmp_path, per_shard=3,
                                image_size=32, reference_size=56)
    manifest = json.loads((tmp_path / MANIFEST).read_text())
    assert manifest["dtype"] == PIXEL_STORAGE and manifest["count"] == 8
    urls = [str(p) for p in paths]
    floats = {s["__key__"]: s for s in latent_shard_dataset(urls)}
    compact = {s["__key__"]: s for s in latent_shard_dataset(urls, compact=True)}
    assert len(floats) == len(compact) == 8
    for key, seed, sample in samples:
        read, small = floats[f"{key}_s{seed}"], compact[f"{key}_s{seed}"]
        assert "latents" not in read and "masked_latents" not in read
        assert small["target"].dtype == torch.uint8 and small["mask"].dtype == torch.bool
        decoded = decode_pixels(small)
        for field in ("target", *CONTRACT):
            assert read[field].dtype == sample[field].dtype, field
            assert torch.equal(read[field], sample[field]), field
            assert torch.equal(decoded[field], sample[field]), field


def test_sources_give_the_same_samples_with_loader_workers(shards) -> None:
    from data.latent_shards import synthetic_samples

    pixel, _, _ = shards

    def as_dict(triples):
        return {(k, s): sample for k, s, sample in triples}

    for make in (lambda w: synthetic_samples(3, [0, 1], 32, 56, workers=w),
                 lambda w: shard_samples(pixel, [5], 64, 56, workers=w)):
        here, loaded = as_dict(make(0)), as_dict(make(2))
        assert here.keys() == loaded.keys() and len(here) == 6
        for key, sample in here.items():
            for field in ("target", *CONTRACT):
                assert torch.equal(sample[field], loaded[key][field]), (key, field)
