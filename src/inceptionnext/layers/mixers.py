"""Token mixers: the spatial operator of a MetaNeXt block (paper Sec. 3.1, Eq. 1).

Every mixer maps (B, C, H, W) -> (B, C, H, W) and is built as ``mixer(channels)``, so a variant can swap
one for another without touching the block.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["InceptionDWConv2d", "PartialDWConv2d", "SelfAttention2d", "IdentityMixer"]


def _same_padding(kernel_size: int, dilation: int = 1) -> int:
    if kernel_size % 2 == 0:
        raise ValueError(f"kernel size must be odd to keep the spatial size, got {kernel_size}")
    return dilation * (kernel_size - 1) // 2


class InceptionDWConv2d(nn.Module):
    """Inception depthwise convolution (paper Sec. 3.2, Eq. 5-7, Algorithm 1).

    The channels are split into four groups: an identity group that is passed through untouched, and three
    groups of ``g = int(channels * branch_ratio)`` channels convolved depthwise with a small square kernel
    (k_s x k_s), a horizontal band (1 x k_b) and a vertical band (k_b x 1). Large-kernel receptive field at a cost
    linear in k_b (Table 2) instead of quadratic.

    Channel order is (identity, square, horizontal band, vertical band): identity FIRST. The paper's
    Algorithm 1 lists identity last, but every released checkpoint (official repository and timm) was trained
    with identity first, and the order decides which channels each kernel sees, so we follow the checkpoints.

    This is the reference: split, convolve, concatenate, on any device. The fused Triton kernel is a separate module
    with the same parameters and keys (:class:`~inceptionnext.layers.fused.TritonInceptionDWConv2d`), used only
    when asked for.

    Table 8 ablations:
        use_square / use_band_w / use_band_h: drop a branch; its channels join the identity group.
        band_sequential: instead of two parallel band branches of g channels, one band group of 2g channels goes
            through 1 x k_b and then k_b x 1 (Inception-v3 style factorisation). The same channels are convolved as
            in the parallel design, so the ablation isolates parallel vs. sequential.
    """

    def __init__(
        self,
        channels: int,
        square_kernel_size: int = 3,
        band_kernel_size: int = 11,
        branch_ratio: float = 1 / 8,
        dilation: int = 1,
        *,
        use_square: bool = True,
        use_band_w: bool = True,
        use_band_h: bool = True,
        band_sequential: bool = False,
    ) -> None:
        super().__init__()
        gc = int(channels * branch_ratio)
        if gc < 1:
            raise ValueError(f"branch_ratio={branch_ratio} leaves no channel per branch for {channels} channels")
        if band_sequential and not (use_band_w and use_band_h):
            raise ValueError("band_sequential needs both band kernels")
        self.channels = channels
        self.branch_channels = gc
        self.band_sequential = band_sequential
        sq_pad = _same_padding(square_kernel_size, dilation)
        band_pad = _same_padding(band_kernel_size, dilation)

        # (attribute name, channels) in checkpoint order, after the identity group
        branches: list[tuple[str, int]] = []
        if use_square:
            self.dwconv_hw = nn.Conv2d(gc, gc, square_kernel_size, padding=sq_pad, dilation=dilation, groups=gc)
            branches.append(("hw", gc))
        band_c = 2 * gc if band_sequential else gc
        if use_band_w:
            self.dwconv_w = nn.Conv2d(
                band_c, band_c, (1, band_kernel_size), padding=(0, band_pad), dilation=(1, dilation), groups=band_c
            )
        if use_band_h:
            self.dwconv_h = nn.Conv2d(
                band_c, band_c, (band_kernel_size, 1), padding=(band_pad, 0), dilation=(dilation, 1), groups=band_c
            )
        if band_sequential:
            branches.append(("band", band_c))
        else:
            if use_band_w:
                branches.append(("w", gc))
            if use_band_h:
                branches.append(("h", gc))
        convolved = sum(c for _, c in branches)
        if convolved > channels:
            raise ValueError(f"branch_ratio={branch_ratio} convolves {convolved} > {channels} channels")
        self.branches = tuple(name for name, _ in branches)
        self.split_sizes = (channels - convolved, *(c for _, c in branches))

    def _branch(self, name: str, x: torch.Tensor) -> torch.Tensor:
        if name == "hw":
            return self.dwconv_hw(x)
        if name == "w":
            return self.dwconv_w(x)
        if name == "h":
            return self.dwconv_h(x)
        return self.dwconv_h(self.dwconv_w(x))  # "band": sequential 1 x k then k x 1

    def forward_groups(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The output's channel groups before concatenation: identity, then each convolved branch.

        Split out of :meth:`forward` so that subclasses can concatenate elsewhere (the fused inference model
        concatenates into a reused buffer) without a second copy of the branch logic.
        """
        x_id, *groups = torch.split(x, self.split_sizes, dim=1)
        return [x_id, *(self._branch(n, g) for n, g in zip(self.branches, groups))]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat(self.forward_groups(x), dim=1)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, split={self.split_sizes}, branches={self.branches}"


class PartialDWConv2d(nn.Module):
    """Depthwise k x k convolution over a ratio of the channels (ConvNeXt's mixer, Table 1).

    ``conv_ratio=1`` is ConvNeXt's plain depthwise convolution. With a smaller ratio the channels are split as
    (unchanged, convolved), unchanged first, the layout of the released partial-ratio checkpoints.
    """

    def __init__(self, channels: int, kernel_size: int = 7, conv_ratio: float = 1.0, dilation: int = 1) -> None:
        super().__init__()
        conv_chs = int(channels * conv_ratio)
        if not 1 <= conv_chs <= channels:
            raise ValueError(f"conv_ratio={conv_ratio} gives {conv_chs} convolved channels out of {channels}")
        self.conv = nn.Conv2d(
            conv_chs, conv_chs, kernel_size, padding=_same_padding(kernel_size, dilation), dilation=dilation,
            groups=conv_chs,
        )  # fmt: skip
        self.split_sizes = (channels - conv_chs, conv_chs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.split_sizes[0] == 0:
            return self.conv(x)
        x_id, x_conv = torch.split(x, self.split_sizes, dim=1)
        return torch.cat((x_id, self.conv(x_conv)), dim=1)


class SelfAttention2d(nn.Module):
    """Multi-head self-attention over the H x W tokens of a feature map (MetaNeXt-Attn, Table 5).

    Used as the token mixer of a MetaNeXt block, where it shares the block's single shortcut with the MLP
    instead of having its own residual branch as in a Transformer. The paper reports that this merged block fails
    to train (3.9% top-1), which is why MetaNeXt mixers must stay simple.
    """

    def __init__(self, channels: int, num_heads: int = 6, qkv_bias: bool = True) -> None:
        super().__init__()
        if channels % num_heads:
            raise ValueError(f"channels={channels} is not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(channels, 3 * channels, bias=qkv_bias)
        self.proj = nn.Linear(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        tokens = x.flatten(2).transpose(1, 2)  # B, N, C
        qkv = self.qkv(tokens).reshape(b, h * w, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])  # B, heads, N, C/heads
        out = self.proj(out.transpose(1, 2).reshape(b, h * w, c))
        return out.transpose(1, 2).reshape(b, c, h, w)


class IdentityMixer(nn.Identity):
    """No token mixing (the MetaNeXt block degenerates to a per-pixel MLP)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
