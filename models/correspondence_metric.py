"""Validation's correspondence score as a torchmetrics ``Metric``.

Per cross-attention block: the mean IoU of the thresholded, masked-query attention map on the
reference ('mask') and of its box ('box') against the ground-truth reference region; beside
them the two trivial baselines (whole reference, the mask's box at the same position) on the
same samples. Scoring is :mod:`models.correspondence`'s, shared with alignment and the sweep.
States are sums and a count reduced by summation, so under DDP the means are over the whole
validation set, not one rank's share.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torchmetrics import Metric

from models.correspondence import baseline_scores, correspondence_scores

BASELINES = ("whole_reference", "same_position_box")
KINDS = ("mask", "box")


class CorrespondenceMIoU(Metric):
    """Mean IoU per block and per baseline, over the samples given to :meth:`update`."""

    full_state_update = False

    def __init__(self, blocks: Sequence[int], grid: tuple[int, int], num_prefix_tokens: int = 0,
                 threshold: float = 0.5, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.blocks = list(blocks)
        self.grid, self.num_prefix_tokens, self.threshold = grid, num_prefix_tokens, threshold
        self.add_state("block_sums", torch.zeros(len(self.blocks), len(KINDS)),
                       dist_reduce_fx="sum")
        self.add_state("baseline_sums", torch.zeros(len(BASELINES), len(KINDS)),
                       dist_reduce_fx="sum")
        self.add_state("count", torch.tensor(0.0), dist_reduce_fx="sum")

    def update(self, attention: Mapping[int, torch.Tensor], mask: torch.Tensor,
               reference_mask: torch.Tensor) -> None:
        """Add samples: ``attention`` block -> [B, tokens] masked-query attention, ``mask`` the
        artifact masks [B, 1, H, W], ``reference_mask`` the ground-truth regions."""
        for row, block in enumerate(self.blocks):
            scores = correspondence_scores(attention[block], reference_mask, self.grid,
                                           self.num_prefix_tokens, self.threshold)
            for col, kind in enumerate(KINDS):
                self.block_sums[row, col] += scores[kind].float().sum()
        baselines = baseline_scores(mask, reference_mask)
        for row, name in enumerate(BASELINES):
            for col, kind in enumerate(KINDS):
                self.baseline_sums[row, col] += baselines[name][kind].float().sum()
        self.count += len(mask)

    def compute(self) -> dict[str, dict[Any, dict[str, float]]]:
        """{'blocks': {block: {'mask', 'box'}}, 'baselines': {name: {'mask', 'box'}}}."""
        blocks, baselines = self.block_sums / self.count, self.baseline_sums / self.count
        return {
            "blocks": {b: {k: float(blocks[r, c]) for c, k in enumerate(KINDS)}
                       for r, b in enumerate(self.blocks)},
            "baselines": {n: {k: float(baselines[r, c]) for c, k in enumerate(KINDS)}
                          for r, n in enumerate(BASELINES)},
        }
