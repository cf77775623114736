"""Refinement metrics: exact values on constructed images, and no numbers without weights."""

from __future__ import annotations

import math

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


def test_weight_metrics_not_available_without_weights(tmp_path) -> None:
    assert M.load_clip_scorer("ViT-B-16", None) is None
    assert M.load_clip_scorer("ViT-B-16", str(tmp_path / "missing.bin")) is None
    assert M.load_dino_scorer(None) is None
    assert M.load_dino_scorer(str(tmp_path / "no_dinov2_here")) is None
    assert M.load_dino_scorer("nobody/not-a-cached-model") is None
    assert M.load_fid(None) is None
    assert M.load_fid(str(tmp_path / "missing.pth")) is None

    output, target, mask = _pair()
    scores = M.identity_scores(None, [output], [mask], [target], [None])
    assert scores == [M.NOT_AVAILABLE]
    assert M.fid_score(None, [output] * 2, [target] * 2) == M.NOT_AVAILABLE
    assert M.mean_value([M.NOT_AVAILABLE, M.NOT_AVAILABLE]) == M.NOT_AVAILABLE


def test_present_but_broken_weights_fail_loudly(tmp_path) -> None:
    """Weights that exist but do not load are an error naming the file, not 'no weights'."""
    garbage = tmp_path / "weights.bin"
    garbage.write_bytes(b"not a checkpoint")
    (tmp_path / "dino").mkdir()
    (tmp_path / "dino" / "config.json").write_text("{not json")
    with pytest.raises(M.MetricLoadError, match="CLIP.*weights.bin"):
        M.load_clip_scorer("ViT-B-16", str(garbage))
    with pytest.raises(M.MetricLoadError, match="DINO.*dino"):
        M.load_dino_scorer(str(tmp_path / "dino"))
    with pytest.raises(M.MetricLoadError, match="FID.*weights.bin"):
        M.load_fid(str(garbage))


def test_dino_score_with_local_weights(tmp_path) -> None:
    """The loading path itself, on a tiny DINOv2 saved locally (test-only weights)."""
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    Dinov2Model(Dinov2Config(image_size=224, patch_size=14, hidden_size=32, num_hidden_layers=1,
                             num_attention_heads=2, intermediate_size=64)).save_pretrained(
        tmp_path / "dino")
    scorer = M.load_dino_scorer(str(tmp_path / "dino"))
    assert scorer is not None
    output, target, mask = _pair()
    ref_mask = np.zeros(target.shape[:2], bool)
    ref_mask[10:30, 12:28] = True
    same, other = M.identity_scores(scorer, [target, output[::-1].copy()], [mask, mask],
                                    [target, target], [ref_mask, ref_mask])
    assert same == pytest.approx(1.0, abs=1e-5)
    assert -1.0 <= other <= 1.0


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
