"""The two training modes, the crop helper, the sample contract and the DataModule."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from pytorch_lightning.plugins.precision import HalfPrecision
from torch.utils.data import default_collate

from data.datamodule import PairDataModule
from data.masks import mask_bbox
from data.modes import (
    ALIGNMENT,
    REFINEMENT,
    crop_box,
    decode_pixels,
    make_reference,
)
from data.synthetic import SyntheticPairs, draw_mode, item_generators, make_pair

R = 224


def check_contract(s: dict, image_size: int, mode: int | None = None) -> None:
    assert s["target"].shape == (3, image_size, image_size) and s["target"].dtype == torch.float32
    assert s["target"].min() >= -1 and s["target"].max() <= 1
    assert s["target"].min() < -0.2 and s["target"].max() > 0.2  # really spans [-1, 1]
    assert s["mask"].shape == (1, image_size, image_size)
    assert s["reference"].shape == (3, R, R) and s["reference"].dtype == torch.float32
    assert s["reference"].min() >= 0 and s["reference"].max() <= 1
    assert s["reference_mask"].shape == (1, R, R)
    for k in ("mask", "reference_mask"):
        assert set(torch.unique(s[k]).tolist()) == {0.0, 1.0}, k
    assert s["mode"].dtype == torch.int64 and s["mode"].ndim == 0
    if mode is not None:
        assert int(s["mode"]) == mode


@pytest.mark.parametrize("mode", [ALIGNMENT, REFINEMENT])
def test_modes_follow_the_contract(mode):
    ds = SyntheticPairs(length=4, seed=1, image_size=64, force_mode=mode)
    for i in range(len(ds)):
        check_contract(ds[i], 64, mode)


def test_pair_content_does_not_depend_on_mode():
    align = SyntheticPairs(length=4, seed=2, force_mode=ALIGNMENT)
    refine = SyntheticPairs(length=4, seed=2, force_mode=REFINEMENT)
    cropped = 0
    for i in range(4):
        a, b = align[i], refine[i]
        assert torch.equal(a["target"], b["target"]) and torch.equal(a["mask"], b["mask"])
        # a crop zooms in on the region (a large region may need the whole view)
        assert b["reference_mask"].mean() >= a["reference_mask"].mean() - 1e-6
        cropped += not torch.equal(a["reference"], b["reference"])
    assert cropped >= 2


def test_align_ratio_controls_mode_frequency():
    draws = [draw_mode(np.random.default_rng(i), 0.3, None) for i in range(2000)]
    assert abs(draws.count(ALIGNMENT) / 2000 - 0.3) < 0.04
    assert {draw_mode(np.random.default_rng(i), 1.0, None) for i in range(50)} == {ALIGNMENT}


@pytest.mark.parametrize("seed", range(10))
def test_crop_box_contains_region_square_inside_image(seed):
    rng = np.random.default_rng(seed)
    mask = np.zeros((200, 200), bool)
    x0, y0 = rng.integers(0, 180, 2)
    w, h = rng.integers(3, 60, 2)
    mask[y0:y0 + h, x0:x0 + w] = True
    rx0, ry0, rx1, ry1 = mask_bbox(mask)
    bx0, by0, bx1, by1 = crop_box(mask, rng)
    assert bx1 - bx0 == by1 - by0  # square: no aspect distortion when resized
    assert bx0 >= 0 and by0 >= 0 and bx1 <= 200 and by1 <= 200
    assert bx0 <= rx0 and by0 <= ry0 and bx1 >= rx1 and by1 >= ry1
    assert crop_box(mask) == crop_box(mask)  # deterministic without rng (inference)


def test_crop_box_of_empty_mask_is_whole_image():
    assert crop_box(np.zeros((30, 40), bool)) == (0, 0, 40, 30)


@pytest.mark.parametrize("seed", range(5))
def test_refinement_reference_is_a_crop_containing_the_region(seed):
    content, mode_rng = item_generators(5, seed)
    pair = make_pair(content, R, 128)
    region = pair.reference_region
    full, full_mask, full_box = make_reference(pair.reference.rgb, region, ALIGNMENT, R)
    crop, crop_mask, box = make_reference(pair.reference.rgb, region, REFINEMENT, R, mode_rng)
    assert full_box == (0, 0, R, R) and np.array_equal(full_mask, region)
    rx0, ry0, rx1, ry1 = mask_bbox(region)
    assert box[0] <= rx0 and box[1] <= ry0 and box[2] >= rx1 and box[3] >= ry1
    # a square of the region's longer side grown by 10-40% on each side, capped at R
    side, longest = box[2] - box[0], max(rx1 - rx0, ry1 - ry0)
    assert box[3] - box[1] == side
    assert min(R, round(longest * 1.2)) <= side <= min(R, round(longest * 1.8))
    if side < R:  # an actual crop zooms in: the region fills more of the reference
        assert crop_mask.mean() > full_mask.mean()
    # the region's pixels are the reference's pixels in that box
    x0, y0, x1, y1 = box
    patch = pair.reference.rgb[y0:y1, x0:x1].astype(float)
    assert abs(crop.astype(float).mean() - patch.mean()) < 3


@pytest.mark.parametrize("mode", [ALIGNMENT, REFINEMENT])
def test_compact_items_decode_to_the_float_items(mode):
    """uint8 / bool pixels carry the same sample: decoded, it is the float item bit for bit,
    and the decode table gives what per-pixel float32 arithmetic gives."""
    floats = SyntheticPairs(length=3, seed=4, force_mode=mode)
    compact = floats.compact_view()
    for i in range(len(floats)):
        c, f = compact[i], floats[i]
        assert c["target"].dtype == c["reference"].dtype == torch.uint8
        assert c["mask"].dtype == c["reference_mask"].dtype == torch.bool
        assert c["target"].shape == (3, 64, 64) and c["reference"].shape == (3, R, R)
        decoded = decode_pixels(c)
        check_contract(decoded, 64, mode)
        for k in f:
            assert decoded[k].dtype == f[k].dtype and torch.equal(decoded[k], f[k]), k
        np.testing.assert_array_equal(
            decoded["target"].numpy(), c["target"].numpy().astype(np.float32) / 127.5 - 1.0)
        np.testing.assert_array_equal(
            decoded["reference"].numpy(), c["reference"].numpy().astype(np.float32) / 255.0)
        assert decode_pixels(decoded) == decoded  # float samples pass through


def test_datamodule_batches_are_compact_until_after_the_transfer():
    dm = PairDataModule(batch_size=4, num_workers=0, train_length=8, val_length=4)
    dm.setup("fit")
    wire = next(iter(dm.val_dataloader()))
    assert wire["target"].dtype == wire["reference"].dtype == torch.uint8
    assert wire["mask"].dtype == wire["reference_mask"].dtype == torch.bool
    batch = dm.on_after_batch_transfer(wire, 0)
    expected = default_collate([dm.val_set[i] for i in range(4)])  # the float val_set
    for k in expected:
        assert batch[k].dtype == expected[k].dtype and torch.equal(batch[k], expected[k]), k
    # with a true-half precision, the input conversion Lightning ran before the transfer
    # (on uint8, a no-op) is applied to the decoded floats
    dm.trainer = SimpleNamespace(precision_plugin=HalfPrecision("bf16-true"))
    half = dm.on_after_batch_transfer(wire, 0)
    assert half["target"].dtype == half["reference_mask"].dtype == torch.bfloat16
    assert torch.equal(half["reference"], expected["reference"].bfloat16())
    assert half["mode"].dtype == torch.int64


def test_datamodule_batches():
    dm = PairDataModule(batch_size=4, num_workers=0, train_length=8, val_length=4)
    dm.setup("fit")
    batch = dm.on_after_batch_transfer(next(iter(dm.train_dataloader())), 0)
    assert batch["target"].shape == (4, 3, 64, 64)
    assert batch["reference"].shape == (4, 3, R, R)
    val = dm.on_after_batch_transfer(next(iter(dm.val_dataloader())), 0)
    assert (val["mode"] == ALIGNMENT).all()
    # held out: the validation pairs are not training pairs
    train_targets = torch.stack([dm.train_set[i]["target"] for i in range(4)])
    assert not any(torch.equal(v, t) for v in val["target"] for t in train_targets)


def test_datamodule_rejects_bad_config():
    with pytest.raises(ValueError):
        PairDataModule(source="shards")
