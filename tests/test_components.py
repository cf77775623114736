"""Every component saved and loaded in its real on-disk layout, and every preset composes."""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from transformers import Dinov2Model

from models.autoencoder import VAE, PixelSpace, build_vae
from models.denoiser import build_denoiser
from models.export import load_pipeline, save_pretrained
from models.reference_encoder import ReferenceEncoder, build_dinov2
from tests import public_configs
from tests.conftest import compose_config

TINY_DINO = dict(image_size=224, patch_size=14, hidden_size=32, num_hidden_layers=1,
                 num_attention_heads=2, intermediate_size=64)


@pytest.fixture(scope="module")
def fake_checkpoints(tmp_path_factory) -> dict[str, Path]:
    """Random checkpoints built from the public configs, in their hub layouts: SD-1.5
    inpainting, SD-1.5 text-to-image (4-input UNet, for widening) and DINOv2-L."""
    root = tmp_path_factory.mktemp("hub")
    return {
        "sd15_inpainting": public_configs.save_sd15_repo(root / "sd15_inpainting"),
        "sd15": public_configs.save_sd15_repo(root / "sd15", public_configs.SD15),
        "dinov2": public_configs.save_dinov2_repo(root / "dinov2"),
    }


def test_widening_conv_in_keeps_the_text_to_image_function(fake_checkpoints):
    original = build_denoiser(str(fake_checkpoints["sd15"]), in_channels=4).eval()
    widened = build_denoiser(str(fake_checkpoints["sd15"]), in_channels=9).eval()
    assert widened.conv_in.in_channels == 9 and widened.config.in_channels == 9
    assert torch.all(widened.conv_in.weight[:, 4:] == 0)
    x, ctx = torch.randn(1, 4, 16, 16), torch.randn(1, 5, 768)
    extra = torch.randn(1, 5, 16, 16)
    with torch.no_grad():
        a = original(x, 7, encoder_hidden_states=ctx).sample
        b = widened(torch.cat([x, extra], 1), 7, encoder_hidden_states=ctx).sample
    torch.testing.assert_close(a, b)


def test_denoiser_rejects_mismatched_context_width(fake_checkpoints):
    with pytest.raises(ValueError, match="context width"):
        build_denoiser(str(fake_checkpoints["sd15"]), cross_attention_dim=1024)


def test_dinov2_and_vae_load_from_their_layouts(fake_checkpoints, tmp_path):
    dino = build_dinov2(str(fake_checkpoints["dinov2"]))
    fresh = Dinov2Model.from_pretrained(str(fake_checkpoints["dinov2"]))
    for (k, a), (_, b) in zip(dino.state_dict().items(), fresh.state_dict().items(), strict=True):
        assert torch.equal(a, b), k
    vae = VAE.from_pretrained(str(fake_checkpoints["sd15"]))
    assert vae.downsample == 8 and vae.latent_channels == 4
    assert vae.scaling_factor == pytest.approx(0.18215)  # AutoencoderKL's default, as SD-1.5
    images = torch.rand(1, 3, 32, 32) * 2 - 1
    assert vae.decode(vae.encode(images)).shape == images.shape
    with pytest.raises(ValueError):
        build_dinov2()


def test_loaders_refuse_weights_of_other_sizes_than_the_config_states(fake_checkpoints):
    """What models/resolution.py checks data against before loading, loading then enforces."""
    sd15, dino = str(fake_checkpoints["sd15_inpainting"]), str(fake_checkpoints["dinov2"])
    assert build_denoiser(sd15, sample_size=64).config.sample_size == 64
    with pytest.raises(ValueError, match="sample_size 64 != the config's sample_size 96"):
        build_denoiser(sd15, sample_size=96)
    assert build_vae(sd15, downsample=8).downsample == 8
    with pytest.raises(ValueError, match="downsamples by 8, the config's downsample is 4"):
        build_vae(sd15, downsample=4)
    assert build_dinov2(dino, patch_size=14).config.patch_size == 14
    with pytest.raises(ValueError, match="patch size 14 != the config's patch_size 16"):
        build_dinov2(dino, patch_size=16)


def test_reference_encoder_tokens_and_null():
    encoder = ReferenceEncoder(build_dinov2(config=TINY_DINO), context_dim=48)
    ref = torch.rand(3, 3, 224, 224)
    tokens = encoder(ref)
    assert tokens.shape == (3, 256, 48) and encoder.grid == (16, 16)
    dropped = encoder(ref, drop=torch.tensor([True, False, True]))
    torch.testing.assert_close(dropped[0], encoder.null_embedding)
    torch.testing.assert_close(dropped[1], tokens[1])
    with_cls = ReferenceEncoder(build_dinov2(config=TINY_DINO), 48, use_cls_token=True)
    assert with_cls(ref).shape == (3, 257, 48) and with_cls.num_prefix_tokens == 1
    cls_only = ReferenceEncoder(build_dinov2(config=TINY_DINO), 48, use_patch_tokens=False,
                                use_cls_token=True)
    assert cls_only(ref).shape == (3, 1, 48)
    with pytest.raises(ValueError, match="reference must be"):
        encoder(torch.rand(1, 3, 112, 112))


def test_frozen_backbone_gets_no_gradient():
    encoder = ReferenceEncoder(build_dinov2(config=TINY_DINO), 16, trainable_backbone=False)
    encoder(torch.rand(1, 3, 224, 224)).sum().backward()
    assert all(p.grad is None for p in encoder.backbone.parameters())
    assert all(p.grad is not None for p in encoder.mlp.parameters())


@pytest.mark.parametrize("preset", ["tiny", "sd15_dinov2"])
def test_every_preset_composes_and_trains_a_step(preset, fake_checkpoints, tiny_batch):
    overrides = [f"model={preset}", "data.image_size=32"]
    if preset == "sd15_dinov2":  # the public configs, as a user with real weights has them
        overrides = [f"model={preset}", "data.image_size=64",
                     f"paths.sd15_inpainting={fake_checkpoints['sd15_inpainting']}",
                     f"paths.dinov2={fake_checkpoints['dinov2']}"]
        tiny_batch = {**tiny_batch, "target": F.interpolate(tiny_batch["target"], size=64),
                      "mask": F.interpolate(tiny_batch["mask"], size=64)}
    cfg = compose_config(overrides)
    module = instantiate(cfg.model)
    expected_ae = VAE if preset == "sd15_dinov2" else PixelSpace
    assert isinstance(module.autoencoder, expected_ae)
    assert len(module.blocks) == (16 if preset == "sd15_dinov2" else 7)
    out = module.model_step(tiny_batch, capture_blocks=[0, 1])
    assert out["diffusion"].shape == (4,) and torch.isfinite(out["diffusion"]).all()
    assert set(out["attention"]) == {0, 1}


def test_export_round_trip_reproduces_outputs(tmp_path, tiny_batch):
    cfg = compose_config(["data.image_size=32"])
    module = instantiate(cfg.model).eval()
    save_pretrained(module.inference_state_dict(), cfg.model, tmp_path / "export")
    loaded = load_pipeline(tmp_path / "export")
    x = torch.randn(1, 7, 32, 32)
    with torch.no_grad():  # a new module: its EMA would be its own weights
        ctx = module.reference_encoder(tiny_batch["reference"][:1])
        expected = module.denoiser(x, 10, encoder_hidden_states=ctx).sample
    with torch.no_grad():
        ctx2 = loaded.reference_encoder(tiny_batch["reference"][:1])
        got = loaded.unet(x, 10, encoder_hidden_states=ctx2).sample
    torch.testing.assert_close(got, expected)
    assert loaded.image_size == 32
    with pytest.raises(FileNotFoundError):
        load_pipeline(tmp_path / "missing")
