"""Correspondence maps on the reference: token vector -> heat map -> region and box, and IoU.

Shared by validation during training, the alignment stage and the calibration sweep, so that
all three post-process and score a map the same way.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def tokens_to_grid(
    vectors: torch.Tensor, grid: tuple[int, int], num_prefix_tokens: int = 0
) -> torch.Tensor:
    """[B, T] attention over reference tokens -> [B, gh, gw] map over the patch grid."""
    patches = vectors[:, num_prefix_tokens:]
    if patches.shape[1] != grid[0] * grid[1]:
        raise ValueError(f"{patches.shape[1]} patch tokens do not fill a {grid} grid")
    return patches.reshape(-1, *grid)


def heatmap(grid_map: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Min-max normalise each [gh, gw] map and upsample (bilinear) to ``size`` -> [B, H, W]."""
    flat = grid_map.flatten(1).float()
    lo = flat.min(dim=1, keepdim=True).values
    hi = flat.max(dim=1, keepdim=True).values
    norm = ((flat - lo) / (hi - lo).clamp_min(1e-12)).view_as(grid_map)
    return F.interpolate(norm.unsqueeze(1), size=size, mode="bilinear", align_corners=False)[:, 0]


def threshold_region(heat: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """Boolean region where the normalised heat map reaches ``threshold``."""
    return heat >= threshold


def mask_boxes(masks: torch.Tensor) -> torch.Tensor:
    """[B, H, W] bool -> [B, 4] boxes (x0, y0, x1, y1), exclusive ends; empty -> zeros."""
    boxes = torch.zeros(masks.shape[0], 4, dtype=torch.long, device=masks.device)
    for i, mask in enumerate(masks):
        ys, xs = torch.nonzero(mask, as_tuple=True)
        if len(ys):
            boxes[i] = torch.stack([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
    return boxes


def boxes_to_masks(boxes: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """[B, 4] boxes -> [B, H, W] bool masks."""
    ys = torch.arange(size[0], device=boxes.device).view(1, -1, 1)
    xs = torch.arange(size[1], device=boxes.device).view(1, 1, -1)
    x0, y0, x1, y1 = (b.view(-1, 1, 1) for b in boxes.unbind(1))
    return (xs >= x0) & (xs < x1) & (ys >= y0) & (ys < y1)


def mask_iou(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-sample IoU of boolean masks [B, H, W]; two empty masks count as IoU 1."""
    pred, target = pred.bool().flatten(1), target.bool().flatten(1)
    inter = (pred & target).sum(1).float()
    union = (pred | target).sum(1).float()
    return torch.where(union > 0, inter / union.clamp_min(1), torch.ones_like(union))


def same_position_boxes(mask: torch.Tensor, reference_size: tuple[int, int]) -> torch.Tensor:
    """Baseline: the artifact mask's box at the same relative position on the reference."""
    height, width = mask.shape[-2:]
    boxes = mask_boxes(mask.reshape(-1, height, width) > 0.5).float()
    scale = torch.tensor(
        [reference_size[1] / width, reference_size[0] / height] * 2, device=mask.device
    )
    return (boxes * scale).round().long()


def correspondence_scores(
    vectors: torch.Tensor,
    reference_mask: torch.Tensor,
    grid: tuple[int, int],
    num_prefix_tokens: int = 0,
    threshold: float = 0.5,
) -> dict[str, torch.Tensor]:
    """Per-sample IoU of the thresholded map ('mask') and of its box ('box') vs ground truth."""
    gt = reference_mask.reshape(reference_mask.shape[0], *reference_mask.shape[-2:]) > 0.5
    size = tuple(gt.shape[-2:])
    region = threshold_region(heatmap(tokens_to_grid(vectors, grid, num_prefix_tokens), size),
                              threshold)
    box = boxes_to_masks(mask_boxes(region), size)
    return {"mask": mask_iou(region, gt), "box": mask_iou(box, mask_iou_box_target(gt))}


def mask_iou_box_target(gt: torch.Tensor) -> torch.Tensor:
    """Box metrics compare against the ground-truth region's own box, as in the paper."""
    return boxes_to_masks(mask_boxes(gt), tuple(gt.shape[-2:]))


def baseline_scores(mask: torch.Tensor, reference_mask: torch.Tensor) -> dict[str, dict]:
    """IoU of the two trivial baselines (whole reference, same-position box), mask and box."""
    gt = reference_mask.reshape(reference_mask.shape[0], *reference_mask.shape[-2:]) > 0.5
    size = tuple(gt.shape[-2:])
    gt_box = mask_iou_box_target(gt)
    whole = torch.ones_like(gt)
    same = boxes_to_masks(same_position_boxes(mask, size), size)
    return {
        "whole_reference": {"mask": mask_iou(whole, gt), "box": mask_iou(whole, gt_box)},
        "same_position_box": {"mask": mask_iou(same, gt), "box": mask_iou(same, gt_box)},
    }
