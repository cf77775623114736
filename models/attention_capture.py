"""Cross-attention capture: the masked-query reduction of Algorithm 1, computed on the spot.

Blocks are the UNet's cross-attention (``attn2``) layers numbered 0..L-1 in forward order:
down blocks, then the mid block, then up blocks (16 for the SD-1.5 layout). diffusers'
``attn_processors`` dict lists the mid block last, so it is never used for numbering.

Only the blocks asked for compute attention probabilities explicitly; every other block keeps
its own (SDPA) processor. What is stored per block is one vector over the reference tokens per
sample: the head-averaged attention distribution averaged over the artifact-mask queries (the
mask resized to that block's own resolution). The full (queries x tokens) matrix is never kept.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import Attention


@dataclass(frozen=True)
class CrossAttentionBlock:
    """One ``attn2`` layer: its forward-order index, module path and downsampling factor."""

    index: int
    name: str
    downsample: int

    def resolution(self, latent_hw: tuple[int, int]) -> tuple[int, int]:
        """Spatial size of this block's queries for a latent of size ``latent_hw``."""
        return (-(-latent_hw[0] // self.downsample), -(-latent_hw[1] // self.downsample))


_BLOCKS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def cross_attention_blocks(unet: UNet2DConditionModel) -> list[CrossAttentionBlock]:
    """All cross-attention layers of ``unet`` in forward order (down, mid, up).

    Found once per UNet: walking an SD UNet's ~700 modules takes about a millisecond of Python,
    as long as the whole capture may add to a batch-1 forward on a GPU.
    """
    if unet not in _BLOCKS:
        _BLOCKS[unet] = _find_cross_attention_blocks(unet)
    return list(_BLOCKS[unet])


def _find_cross_attention_blocks(unet: UNet2DConditionModel) -> list[CrossAttentionBlock]:
    n_down = len(unet.down_blocks)
    stages: list[tuple[str, torch.nn.Module, int]] = []
    for i, block in enumerate(unet.down_blocks):
        stages.append((f"down_blocks.{i}", block, 2 ** min(i, n_down - 1)))
    if unet.mid_block is not None:
        stages.append(("mid_block", unet.mid_block, 2 ** (n_down - 1)))
    for j, block in enumerate(unet.up_blocks):
        stages.append((f"up_blocks.{j}", block, 2 ** max(n_down - 1 - j, 0)))

    blocks: list[CrossAttentionBlock] = []
    for prefix, stage, factor in stages:
        for name, module in stage.named_modules():
            if isinstance(module, Attention) and name.endswith("attn2"):
                blocks.append(CrossAttentionBlock(len(blocks), f"{prefix}.{name}", factor))
    return blocks


@dataclass
class CaptureState:
    """Shared by the processors of one capture: the query mask in, per-block vectors out."""

    mask: torch.Tensor  # [B, 1, h, w] soft or binary, any resolution
    cond_rows: slice | None = None  # rows of the batch that are conditional (CFG)
    maps: dict[int, torch.Tensor] = field(default_factory=dict)  # block -> [B, tokens]


class MaskedCrossAttentionProcessor:
    """Cross-attention with explicit probabilities, reduced over the masked queries."""

    def __init__(self, block: CrossAttentionBlock, state: CaptureState) -> None:
        self.block = block
        self.state = state

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args,
        **kwargs,
    ) -> torch.Tensor:
        if encoder_hidden_states is None:
            raise ValueError("MaskedCrossAttentionProcessor is for cross-attention (attn2) only")
        residual = hidden_states
        batch, n_query, _ = hidden_states.shape
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        if attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)

        query = attn.head_to_batch_dim(attn.to_q(hidden_states))
        key = attn.head_to_batch_dim(attn.to_k(encoder_hidden_states))
        value = attn.head_to_batch_dim(attn.to_v(encoder_hidden_states))
        probs = attn.get_attention_scores(query, key, attention_mask)  # [B*heads, N, T]
        out = attn.batch_to_head_dim(torch.bmm(probs, value))
        out = attn.to_out[1](attn.to_out[0](out))
        if attn.residual_connection:
            out = out + residual
        out = out / attn.rescale_output_factor

        self.state.maps[self.block.index] = self._reduce(probs.view(batch, attn.heads, n_query, -1))
        return out

    def _reduce(self, probs: torch.Tensor) -> torch.Tensor:
        """Mean over heads, then the mask-weighted mean over queries -> [B, tokens]."""
        probs = probs.float().mean(dim=1)  # [B, N, T]
        weights = query_weights(self.state.mask, probs.shape[1]).to(probs)
        rows = self.state.cond_rows
        if rows is not None:
            probs = probs[rows]
        if weights.shape[0] != probs.shape[0]:
            raise ValueError(
                f"capture mask has batch {weights.shape[0]} but the conditional batch is "
                f"{probs.shape[0]}"
            )
        total = weights.sum(dim=1, keepdim=True).clamp_min(1e-8)
        return torch.einsum("bn,bnt->bt", weights, probs) / total


def query_weights(mask: torch.Tensor, n_query: int) -> torch.Tensor:
    """Resize ``mask`` [B,1,H,W] to a block whose query grid has ``n_query`` cells -> [B, N]."""
    height, width = mask.shape[-2:]
    h = round(math.sqrt(n_query * height / width))
    w = n_query // h
    if h * w != n_query:
        raise ValueError(f"cannot fit {n_query} queries to the mask's aspect {height}x{width}")
    return F.adaptive_avg_pool2d(mask.float(), (h, w)).flatten(1)


@contextmanager
def capture_cross_attention(
    unet: UNet2DConditionModel,
    mask: torch.Tensor,
    blocks: Sequence[int] | None = None,
    cond_rows: slice | None = None,
) -> Iterator[dict[int, torch.Tensor]]:
    """Capture the masked-query attention of ``blocks`` (all if None) while inside the context.

    Yields a dict, filled by each forward, mapping block index -> [B, tokens] distribution
    (a later forward overwrites an earlier one). Original processors are restored on exit.
    """
    all_blocks = cross_attention_blocks(unet)
    chosen = all_blocks if blocks is None else [all_blocks[i] for i in blocks]
    state = CaptureState(mask=mask, cond_rows=cond_rows)
    previous = {}
    try:
        for block in chosen:
            module = unet.get_submodule(block.name)
            previous[block.name] = module.processor
            module.set_processor(MaskedCrossAttentionProcessor(block, state))
        yield state.maps
    finally:
        for name, processor in previous.items():
            unet.get_submodule(name).set_processor(processor)
