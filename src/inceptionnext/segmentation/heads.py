"""Decode heads for semantic segmentation: UperNet (Table 6) and Semantic FPN (Table 7).

Written from the papers and from the architecture that mmsegmentation's documented configs describe, since the
InceptionNeXt authors trained their segmentors with mmsegmentation (Sec. 4.2, App. A.2) and the parameter counts and
MACs of Tables 6-7 are those of that layout:

* :class:`UPerHead` (Xiao et al., ECCV 2018, mmseg ``upernet_swin``/ConvNeXt configs): PPM on the stride-32 map, an
  FPN over the four stage maps with 512 channels, all four levels fused at stride 4.
* :class:`FCNHead`: the auxiliary head on the stride-16 map that the UperNet configs train with (loss weight 0.4).
* :class:`FPNNeck` + :class:`FPNHead` (Kirillov et al., CVPR 2019, mmseg ``fpn_r50``, the config PVT and PoolFormer
  use): a 256-channel FPN, then per level 3x3 conv blocks with 2x upsampling down to stride 4, summed.

Every head takes the list of multi-scale maps (highest resolution first) and returns logits at the resolution of the
first map, so the segmentor decides where to resize.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError

__all__ = ["ConvNormAct", "PPM", "UPerHead", "FCNHead", "FPNNeck", "FPNHead", "make_seg_norm"]


def make_seg_norm(kind: str | None, channels: int, num_groups: int = 32) -> nn.Module:
    """Norm of a conv block: ``"batchnorm"`` (mmseg's (Sync)BN, the engine converts to SyncBN under DDP),
    ``"groupnorm"`` (the Semantic FPN paper's GN with ``num_groups`` groups) or ``None``."""
    if kind == "batchnorm":
        return nn.BatchNorm2d(channels)
    if kind == "groupnorm":
        return nn.GroupNorm(num_groups, channels)
    if kind is None:
        return nn.Identity()
    raise ConfigError(f"unknown norm {kind!r}: use 'batchnorm', 'groupnorm' or None")


def _resize(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Bilinear resize with ``align_corners=False`` (the heads' setting); a no-op when the size already matches,
    so MAC counts and outputs do not depend on a redundant interpolation."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


class ConvNormAct(nn.Sequential):
    """Conv -> Norm -> ReLU, mmseg's ``ConvModule``. The conv has a bias only without a norm (a bias before a norm
    is cancelled by it), which is also what makes the parameter counts match the paper."""

    def __init__(
        self,
        in_chs: int,
        out_chs: int,
        kernel_size: int = 1,
        norm: str | None = "batchnorm",
        act: bool = True,
        num_groups: int = 32,
    ) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_chs, out_chs, kernel_size, padding=kernel_size // 2, bias=norm is None)
        self.norm = make_seg_norm(norm, out_chs, num_groups)
        self.act = nn.ReLU(inplace=True) if act else nn.Identity()


class _Classifier(nn.Sequential):
    """Dropout2d (0.1, as mmseg's ``BaseDecodeHead``: whole channels are dropped) -> 1x1 conv with bias."""

    def __init__(self, channels: int, num_classes: int, dropout: float) -> None:
        super().__init__()
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        self.conv_seg = nn.Conv2d(channels, num_classes, kernel_size=1)


def init_head_weights(module: nn.Module) -> None:
    """Kaiming-normal (fan-out, ReLU) for conv blocks, unit/zero norms, and a small normal init (std 0.01) for the
    classifier so that the initial logits are near-uniform. The FPN neck has its own (Xavier) init."""
    for m in module.modules():
        if isinstance(m, ConvNormAct):
            nn.init.kaiming_normal_(m.conv.weight, mode="fan_out", nonlinearity="relu")
            if m.conv.bias is not None:
                nn.init.zeros_(m.conv.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, _Classifier):
            nn.init.normal_(m.conv_seg.weight, std=0.01)
            nn.init.zeros_(m.conv_seg.bias)


class PPM(nn.Module):
    """Pyramid pooling (PSPNet): for each scale, adaptive average pool -> 1x1 ConvNormAct -> bilinear upsample back.

    Returns the list of upsampled branches (not including the input), for the caller to concatenate.
    """

    def __init__(self, in_chs: int, channels: int, pool_scales: Sequence[int] = (1, 2, 3, 6)) -> None:
        super().__init__()
        self.pool_scales = tuple(pool_scales)
        self.branches = nn.ModuleList(
            nn.Sequential(nn.AdaptiveAvgPool2d(s), ConvNormAct(in_chs, channels, 1)) for s in self.pool_scales
        )

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [_resize(branch(x), x.shape[-2:]) for branch in self.branches]


class UPerHead(nn.Module):
    """UperNet's decode head: PPM + FPN + fusion of all levels at the highest resolution.

    Args:
        in_channels: channels of the input maps, highest resolution first (InceptionNeXt-T: 96, 192, 384, 768).
        num_classes: output classes.
        channels: width of every conv of the head (512 in the Swin/ConvNeXt/InceptionNeXt configs).
        pool_scales: PPM output sizes.
        dropout: Dropout2d before the classifier.
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        num_classes: int,
        channels: int = 512,
        pool_scales: Sequence[int] = (1, 2, 3, 6),
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        in_channels = list(in_channels)
        self.in_channels = in_channels
        self.channels = channels
        self.num_classes = num_classes
        # PPM on the coarsest map; its branches are concatenated with the map itself and fused by a 3x3 conv
        self.psp_modules = PPM(in_channels[-1], channels, pool_scales)
        self.bottleneck = ConvNormAct(in_channels[-1] + len(pool_scales) * channels, channels, 3)
        self.lateral_convs = nn.ModuleList(ConvNormAct(c, channels, 1) for c in in_channels[:-1])
        self.fpn_convs = nn.ModuleList(ConvNormAct(channels, channels, 3) for _ in in_channels[:-1])
        self.fpn_bottleneck = ConvNormAct(len(in_channels) * channels, channels, 3)
        self.cls = _Classifier(channels, num_classes, dropout)
        init_head_weights(self)

    def psp_forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bottleneck(torch.cat([x, *self.psp_modules(x)], dim=1))

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        if len(features) != len(self.in_channels):
            raise ValueError(f"UPerHead expects {len(self.in_channels)} maps, got {len(features)}")
        laterals = [conv(f) for conv, f in zip(self.lateral_convs, features)]
        laterals.append(self.psp_forward(features[-1]))
        for i in range(len(laterals) - 1, 0, -1):  # top-down: coarse context added into finer levels
            laterals[i - 1] = laterals[i - 1] + _resize(laterals[i], laterals[i - 1].shape[-2:])
        outs = [conv(lat) for conv, lat in zip(self.fpn_convs, laterals)] + [laterals[-1]]
        size = outs[0].shape[-2:]
        fused = self.fpn_bottleneck(torch.cat([_resize(o, size) for o in outs], dim=1))
        return self.cls(fused)


class FCNHead(nn.Module):
    """Auxiliary head on one map: ``num_convs`` 3x3 ConvNormAct (256 channels) -> dropout -> 1x1 classifier.

    It only regularises training (deep supervision of stage 3, loss weight 0.4); it is not run at inference, so it
    adds parameters but no inference MACs.
    """

    def __init__(
        self, in_chs: int, num_classes: int, channels: int = 256, num_convs: int = 1, dropout: float = 0.1
    ) -> None:
        super().__init__()
        self.in_channels = in_chs
        self.num_classes = num_classes
        self.convs = nn.Sequential(
            *(ConvNormAct(in_chs if i == 0 else channels, channels, 3) for i in range(num_convs))
        )
        self.cls = _Classifier(channels if num_convs else in_chs, num_classes, dropout)
        init_head_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.cls(self.convs(x))


class FPNNeck(nn.Module):
    """Feature pyramid (Lin et al. 2017) as Semantic FPN uses it: 1x1 lateral convs, top-down nearest-neighbour
    upsampling + addition, 3x3 output convs; all convs have a bias and no norm; one output per input, no extra
    levels.
    """

    def __init__(self, in_channels: Sequence[int], out_channels: int = 256) -> None:
        super().__init__()
        self.in_channels = list(in_channels)
        self.out_channels = out_channels
        self.lateral_convs = nn.ModuleList(nn.Conv2d(c, out_channels, 1) for c in self.in_channels)
        self.fpn_convs = nn.ModuleList(nn.Conv2d(out_channels, out_channels, 3, padding=1) for _ in self.in_channels)
        for m in self.modules():  # Xavier (uniform), the FPN convention: these convs are not followed by a norm
            if isinstance(m, nn.Conv2d):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, features: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        if len(features) != len(self.in_channels):
            raise ValueError(f"FPNNeck expects {len(self.in_channels)} maps, got {len(features)}")
        laterals = [conv(f) for conv, f in zip(self.lateral_convs, features)]
        for i in range(len(laterals) - 1, 0, -1):
            laterals[i - 1] = laterals[i - 1] + F.interpolate(laterals[i], size=laterals[i - 1].shape[-2:])
        return [conv(lat) for conv, lat in zip(self.fpn_convs, laterals)]


class _ScaleHead(nn.Module):
    """One level of the Semantic FPN head: ``depth`` ConvNormAct blocks, each followed by 2x bilinear upsampling
    while the map is coarser than the target stride."""

    def __init__(self, in_chs: int, channels: int, depth: int, upsample: bool, norm: str | None) -> None:
        super().__init__()
        self.upsample = upsample
        self.blocks = nn.ModuleList(
            ConvNormAct(in_chs if i == 0 else channels, channels, 3, norm) for i in range(depth)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
            if self.upsample:
                x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
        return x


class FPNHead(nn.Module):
    """Semantic FPN's head: level i (stride s_i) gets max(1, log2(s_i / s_0)) 3x3 conv blocks of ``channels``,
    each followed by 2x bilinear upsampling until stride s_0 (the stride-4 level: one block, no upsampling); the
    levels are summed, then dropout and a 1x1 classifier.

    Args:
        in_channels: channels of the neck outputs (256 each).
        feature_strides: strides of the levels (4, 8, 16, 32).
        num_classes: output classes.
        channels: width of the head (128).
        norm: ``"batchnorm"`` (default: mmseg's ``fpn_r50`` config, which PVT and PoolFormer inherit and the paper
            follows, sets ``norm_cfg=SyncBN`` for this head) or ``"groupnorm"`` (32 groups, the Semantic FPN paper).
            Both have 2 parameters per channel, so the parameter count does not tell them apart.
        dropout: Dropout2d before the classifier.
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        feature_strides: Sequence[int],
        num_classes: int,
        channels: int = 128,
        norm: str | None = "batchnorm",
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        if len(in_channels) != len(feature_strides):
            raise ValueError("in_channels and feature_strides must have the same length")
        if any(s % feature_strides[0] or s < feature_strides[0] for s in feature_strides):
            raise ConfigError(f"feature strides {tuple(feature_strides)} must be multiples of the first")
        self.in_channels = list(in_channels)
        self.feature_strides = list(feature_strides)
        self.num_classes = num_classes
        self.scale_heads = nn.ModuleList()
        for c, s in zip(in_channels, feature_strides):
            depth = max(1, int(math.log2(s // feature_strides[0])))
            self.scale_heads.append(_ScaleHead(c, channels, depth, upsample=s != feature_strides[0], norm=norm))
        self.cls = _Classifier(channels, num_classes, dropout)
        init_head_weights(self)

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        out = self.scale_heads[0](features[0])
        for head, f in zip(self.scale_heads[1:], features[1:]):
            out = out + _resize(head(f), out.shape[-2:])  # sizes differ only for inputs not divisible by 32
        return self.cls(out)
