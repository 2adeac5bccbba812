"""Encoder-decoder segmentors of Sec. 4.2: an InceptionNeXt backbone with UperNet (Table 6) or Semantic FPN (Table 7).

The backbone is this package's MetaNeXt in features-only mode (the four stage maps at strides 4/8/16/32), so an
ImageNet classification checkpoint loads into it unchanged (its classifier keys are ignored). timm backbone names work
too (``timm.create_model(features_only=True)``), for the comparison rows of Tables 6-7.

Counting conventions, checked against the paper by ``tests/test_seg_models.py``:

* Parameters are those of the whole segmentor as trained, UperNet's auxiliary FCN head included: with it
  InceptionNeXt-T/S/B UperNet count 56.40/77.72/114.98M (Table 6: 56/78/115), without it 55.47/76.79/113.76M, which
  would print 55 (or 56 after fvcore's 3-digit display)/77/114. mmseg's ``get_flops.py``, which the authors' code
  base uses, counts every parameter of the model. Semantic FPN has no auxiliary head (28.35/49.67/84.94M vs 28/50/85).
* MACs are those of inference (the auxiliary head does not run), at 512x2048 for UperNet and 512x512 for Semantic
  FPN, in :func:`inceptionnext.complexity.count_macs`'s convention (convs, BN 2 per element; interpolation free):
  933.23/1020.37/1159.02 G and 43.59/65.37/99.51 G against 933/1020/1159 and 44/65/100. Counting the bilinear
  upsampling as fvcore's jit counter does (4 per output element) would add ~0.6 G to UperNet and give 934; mmcv's
  hook counter (ReLU, conv biases) gives 933.6/1020.9/1159.7, i.e. 934/1021/1160. The printed figures have 4
  significant digits, so compare them rounded to integer GMACs, not through fvcore's 3-digit display.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from ..models.factory import create_model
from ..models.metanext import make_norm
from ..models.registry import is_model
from .heads import FCNHead, FPNHead, FPNNeck, UPerHead

__all__ = [
    "Segmentor",
    "create_segmentor",
    "build_feature_backbone",
    "feature_channels_and_strides",
    "PAPER_SEG",
    "DROP_PATH_SEG",
    "SEG_HEADS",
    "UPERNET",
    "FPN",
]

UPERNET, FPN = "upernet", "fpn"  # the decode heads of Tables 6 and 7
SEG_HEADS = (UPERNET, FPN)

# Tables 6 and 7 (ADE20K val, single scale): params (M) and MACs (G) as printed, the input size of the MACs, mIoU (%)
# and FPS on a 2080Ti.
PAPER_SEG: dict[tuple[str, str], dict[str, Any]] = {
    ("upernet", "inceptionnext_tiny"): dict(params_m="56", macs_g="933", input=(512, 2048), miou=47.9, fps=22.7),
    ("upernet", "inceptionnext_small"): dict(params_m="78", macs_g="1020", input=(512, 2048), miou=50.0, fps=17.6),
    ("upernet", "inceptionnext_base"): dict(params_m="115", macs_g="1159", input=(512, 2048), miou=50.6, fps=17.5),
    ("fpn", "inceptionnext_tiny"): dict(params_m="28", macs_g="44", input=(512, 512), miou=43.1, fps=31.4),
    ("fpn", "inceptionnext_small"): dict(params_m="50", macs_g="65", input=(512, 512), miou=45.6, fps=20.7),
    ("fpn", "inceptionnext_base"): dict(params_m="85", macs_g="100", input=(512, 512), miou=46.4, fps=20.2),
}

# Table 10: peak stochastic depth rate of the backbone.
DROP_PATH_SEG: dict[tuple[str, str], float] = {
    ("upernet", "inceptionnext_tiny"): 0.2,
    ("upernet", "inceptionnext_small"): 0.3,
    ("upernet", "inceptionnext_base"): 0.4,
    ("fpn", "inceptionnext_tiny"): 0.1,
    ("fpn", "inceptionnext_small"): 0.2,
    ("fpn", "inceptionnext_base"): 0.2,
}


def build_feature_backbone(
    name: str, *, drop_path_rate: float, pretrained: bool, checkpoint: str | os.PathLike | None
) -> nn.Module:
    """This package's model in features-only mode, else a timm features-only model.

    A timm backbone gives its last four levels (strides 4-32); it loads ``checkpoint`` through timm's pretrained
    path (``pretrained_cfg_overlay=dict(file=...)``), which strips the classifier before the model is wrapped as a
    feature extractor.
    """
    if is_model(name):
        return create_model(
            name,
            pretrained=pretrained,
            checkpoint_path=checkpoint,
            features_only=True,
            out_indices=(0, 1, 2, 3),
            drop_path_rate=drop_path_rate,
        )
    import timm

    # the last four feature levels: strides 4-32 also for backbones with a stride-2 level (ResNet)
    kwargs: dict[str, Any] = dict(features_only=True, out_indices=(-4, -3, -2, -1), drop_path_rate=drop_path_rate)
    if checkpoint is not None:
        kwargs["pretrained_cfg_overlay"] = dict(file=str(checkpoint))
    return timm.create_model(name, pretrained=pretrained or checkpoint is not None, **kwargs)


def feature_channels_and_strides(backbone: nn.Module) -> tuple[list[int], list[int]]:
    """The channels and strides of a features-only backbone's maps (``feature_info``, this package's or timm's)."""
    info = backbone.feature_info
    return list(info.channels()), list(info.reduction())


class Segmentor(nn.Module):
    """Backbone -> optional per-stage norm -> decode head (+ auxiliary head while training).

    Args:
        backbone: a name of this package (``inceptionnext_tiny``, ...) or of timm.
        head: ``"upernet"`` (UPerHead, 512 channels, + FCN auxiliary head) or ``"fpn"`` (FPN neck 256 + FPNHead 128).
        num_classes: output classes (ADE20K: 150).
        drop_path_rate: peak stochastic depth of the backbone (Table 10 values: :data:`DROP_PATH_SEG`).
        stage_norm: ``"batchnorm"`` (default), ``"layernorm"`` or ``None``: a fresh norm on each stage output before
            the head. The authors add a SyncBN on each stage output for segmentation (sail-sg/inceptionnext issues
            #10 and #11; they also use SyncBN in place of the backbone's BN): InceptionNeXt's stage outputs are
            residual streams that no norm follows (in the classifier, the next norm sits in the downsampling layer or
            the MLP head), and the decode heads consume them directly. It costs 2 parameters per channel (2,880 for
            T), below the paper's printed precision either way. Under DDP, ``nn.SyncBatchNorm.
            convert_sync_batchnorm`` turns it (and every other BN) into SyncBN, as in the paper.
        pretrained: load the released ImageNet-1K weights into the backbone.
        backbone_checkpoint: load this ImageNet classification checkpoint into the backbone instead (the head keys
            of the checkpoint are ignored).
        aux: build the auxiliary FCN head on the stride-16 map (default: True for UperNet, False for FPN), trained
            with weight :attr:`aux_weight` (applied by the training engine).
        fpn_norm: norm of Semantic FPN's head, ``"batchnorm"`` (mmseg ``fpn_r50``, which the paper follows) or
            ``"groupnorm"`` (32 groups, the Semantic FPN paper).
    """

    ignore_index = 255
    aux_weight = 0.4

    def __init__(
        self,
        backbone: str,
        head: str = "upernet",
        num_classes: int = 150,
        *,
        drop_path_rate: float = 0.0,
        stage_norm: str | None = "batchnorm",
        pretrained: bool = False,
        backbone_checkpoint: str | os.PathLike | None = None,
        aux: bool | None = None,
        fpn_norm: str | None = "batchnorm",
        head_channels: int | None = None,
    ) -> None:
        super().__init__()
        if head not in SEG_HEADS:
            raise ConfigError(f"unknown segmentation head {head!r}: use one of {SEG_HEADS}")
        self.backbone_name = backbone
        self.head_name = head
        self.num_classes = num_classes
        self.backbone = build_feature_backbone(
            backbone, drop_path_rate=drop_path_rate, pretrained=pretrained, checkpoint=backbone_checkpoint
        )
        channels, strides = feature_channels_and_strides(self.backbone)
        self.feature_channels, self.feature_strides = channels, strides
        self.stage_norm = stage_norm
        self.stage_norms = nn.ModuleList(
            make_norm(stage_norm, c) if stage_norm is not None else nn.Identity() for c in channels
        )

        # head_channels scales the heads for small problems; None keeps the widths of the paper's configs
        width = head_channels or (512 if head == UPERNET else 256)
        self.neck: nn.Module = nn.Identity()
        if head == UPERNET:
            self.decode_head: nn.Module = UPerHead(channels, num_classes, channels=width)
        else:
            self.neck = FPNNeck(channels, out_channels=width)
            self.decode_head = FPNHead(
                [width] * len(channels), strides, num_classes, channels=width // 2, norm=fpn_norm
            )

        self.aux = head == UPERNET if aux is None else aux
        # the auxiliary head supervises the stride-16 map (stage 3 of a 4-stage backbone)
        self.aux_index = strides.index(16) if 16 in strides else len(channels) - 2
        aux_width = 256 if head_channels is None else max(head_channels // 2, 8)
        self.aux_head = FCNHead(channels[self.aux_index], num_classes, channels=aux_width) if self.aux else None

    def extract_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats = self.backbone(x)
        if getattr(self.backbone, "output_fmt", "NCHW") == "NHWC":  # timm's Swin and other channels-last models
            feats = [f.permute(0, 3, 1, 2) for f in feats]
        return [norm(f) for norm, f in zip(self.stage_norms, feats)]

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """``{"out": logits at the resolution of the first map (1/4)}``, plus ``"aux"`` (same resolution as its
        stride-16 input) while training with an auxiliary head. The loss upsamples both to the labels."""
        feats = self.extract_features(x)
        out = {"out": self.decode_head(self.neck(feats))}
        if self.aux_head is not None and self.training:
            out["aux"] = self.aux_head(feats[self.aux_index])
        return out

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Logits at the input's resolution (bilinear, ``align_corners=False``), what mIoU is computed on."""
        logits = self.forward(x)["out"]
        return F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """The backbone's exempt parameters (LayerScale), under their names in the segmentor."""
        fn = getattr(self.backbone, "no_weight_decay", None)
        return {f"backbone.{n}" for n in fn()} if callable(fn) else set()


def create_segmentor(head: str, backbone: str, num_classes: int = 150, **kwargs: Any) -> Segmentor:
    """Build a segmentor; ``drop_path_rate`` defaults to Table 10's value for the pair (0 for other backbones)."""
    kwargs.setdefault("drop_path_rate", DROP_PATH_SEG.get((head, backbone), 0.0))
    return Segmentor(backbone, head, num_classes, **kwargs)
