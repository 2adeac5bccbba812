"""Token mixers against independent references (timm's modules, functional convolutions, nn.MultiheadAttention)."""

import pytest
import torch
import torch.nn.functional as F
from timm.models.inception_next import InceptionDWConv2d as TimmInceptionDWConv2d
from torch import nn

from inceptionnext import InceptionDWConv2d, PartialDWConv2d, SelfAttention2d


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.mark.parametrize(("channels", "band", "ratio"), [(96, 11, 1 / 8), (40, 9, 1 / 4), (384, 11, 1 / 8)])
def test_inception_dwconv_equals_timm(channels, band, ratio):
    ours = InceptionDWConv2d(channels, band_kernel_size=band, branch_ratio=ratio)
    ref = TimmInceptionDWConv2d(channels, band_kernel_size=band, branch_ratio=ratio)
    ref.load_state_dict(ours.state_dict())  # same keys and shapes: the released checkpoints' layout
    x = torch.randn(2, channels, 17, 13)
    torch.testing.assert_close(ours(x), ref(x))


def test_identity_group_comes_first_and_is_untouched():
    m = InceptionDWConv2d(64, branch_ratio=1 / 8)  # 8 channels per branch, 40 identity
    assert m.split_sizes == (40, 8, 8, 8)
    x = torch.randn(1, 64, 9, 9)
    y = m(x)
    torch.testing.assert_close(y[:, :40], x[:, :40])
    w, b = m.dwconv_hw.weight, m.dwconv_hw.bias
    torch.testing.assert_close(y[:, 40:48], F.conv2d(x[:, 40:48], w, b, padding=1, groups=8))
    w, b = m.dwconv_w.weight, m.dwconv_w.bias
    torch.testing.assert_close(y[:, 48:56], F.conv2d(x[:, 48:56], w, b, padding=(0, 5), groups=8))
    w, b = m.dwconv_h.weight, m.dwconv_h.bias
    torch.testing.assert_close(y[:, 56:64], F.conv2d(x[:, 56:64], w, b, padding=(5, 0), groups=8))


@pytest.mark.parametrize(
    ("kwargs", "split", "convs"),
    [
        (dict(use_square=False), (48, 8, 8), ("dwconv_w", "dwconv_h")),
        (dict(use_band_w=False), (48, 8, 8), ("dwconv_hw", "dwconv_h")),
        (dict(use_band_h=False), (48, 8, 8), ("dwconv_hw", "dwconv_w")),
    ],
)
def test_branch_ablations_move_channels_to_identity(kwargs, split, convs):
    m = InceptionDWConv2d(64, **kwargs)
    assert m.split_sizes == split
    assert {n for n, _ in m.named_children()} == set(convs)
    x = torch.randn(1, 64, 9, 9)
    torch.testing.assert_close(m(x)[:, :48], x[:, :48])


def test_band_sequential_is_1xk_then_kx1_on_the_band_channels():
    m = InceptionDWConv2d(64, band_kernel_size=7, band_sequential=True)
    assert m.split_sizes == (40, 8, 16)
    x = torch.randn(1, 64, 11, 11)
    band = x[:, 48:]
    ref = F.conv2d(band, m.dwconv_w.weight, m.dwconv_w.bias, padding=(0, 3), groups=16)
    ref = F.conv2d(ref, m.dwconv_h.weight, m.dwconv_h.bias, padding=(3, 0), groups=16)
    torch.testing.assert_close(m(x)[:, 48:], ref)


def test_inception_dwconv_rejects_impossible_ratios():
    with pytest.raises(ValueError, match="no channel"):
        InceptionDWConv2d(4, branch_ratio=1 / 8)
    with pytest.raises(ValueError, match="convolves"):
        InceptionDWConv2d(16, branch_ratio=1 / 2)
    with pytest.raises(ValueError, match="odd"):
        InceptionDWConv2d(64, band_kernel_size=10)


@pytest.mark.parametrize("ratio", [1.0, 1 / 2, 3 / 8, 1 / 16])
def test_partial_dwconv_convolves_the_last_channels(ratio):
    m = PartialDWConv2d(96, kernel_size=3, conv_ratio=ratio)
    n = int(96 * ratio)
    x = torch.randn(2, 96, 10, 10)
    y = m(x)
    torch.testing.assert_close(y[:, : 96 - n], x[:, : 96 - n])
    torch.testing.assert_close(
        y[:, 96 - n :], F.conv2d(x[:, 96 - n :], m.conv.weight, m.conv.bias, padding=1, groups=n)
    )


def test_self_attention_equals_multihead_attention():
    c, heads = 48, 6
    ours = SelfAttention2d(c, num_heads=heads)
    ref = nn.MultiheadAttention(c, heads, batch_first=True)
    with torch.no_grad():
        ref.in_proj_weight.copy_(ours.qkv.weight)
        ref.in_proj_bias.copy_(ours.qkv.bias)
        ref.out_proj.weight.copy_(ours.proj.weight)
        ref.out_proj.bias.copy_(ours.proj.bias)
    x = torch.randn(2, c, 5, 7)
    tokens = x.flatten(2).transpose(1, 2)
    expected = ref(tokens, tokens, tokens, need_weights=False)[0].transpose(1, 2).reshape(2, c, 5, 7)
    torch.testing.assert_close(ours(x), expected, rtol=1e-5, atol=1e-5)
