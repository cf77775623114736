"""Refinement metrics: exact values on constructed images, and no numbers without weights."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from evaluation import metrics as M
from models import image_metrics as G


def _pair() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Target 128 grey with texture, output = target +-10 (checkerboard) inside a 20x16 box."""
    rng = np.random.default_rng(0)
    target = rng.integers(60, 190, size=(48, 40, 3)).astype(np.uint8)
    mask = np.zeros((48, 40), bool)
    mask[10:30, 12:28] = True
    sign = np.where((np.indices((48, 40)).sum(0) % 2) == 0, 10, -10)[..., None]
    output = np.where(mask[..., None], target.astype(int) + sign, target).astype(np.uint8)
    output[0, 0] = 0  # outside the box: must not count
    return output, target, mask


def test_identical_images_are_perfect() -> None:
    _, target, mask = _pair()
    scores = G.ground_truth_metrics(target, target, mask)
    assert math.isinf(scores["psnr"]) and scores["psnr"] > 0
    assert scores["ssim"] == pytest.approx(1.0, abs=1e-6)
    assert scores["l1"] == 0.0


def test_known_noise_gives_expected_values() -> None:
    output, target, mask = _pair()
    scores = G.ground_truth_metrics(output, target, mask)
    assert scores["psnr"] == pytest.approx(20 * math.log10(255 / 10), abs=1e-3)
    assert scores["l1"] == pytest.approx(10 / 255, abs=1e-9)
    assert 0.0 < scores["ssim"] < 1.0


def test_masked_l1_ignores_box_pixels_outside_the_mask() -> None:
    target = np.full((16, 16, 3), 100, np.uint8)
    mask = np.zeros((16, 16), bool)
    mask[4, 4] = mask[10, 10] = True  # box 7x7, only two masked pixels
    output = target.copy()
    output[4, 4] = 151  # +51 in the mask
    output[6, 6] = 0  # in the box, not in the mask
    assert G.masked_l1(output, target, mask) == pytest.approx(51 / 255 / 2)


@pytest.mark.parametrize("side", [1, 2, 3, 4, 6, 11])
def test_ssim_small_boxes(side: int) -> None:
    target = np.random.default_rng(side).integers(0, 255, (20, 20, 3)).astype(np.uint8)
    mask = np.zeros((20, 20), bool)
    mask[2:2 + side, 3:3 + side] = True
    assert G.ssim_in_box(target, target, mask) == pytest.approx(1.0, abs=1e-5)


# Pretrained metrics. tests/conftest.py sets HF_HUB_OFFLINE=1 with empty HF_HOME / TORCH_HOME,
# so a hub id or tag is never cached here. Networks saved below are TINY RANDOM ones in each
# library's own layout: their numbers test the loading path only and are no CLIP / DINO / FID.
def test_offline_uncached_metrics_say_what_to_fetch_in_one_line(caplog) -> None:
    from evaluation.refinement import default_config

    for loader in (M.load_clip_scorer, M.load_dino_scorer, M.load_fid):
        loader.cache_clear()  # each loads (and warns) once per process
    with caplog.at_level("WARNING", logger="evaluation.metrics"):
        loaded = M.load_metrics(default_config().metrics)
    assert loaded == {"clip": M.NOT_CACHED, "dino": M.NOT_CACHED, "fid": M.NOT_CACHED}
    records = [r for r in caplog.records if r.name == "evaluation.metrics"]
    lines = {r.getMessage().split(" ")[0]: r.getMessage() for r in records}
    assert len(records) == 3 and all("\n" not in m for m in lines.values())
    for name, fetch, override in (
            ("CLIP", "create_model_and_transforms('ViT-L-14', pretrained='openai')",
             "refinement.metrics.clip.pretrained="),
            ("DINO", "snapshot_download('facebook/dinov2-base')", "refinement.metrics.dino.model="),
            ("FID:", "FrechetInceptionDistance()", "refinement.metrics.fid.weights=")):
        assert "not in the local cache and HF_HUB_OFFLINE=1" in lines[name], lines[name]
        assert fetch in lines[name] and override in lines[name], lines[name]

    output, target, mask = _pair()
    assert M.identity_scores(M.NOT_CACHED, [output], [mask], [target], [None]) == [M.NOT_CACHED]
    assert M.fid_score(M.NOT_CACHED, [output] * 2, [target] * 2) == M.NOT_CACHED
    assert M.mean_value([M.NOT_CACHED, M.NOT_CACHED]) == M.NOT_CACHED


def test_offline_uncached_model_weights_say_what_to_fetch() -> None:
    from models.autoencoder import VAE
    from models.denoiser import build_denoiser
    from models.hub import NotCachedError
    from models.reference_encoder import build_dinov2

    for build, repo, override in (
            (build_denoiser, "stable-diffusion-v1-5/stable-diffusion-inpainting",
             "paths.sd15_inpainting="),
            (VAE.from_pretrained, "stable-diffusion-v1-5/stable-diffusion-inpainting",
             "paths.sd15_inpainting="),
            (build_dinov2, "facebook/dinov2-large", "paths.dinov2=")):
        with pytest.raises(NotCachedError) as info:
            build(repo)
        line = str(info.value)
        assert "\n" not in line and f"snapshot_download('{repo}')" in line and override in line
        with pytest.raises(FileNotFoundError, match="no such file or folder '/no/such/folder'"):
            build("/no/such/folder")


def test_failed_downloads_are_told_apart_from_broken_weights(tmp_path, caplog) -> None:
    """The libraries' own errors for weights they could not fetch (offline here; a refused
    connection gives the same hub error) become "download failed"; other errors stop the run."""
    import open_clip
    from transformers import Dinov2Model

    from models.hub import is_download_failure

    errors = []
    for load in (lambda: Dinov2Model.from_pretrained("facebook/dinov2-base"),
                 lambda: open_clip.create_model_and_transforms("ViT-B-32", pretrained="openai")):
        with pytest.raises(Exception) as info:
            load()
        errors.append(info.value)
    garbage = tmp_path / "weights.bin"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(Exception) as broken:
        torch.load(garbage)
    assert [is_download_failure(e) for e in (*errors, broken.value)] == [True, True, False]
    caplog.clear()
    with caplog.at_level("WARNING", logger="evaluation.metrics"):
        assert M._note_or_raise("DINO score: x", errors[0], False, "fetch", "override") == \
            M.DOWNLOAD_FAILED
    ours = [r.getMessage() for r in caplog.records if r.name == "evaluation.metrics"]
    assert len(ours) == 1 and "could not be downloaded" in ours[0] and "\n" not in ours[0]
    with pytest.raises(M.MetricLoadError, match="present"):
        M._note_or_raise("DINO score: x", errors[0], True, "fetch", "override")
    with pytest.raises(M.MetricLoadError):
        M._note_or_raise("CLIP score: x", broken.value, False, "fetch", "override")


def test_metrics_switched_off_are_absent() -> None:
    assert M.load_metrics({"clip": None, "dino": False, "fid": None}) == {}
    assert M.load_metrics({"clip": {"model": None}, "dino": {"model": None}}) == {}


def test_configured_paths_that_do_not_exist_and_unknown_names_fail_loudly(tmp_path) -> None:
    with pytest.raises(M.MetricLoadError, match="no such file.*missing.bin"):
        M.load_clip_scorer("ViT-B-16", str(tmp_path / "missing.bin"))
    with pytest.raises(M.MetricLoadError, match="neither a local file nor an open_clip tag"):
        M.load_clip_scorer("ViT-B-16", "no-such-tag")
    with pytest.raises(M.MetricLoadError, match="no such file.*no_dinov2_here"):
        M.load_dino_scorer(str(tmp_path / "no_dinov2_here"))
    with pytest.raises(M.MetricLoadError, match="no such file.*missing.pth"):
        M.load_fid(str(tmp_path / "missing.pth"))


def test_present_but_broken_weights_fail_loudly(tmp_path) -> None:
    """Weights that exist but do not load are an error naming the file, not a note."""
    garbage = tmp_path / "weights.bin"
    garbage.write_bytes(b"not a checkpoint")
    (tmp_path / "dino").mkdir()
    (tmp_path / "dino" / "config.json").write_text("{not json")
    with pytest.raises(M.MetricLoadError, match="CLIP.*weights.bin.*present"):
        M.load_clip_scorer("ViT-B-16", str(garbage))
    with pytest.raises(M.MetricLoadError, match="DINO.*dino.*present"):
        M.load_dino_scorer(str(tmp_path / "dino"))
    with pytest.raises(M.MetricLoadError, match="FID.*weights.bin.*present"):
        M.load_fid(str(garbage))


def _crops() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    output, target, mask = _pair()
    ref_mask = np.zeros(target.shape[:2], bool)
    ref_mask[10:30, 12:28] = True
    return output, target, mask, ref_mask


def test_clip_score_loads_open_clip_layouts_by_path(tmp_path) -> None:
    """A tiny random open_clip model in open_clip's own layouts: a ``local-dir:`` folder
    (open_clip_config.json + open_clip_pytorch_model.bin, as on the hub) and a registered
    model config + checkpoint file (open_clip.add_model_config), both through our config."""
    import json

    import open_clip

    model_cfg = {"embed_dim": 16,
                 "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8,
                                "head_width": 16},
                 "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 16, "heads": 2,
                              "layers": 1}}
    folder = tmp_path / "tiny_clip"
    folder.mkdir()
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": model_cfg}))
    (folder / "rba-test-tiny-clip.json").write_text(json.dumps(model_cfg))
    torch.manual_seed(0)
    net = open_clip.create_model("local-dir:" + str(folder))
    torch.save(net.state_dict(), folder / "open_clip_pytorch_model.bin")
    open_clip.add_model_config(folder / "rba-test-tiny-clip.json")

    output, target, mask, ref_mask = _crops()
    embeddings = []
    for clip in ({"model": f"local-dir:{folder}"},
                 {"model": "rba-test-tiny-clip",
                  "pretrained": str(folder / "open_clip_pytorch_model.bin")}):
        scorer = M.load_metrics({"clip": clip})["clip"]
        assert isinstance(scorer, M.ClipScorer)
        embeddings.append(scorer.embed([target]))
        same, other = M.identity_scores(scorer, [target, output[::-1].copy()], [mask, mask],
                                        [target, target], [ref_mask, ref_mask])
        assert same == pytest.approx(1.0, abs=1e-5) and -1.0 <= other <= 1.0
    ours = open_clip.create_model_and_transforms("local-dir:" + str(folder))
    assert torch.equal(ours[0].visual.conv1.weight, net.visual.conv1.weight)
    assert torch.allclose(embeddings[0], embeddings[1], atol=1e-6)


def test_dino_score_loads_a_local_dinov2_folder(tmp_path) -> None:
    """A tiny random DINOv2 saved with save_pretrained, loaded by path through our config."""
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    Dinov2Model(Dinov2Config(image_size=224, patch_size=14, hidden_size=32, num_hidden_layers=1,
                             num_attention_heads=2, intermediate_size=64)).save_pretrained(
        tmp_path / "dino")
    scorer = M.load_metrics({"dino": {"model": str(tmp_path / "dino")}})["dino"]
    assert isinstance(scorer, M.DinoScorer)
    output, target, mask, ref_mask = _crops()
    same, other = M.identity_scores(scorer, [target, output[::-1].copy()], [mask, mask],
                                    [target, target], [ref_mask, ref_mask])
    assert same == pytest.approx(1.0, abs=1e-5)
    assert -1.0 <= other <= 1.0


@pytest.mark.slow
def test_fid_loads_local_inception_weights(tmp_path, monkeypatch) -> None:
    """torch-fidelity's Inception with RANDOM weights saved in its own state-dict layout and
    loaded through ``refinement.metrics.fid.weights``: identical sets score ~0, others more."""
    from torch_fidelity import feature_extractor_inceptionv3 as tf

    with monkeypatch.context() as patch:  # build the network without its download
        patch.setattr(tf, "load_state_dict_from_url", lambda *a, **k: None)
        patch.setattr(tf.FeatureExtractorInceptionV3, "load_state_dict", lambda *a, **k: None)
        torch.manual_seed(0)
        net = tf.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    torch.save(net.state_dict(), tmp_path / "inception.pth")
    metric = M.load_metrics({"fid": {"feature": 2048, "weights": str(tmp_path / "inception.pth")}}
                            )["fid"]
    assert not isinstance(metric, str)
    rng = np.random.default_rng(0)
    real = [rng.integers(0, 256, (48, 48, 3), dtype=np.uint8) for _ in range(4)]
    fake = [np.full((48, 48, 3), 128, np.uint8) + rng.integers(0, 8, (48, 48, 3), dtype=np.uint8)
            for _ in range(4)]
    same = M.fid_score(metric, real, real)
    assert abs(same) < 1e-3 * max(1.0, M.fid_score(metric, fake, real))
    assert M.fid_score(metric, fake, real) > 0


def _lettering() -> tuple[np.ndarray, np.ndarray]:
    """Two-colour 4 px strokes (lettering-like detail) and a mask over most of them."""
    import cv2

    cells = np.random.default_rng(0).random((12, 12)) < 0.4
    strokes = cv2.resize(cells.astype(np.uint8), (48, 48), interpolation=cv2.INTER_NEAREST)
    target = np.where(strokes[..., None] > 0, [40, 60, 200], [220, 200, 90]).astype(np.uint8)
    mask = np.zeros((48, 48), bool)
    mask[12:36, 10:38] = True
    return target, mask


def test_gradient_similarity_rewards_detail_not_smoothness() -> None:
    import cv2

    from evaluation.refinement import telea

    target, mask = _lettering()

    def inside(fill: np.ndarray) -> np.ndarray:
        return np.where(mask[..., None], fill, target)

    shifted = inside(np.roll(target, 1, axis=1))  # correct sharp detail, 1 px off
    blurred = inside(cv2.GaussianBlur(target, (0, 0), 2.0))
    smooth = telea(target, mask)
    flat = inside(np.broadcast_to(target[mask].mean(0).astype(np.uint8), target.shape))
    gms = {name: G.gradient_similarity(out, target, mask) for name, out in
           {"exact": target, "shifted": shifted, "blurred": blurred, "telea": smooth,
            "flat": flat}.items()}
    assert gms["exact"] == pytest.approx(1.0)
    for smooth_fill in ("blurred", "telea", "flat"):
        assert gms[smooth_fill] < gms["shifted"] - 0.15, gms
    # why the metric exists: PSNR prefers the blur to the correct sharp fill
    assert G.psnr_in_box(blurred, target, mask) > G.psnr_in_box(shifted, target, mask)
    # invented edges on a flat target cost as much as missing ones
    noisy = inside(np.random.default_rng(1).integers(0, 256, target.shape).astype(np.uint8))
    assert G.gradient_similarity(noisy, flat, mask) < 0.3
    assert G.ground_truth_metrics(shifted, target, mask)["gms"] == gms["shifted"]
    with pytest.raises(ValueError):
        G.gradient_similarity(target, target, np.zeros_like(mask))


def test_mean_value() -> None:
    assert M.mean_value([1.0, None, 3.0]) == 2.0
    assert M.mean_value([None, None]) is None
    assert math.isinf(M.mean_value([1.0, float("inf")]))


def test_gms_probe_ranks_sharp_copy_above_blur_where_psnr_does_not():
    from benchmarks.probe_gms import main as probe

    scores = probe(["--num", "8"])["scores"]
    shifted, blurred = scores["target shifted 1 px"], scores["target blurred (sigma 1.5)"]
    assert scores["target (exact)"]["gms"] == 1.0
    assert shifted["gms"] > blurred["gms"] > scores["OpenCV Telea"]["gms"]
    assert blurred["psnr"] > shifted["psnr"]  # why PSNR alone cannot judge detail


def test_hub_id_cached_later_rescores_a_resumed_run(tmp_path) -> None:
    """Offline, a DINOv2 hub id not in the cache gives its note; once the id is in the local
    cache (here a TINY RANDOM DINOv2 written in huggingface_hub's cache layout), the same run
    folder resumed scores the cached outputs instead of keeping the note."""
    from huggingface_hub import constants
    from transformers import Dinov2Config, Dinov2Model

    from data.benchmark import load_benchmark, write_synthetic_benchmark
    from evaluation.cache import RunCache
    from evaluation.refinement import default_config, evaluate_refinement
    from models.export import load_pipeline
    from tests.conftest import save_random_pipeline

    repo = "rba-test/tiny-dinov2"
    pipe = load_pipeline(save_random_pipeline(tmp_path / "export"))
    write_synthetic_benchmark(tmp_path / "bench", 2, seed=0)
    cases, _ = load_benchmark(tmp_path / "bench")
    cfg = default_config()
    cfg.methods = ["input"]
    cfg.metrics = {"batch_size": 4, "clip": None, "fid": None, "dino": {"model": repo}}

    def run() -> dict:
        M.load_dino_scorer.cache_clear()
        cache = RunCache(tmp_path / "run", {"settings": {"same": 1}})
        return evaluate_refinement(cases, pipe, None, cfg, progress=False, cache=cache)

    first = run()
    assert first["methods"]["input"]["dino"] == M.NOT_CACHED
    snapshot = Path(constants.HF_HUB_CACHE) / f"models--{repo.replace('/', '--')}"
    (snapshot / "refs").mkdir(parents=True)
    (snapshot / "refs" / "main").write_text("0" * 40)
    torch.manual_seed(0)
    Dinov2Model(Dinov2Config(image_size=224, patch_size=14, hidden_size=32, num_hidden_layers=1,
                             num_attention_heads=2, intermediate_size=64)).save_pretrained(
        snapshot / "snapshots" / ("0" * 40))
    try:
        second = run()
    finally:
        shutil.rmtree(snapshot)
        M.load_dino_scorer.cache_clear()
    assert all(isinstance(v["dino"], float) for v in second["per_case"]["input"].values())
    assert second["per_case"]["input"].keys() == first["per_case"]["input"].keys()
