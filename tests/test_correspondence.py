"""Post-processing of correspondence maps: normalise, upsample, threshold, box, crop, IoU."""

import pytest
import torch

from models.alignment import crop, postprocess, reference_crop_box
from models.correspondence import (
    baseline_scores,
    boxes_to_masks,
    correspondence_scores,
    heatmap,
    mask_boxes,
    mask_iou,
    same_position_boxes,
    tokens_to_grid,
)


def _peaked_vector(row: int, col: int, grid: int = 16) -> torch.Tensor:
    vec = torch.full((1, grid * grid), 0.1)
    vec[0, row * grid + col] = 5.0
    return vec / vec.sum()


def test_heatmap_is_normalised_and_upsampled_where_the_peak_is():
    heat = heatmap(tokens_to_grid(_peaked_vector(3, 12), (16, 16)), (224, 224))
    assert heat.shape == (1, 224, 224)
    assert heat.min() == pytest.approx(0) and 0.9 < heat.max() <= 1  # bilinear: peak between px
    y, x = divmod(int(heat[0].argmax()), 224)
    assert abs(y - (3 + 0.5) * 14) <= 14 and abs(x - (12 + 0.5) * 14) <= 14


def test_cls_prefix_is_dropped_and_wrong_token_counts_fail():
    vec = torch.cat([torch.tensor([[100.0]]), _peaked_vector(0, 0)], dim=1)
    grid = tokens_to_grid(vec, (16, 16), num_prefix_tokens=1)
    assert grid.shape == (1, 16, 16) and grid[0, 0, 0] == grid.max()
    with pytest.raises(ValueError):
        tokens_to_grid(torch.ones(1, 100), (16, 16))


def test_region_and_square_crop_box_with_margin():
    heat, region, boxes = postprocess(_peaked_vector(8, 8), (16, 16), 0, (160, 160),
                                      threshold=0.5, margin=0.0)
    x0, y0, x1, y1 = boxes[0].tolist()
    assert x1 - x0 == y1 - y0  # square, as training's refinement-mode crops
    assert region[0, y0:y1, x0:x1].sum() == region[0].sum()  # the whole region inside
    assert x0 < 8.5 * 10 < x1 and y0 < 8.5 * 10 < y1
    grown = reference_crop_box(region[0], 0.5)
    assert grown[0] < x0 and grown[2] > x1 and grown[2] - grown[0] == grown[3] - grown[1]
    corner = torch.zeros(160, 160, dtype=torch.bool)
    corner[:20, 130:] = True
    cx0, cy0, cx1, cy1 = reference_crop_box(corner, 1.0)
    assert (cy0, cx1) == (0, 160) and cx1 - cx0 == cy1 - cy0  # shifted inside, still square


def test_boxes_masks_iou_round_trip():
    masks = torch.zeros(2, 20, 30, dtype=torch.bool)
    masks[0, 2:7, 5:9] = True
    boxes = mask_boxes(masks)
    assert boxes.tolist() == [[5, 2, 9, 7], [0, 0, 0, 0]]
    back = boxes_to_masks(boxes, (20, 30))
    assert torch.equal(back[0], masks[0]) and not back[1].any()
    iou = mask_iou(back, masks)
    assert iou.tolist() == [1.0, 1.0]  # two empty masks agree
    half = masks.clone()
    half[0, 2:7, 7:9] = False
    assert mask_iou(half[:1], masks[:1]).item() == pytest.approx(0.5)


def test_scores_and_baselines_on_a_known_case():
    ref_mask = torch.zeros(1, 1, 224, 224)
    ref_mask[..., 112:140, 168:196] = 1  # token (8..9, 12..13)
    vec = torch.full((1, 256), 1e-3)
    for r in (8, 9):
        for c in (12, 13):
            vec[0, r * 16 + c] = 1.0
    scores = correspondence_scores(vec, ref_mask, (16, 16))
    assert scores["mask"].item() > 0.5 and scores["box"].item() > 0.5
    target_mask = torch.zeros(1, 1, 64, 64)
    target_mask[..., 0:8, 0:8] = 1  # top-left: far from the true region
    base = baseline_scores(target_mask, ref_mask)
    assert base["whole_reference"]["mask"].item() == pytest.approx(28 * 28 / 224**2)
    assert base["same_position_box"]["mask"].item() == 0
    assert same_position_boxes(target_mask, (224, 224))[0].tolist() == [0, 0, 28, 28]


def test_crop_is_never_empty():
    image = torch.rand(3, 50, 60)
    assert crop(image, (10, 10, 30, 40)).shape == (3, 30, 20)
    dot = torch.zeros(50, 60, dtype=torch.bool)
    dot[20, 20] = True
    assert min(crop(image, reference_crop_box(dot)).shape[1:]) >= 16
    assert reference_crop_box(torch.zeros(50, 60, dtype=torch.bool)) == (0, 0, 60, 50)


def test_validation_metric_means_every_sample_and_merges_like_ranks():
    """CorrespondenceMIoU: per block and baseline, the mean over every sample given to it;
    two halves of unequal size merged (what the DDP sync does) give the whole set's mean."""
    from models.correspondence_metric import BASELINES, CorrespondenceMIoU

    g = torch.Generator().manual_seed(0)
    n, grid = 7, (4, 4)
    attention = {0: torch.rand(n, 16, generator=g), 3: torch.rand(n, 16, generator=g)}
    mask, ref_mask = torch.zeros(n, 1, 32, 32), torch.zeros(n, 1, 56, 56)
    for i in range(n):
        mask[i, :, 2 * i:2 * i + 10, 4:16] = 1
        ref_mask[i, :, 4 * i:4 * i + 20, 8:8 + 4 * i + 4] = 1

    def metric(rows: slice) -> CorrespondenceMIoU:
        m = CorrespondenceMIoU([0, 3], grid, threshold=0.5)
        m.update({b: v[rows] for b, v in attention.items()}, mask[rows], ref_mask[rows])
        return m

    whole = metric(slice(0, n)).compute()
    for block, vectors in attention.items():
        scores = correspondence_scores(vectors, ref_mask, grid, 0, 0.5)
        for kind in ("mask", "box"):
            assert whole["blocks"][block][kind] == pytest.approx(float(scores[kind].mean()))
    baselines = baseline_scores(mask, ref_mask)
    for name in BASELINES:
        for kind in ("mask", "box"):
            assert whole["baselines"][name][kind] == pytest.approx(
                float(baselines[name][kind].mean()))
    first, second = metric(slice(0, 2)), metric(slice(2, n))
    alone = metric(slice(0, 2)).compute()  # one rank's share is not the whole set
    assert alone["blocks"][0]["mask"] != pytest.approx(whole["blocks"][0]["mask"])
    first.merge_state(second)
    merged = first.compute()
    for part in ("blocks", "baselines"):
        for name, scores in whole[part].items():
            assert merged[part][name] == pytest.approx(scores)
