"""Procedural training pairs (reference view, target view, exact correspondence), no files needed.

Item i of a set seeded with ``seed`` in namespace ``ns`` is generated from
SeedSequence((SEED_NAMESPACES[ns], seed, i)), so it is identical whatever the worker, order or
epoch. Two child streams keep the pair content independent of the mode draw: the same index
gives the same pair in alignment and refinement mode.

Namespaces keep training, validation and benchmark items apart by construction: SeedSequence
maps its first four 32-bit entropy words injectively to its state, so two sets in different
namespaces share no item whatever their seeds (nor with the pre-namespace scheme, whose
first word was the seed, when that seed was 0).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset

from data.geometry import TargetView, Warp, make_target
from data.masks import MaskConfig, make_mask
from data.modes import ALIGNMENT, REFINEMENT, to_sample
from data.objects import ObjectView, render_object


@dataclass
class Pair:
    """Everything known about one synthetic pair, at working resolution."""

    reference: ObjectView  # clean reference view
    target: TargetView  # artifact-free target view
    warp: Warp  # target <-> reference ground truth
    mask: np.ndarray  # bool, target space
    mask_kind: str

    @property
    def reference_region(self) -> np.ndarray:
        """The target mask mapped to the full reference view (bool)."""
        return self.warp.map_mask_to_reference(self.mask)


def working_sizes(image_size: int, reference_size: int) -> tuple[int, int]:
    """(reference, target) render sizes: reference at >= its output size, target at 2x output.

    The target is supersampled (at most to the reference resolution) so that area resizing
    anti-aliases fine lettering without paying for a full-resolution render at small presets.
    """
    ref_work = max(image_size, reference_size)
    return ref_work, min(ref_work, 2 * image_size)


def make_pair(rng: np.random.Generator, reference_res: int, target_res: int,
              mask_config: MaskConfig | None = None) -> Pair:
    """Render an object, view it under a random warp, and draw a target mask."""
    reference = render_object(reference_res, rng)
    target, warp = make_target(reference, target_res, rng)
    mask, kind = make_mask(target.footprint, target.detail, rng, mask_config)
    return Pair(reference=reference, target=target, warp=warp, mask=mask, mask_kind=kind)


# the first entropy word of every generated item; one value per use of generated data
SEED_NAMESPACES = {"train": 1, "validation": 2, "benchmark": 3}


def item_generators(seed: int, index: int, namespace: str = "train"
                    ) -> tuple[np.random.Generator, np.random.Generator]:
    """(content, mode) generators for item `index` of a set seeded with `seed` in `namespace`."""
    if namespace not in SEED_NAMESPACES:
        raise ValueError(f"namespace must be one of {sorted(SEED_NAMESPACES)}, got {namespace!r}")
    if not (0 <= seed < 2**32 and 0 <= index < 2**32):
        raise ValueError(f"seed and index must be 32-bit unsigned, got {seed}, {index}")
    words = [SEED_NAMESPACES[namespace], seed, index]
    content, mode = np.random.SeedSequence(words).spawn(2)
    return np.random.default_rng(content), np.random.default_rng(mode)


def draw_mode(rng: np.random.Generator, align_ratio: float, force_mode: int | None) -> int:
    if force_mode is not None:
        if force_mode not in (ALIGNMENT, REFINEMENT):
            raise ValueError(f"force_mode must be 0, 1 or None, got {force_mode}")
        return force_mode
    return ALIGNMENT if rng.random() < align_ratio else REFINEMENT


class SyntheticPairs(Dataset):
    """Map-style dataset of procedural pairs in the sample contract of `data.modes`."""

    def __init__(
        self,
        length: int = 10_000,
        seed: int = 0,
        image_size: int = 64,
        reference_size: int = 224,
        align_ratio: float = 0.5,
        force_mode: int | None = None,
        mask_config: MaskConfig | None = None,
        namespace: str = "train",
        compact: bool = False,
    ) -> None:
        if namespace not in SEED_NAMESPACES:
            raise ValueError(f"namespace must be one of {sorted(SEED_NAMESPACES)}")
        if not 0.0 <= align_ratio <= 1.0:
            raise ValueError(f"align_ratio must be in [0, 1], got {align_ratio}")
        self.length = length
        self.seed = seed
        self.namespace = namespace
        self.image_size = image_size
        self.reference_size = reference_size
        self.align_ratio = align_ratio
        self.force_mode = force_mode
        self.mask_config = mask_config
        self.compact = compact  # uint8 / bool pixels (data.modes.decode_pixels)
        self.reference_res, self.target_res = working_sizes(image_size, reference_size)

    def __len__(self) -> int:
        return self.length

    def compact_view(self) -> SyntheticPairs:
        """The same items with compact pixels: a quarter of the bytes through worker IPC."""
        view = copy.copy(self)
        view.compact = True
        return view

    def pair(self, index: int) -> Pair:
        """The full un-tensorised pair behind item `index` (benchmark writer, debugging)."""
        content, _ = item_generators(self.seed, index, self.namespace)
        return make_pair(content, self.reference_res, self.target_res, self.mask_config)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if not 0 <= index < self.length:
            raise IndexError(index)
        content, mode_rng = item_generators(self.seed, index, self.namespace)
        p = make_pair(content, self.reference_res, self.target_res, self.mask_config)
        mode = draw_mode(mode_rng, self.align_ratio, self.force_mode)
        sample = to_sample(p.target.rgb, p.mask, p.reference.rgb, p.reference_region, mode,
                           self.image_size, self.reference_size, mode_rng, self.compact)
        return {**sample, "index": torch.tensor(index, dtype=torch.int64)}
