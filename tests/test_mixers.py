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


def test_reference_mixer_has_no_fast_path_switches():
    """The reference is split / convolve / concatenate only: no class switch, no ``out=`` argument."""
    import inspect

    assert not hasattr(InceptionDWConv2d, "use_triton")
    assert list(inspect.signature(InceptionDWConv2d.forward).parameters) == ["self", "x"]


def test_triton_mixer_has_the_reference_keys_and_numbers_off_gpu():
    """Same parameters and checkpoint keys as the reference; where the kernel does not apply (this CPU, no
    interpreter) it is the reference computation."""
    from inceptionnext.layers import TritonInceptionDWConv2d

    ref = InceptionDWConv2d(64, band_kernel_size=7)
    fused = TritonInceptionDWConv2d(64, band_kernel_size=7)
    assert fused.state_dict().keys() == ref.state_dict().keys()
    fused.load_state_dict(ref.state_dict())
    x = torch.randn(2, 64, 9, 11)
    if not fused.uses_kernel(x):
        torch.testing.assert_close(fused(x), ref(x), rtol=0, atol=0)
    shared = TritonInceptionDWConv2d.from_module(ref, tiles=(16, 4))
    assert shared.tiles == (16, 4) and shared.split_sizes == ref.split_sizes
    assert all(a is b for a, b in zip(shared.parameters(), ref.parameters()))


def test_set_triton_mixers_swaps_in_place_and_back():
    from inceptionnext.layers import TritonInceptionDWConv2d, set_triton_mixers

    model = nn.Sequential(InceptionDWConv2d(32), PartialDWConv2d(32), nn.Sequential(InceptionDWConv2d(32)))
    keys, params = model.state_dict().keys(), list(model.parameters())
    assert set_triton_mixers(model) is model
    assert [type(m) for m in model.modules() if isinstance(m, InceptionDWConv2d)] == [TritonInceptionDWConv2d] * 2
    assert isinstance(model[1], PartialDWConv2d)
    assert model.state_dict().keys() == keys and all(a is b for a, b in zip(model.parameters(), params))
    set_triton_mixers(model, enable=False)
    assert [type(m) for m in model.modules() if isinstance(m, InceptionDWConv2d)] == [InceptionDWConv2d] * 2


@pytest.mark.parametrize("channels_last", [False, True])
def test_linear_mlp_equals_conv_mlp(channels_last):
    """Same module, computed as F.linear over the NHWC view: same keys, outputs and gradients."""
    from inceptionnext.layers import ConvMlp, LinearMlp
    from inceptionnext.layers.swap import share_as

    conv = ConvMlp(16, 64)
    linear = share_as(LinearMlp, conv)
    assert linear.state_dict().keys() == conv.state_dict().keys() and linear.fc1 is conv.fc1
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(2, 16, 5, 7).contiguous(memory_format=fmt)
    torch.testing.assert_close(linear(x), conv(x), rtol=1e-5, atol=1e-5)
    linear(x).sum().backward()
    grads = [p.grad.clone() for p in conv.parameters()]
    conv.zero_grad()
    conv(x).sum().backward()
    for g, p in zip(grads, conv.parameters()):
        torch.testing.assert_close(g, p.grad, rtol=1e-4, atol=1e-5)
