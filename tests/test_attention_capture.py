import pytest
import torch
import torch.nn.functional as F

from models.attention_capture import (
    capture_cross_attention,
    cross_attention_blocks,
    query_weights,
)
from tests.conftest import sd15_layout_unet


def test_sd15_layout_has_16_blocks_in_forward_order():
    unet = sd15_layout_unet()
    blocks = cross_attention_blocks(unet)
    assert len(blocks) == 16
    assert [b.index for b in blocks] == list(range(16))
    assert all(b.name.startswith("down_blocks") for b in blocks[:6])
    assert blocks[6].name.startswith("mid_block")
    assert all(b.name.startswith("up_blocks") for b in blocks[7:])
    # diffusers' own dict puts the mid block last: our numbering must not follow it
    dict_order = [k for k in unet.attn_processors if "attn2" in k]
    assert dict_order[-1].startswith("mid_block")
    assert [b.resolution((64, 64)) for b in (blocks[0], blocks[6], blocks[15])] == [
        (64, 64), (8, 8), (64, 64)]


def test_forward_order_matches_execution_order():
    unet = sd15_layout_unet()
    order = []
    modules = dict(unet.named_modules())
    hooks = [modules[b.name].register_forward_hook(lambda m, i, o, n=b.name: order.append(n))
             for b in cross_attention_blocks(unet)]
    unet(torch.randn(1, 9, 16, 16), 10, encoder_hidden_states=torch.randn(1, 5, 768))
    for h in hooks:
        h.remove()
    assert order == [b.name for b in cross_attention_blocks(unet)]


def _explicit_reduction(attn, hidden, context, mask_weights):
    """softmax(Q K^T / sqrt(d)) computed by hand, head-averaged, mask-weighted over queries."""
    b, n, _ = hidden.shape
    heads = attn.heads
    q = attn.to_q(hidden).view(b, n, heads, -1).transpose(1, 2)
    k = attn.to_k(context).view(b, context.shape[1], heads, -1).transpose(1, 2)
    probs = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1).mean(1)
    return (mask_weights[:, :, None] * probs).sum(1) / mask_weights.sum(1, keepdim=True)


def test_capture_equals_explicit_softmax_and_keeps_output():
    torch.manual_seed(1)
    unet = sd15_layout_unet().eval()
    blocks = cross_attention_blocks(unet)
    x = torch.randn(2, 9, 16, 16)
    context = torch.randn(2, 7, 768)
    mask = torch.zeros(2, 1, 16, 16)
    mask[0, :, 2:9, 3:12] = 1
    mask[1, :, 10:16, 0:5] = 1

    inputs = {}
    modules = dict(unet.named_modules())
    hooks = [modules[b.name].register_forward_pre_hook(
        lambda m, args, kwargs, i=b.index: inputs.__setitem__(i, (args[0], kwargs)),
        with_kwargs=True) for b in blocks]
    with torch.no_grad():
        plain = unet(x, 5, encoder_hidden_states=context).sample
        with capture_cross_attention(unet, mask) as maps:
            captured = unet(x, 5, encoder_hidden_states=context).sample
    for h in hooks:
        h.remove()

    torch.testing.assert_close(captured, plain, atol=1e-5, rtol=1e-4)
    assert sorted(maps) == list(range(16))
    for block in blocks:
        hidden, kwargs = inputs[block.index]
        weights = query_weights(mask, hidden.shape[1])
        expected = _explicit_reduction(modules[block.name], hidden,
                                       kwargs["encoder_hidden_states"], weights)
        torch.testing.assert_close(maps[block.index], expected, atol=1e-5, rtol=1e-4)
        assert maps[block.index].shape == (2, 7)
        torch.testing.assert_close(maps[block.index].sum(1), torch.ones(2))


def test_only_requested_blocks_are_swapped_and_restored():
    unet = sd15_layout_unet()
    before = {k: type(v) for k, v in unet.attn_processors.items()}
    with capture_cross_attention(unet, torch.ones(1, 1, 16, 16), blocks=[9]) as maps:
        swapped = [k for k, v in unet.attn_processors.items() if type(v) is not before[k]]
        unet(torch.randn(1, 9, 16, 16), 3, encoder_hidden_states=torch.randn(1, 4, 768))
    assert swapped == [cross_attention_blocks(unet)[9].name + ".processor"]
    assert list(maps) == [9]
    assert {k: type(v) for k, v in unet.attn_processors.items()} == before


def test_capture_does_not_walk_the_unet_each_time(monkeypatch):
    """Alignment enters the capture once per forward: after the first, no walk over the
    UNet's modules (about a millisecond of Python for an SD UNet, the size of the capture's
    whole budget on a GPU). The block list stays that of the first walk."""
    unet = sd15_layout_unet()
    mask = torch.ones(1, 1, 16, 16)
    with capture_cross_attention(unet, mask, blocks=[9]):
        pass
    first = cross_attention_blocks(unet)
    walks = []
    original = type(unet).named_modules
    monkeypatch.setattr(type(unet), "named_modules",
                        lambda self, *a, **k: walks.append(1) or original(self, *a, **k))
    with capture_cross_attention(unet, mask, blocks=[9]) as maps:
        unet(torch.randn(1, 9, 16, 16), 3, encoder_hidden_states=torch.randn(1, 4, 768))
    assert not walks and list(maps) == [9]
    assert cross_attention_blocks(unet) == first


def test_cfg_keeps_conditional_rows_only():
    unet = sd15_layout_unet().eval()
    x = torch.randn(1, 9, 16, 16)
    cond, uncond = torch.randn(1, 4, 768), torch.randn(1, 4, 768)
    mask = torch.ones(1, 1, 16, 16)
    with torch.no_grad():
        with capture_cross_attention(unet, mask, blocks=[3]) as alone:
            unet(x, 3, encoder_hidden_states=cond)
        single = alone[3].clone()
        with capture_cross_attention(unet, mask, blocks=[3], cond_rows=slice(1, None)) as both:
            unet(torch.cat([x, x]), 3, encoder_hidden_states=torch.cat([uncond, cond]))
    torch.testing.assert_close(both[3], single, atol=1e-5, rtol=1e-4)


def test_mask_is_resized_to_each_block_resolution():
    mask = torch.zeros(1, 1, 64, 64)
    mask[..., :32, :32] = 1  # top-left quadrant
    for side in (64, 32, 16, 8):
        weights = query_weights(mask, side * side).view(side, side)
        assert weights[: side // 2, : side // 2].min() == 1
        assert weights.sum() == pytest.approx(side * side / 4)
    with pytest.raises(ValueError):
        query_weights(torch.ones(1, 1, 64, 64), 7)


def test_masked_queries_change_the_vector():
    """Different masks select different queries, so the reduced vectors differ."""
    unet = sd15_layout_unet().eval()
    x = torch.randn(1, 9, 16, 16)
    context = torch.randn(1, 6, 768)
    left, right = torch.zeros(1, 1, 16, 16), torch.zeros(1, 1, 16, 16)
    left[..., :8] = 1
    right[..., 8:] = 1
    out = []
    for mask in (left, right):
        with torch.no_grad(), capture_cross_attention(unet, mask, blocks=[0]) as maps:
            unet(x, 3, encoder_hidden_states=context)
        out.append(maps[0])
    assert not torch.allclose(out[0], out[1])
    assert F.l1_loss(out[0], out[1]) > 1e-4
