"""Detectors on the InceptionNeXt backbone: torchvision's Mask R-CNN, Faster R-CNN and RetinaNet with an FPN.

The backbone is the classification model in features-only mode (the stage maps at strides 4/8/16/32), so an ImageNet
checkpoint loads into it unchanged, with a fresh norm on each stage output as the segmentors of Sec. 4.2 have, and
torchvision's ``FeaturePyramidNetwork`` (256 channels) on top. The layout follows the mmdet configs that ConvNeXt and
Swin publish their COCO numbers with (facebookresearch/ConvNeXt ``object_detection/configs/_base_/models/
mask_rcnn_convnext_fpn.py``; mmdet v2 ``configs/_base_/models/retinanet_r50_fpn.py``):

* R-CNN family: FPN on C2-C5 -> P2-P5, plus P6 by max-pooling P5 (``LastLevelMaxPool``), anchors 32-512 over P2-P6,
  RoIAlign 7x7 (box) and 14x14 (mask) on P2-P5, two 1024-wide FC layers, a 4-conv mask head. torchvision's defaults
  equal mmdet's except the RPN's proposals per image while training (torchvision 2000, mmdet ``rpn_proposal.
  max_per_img=1000``): :func:`create_detector` sets 1000. Left as torchvision has them: RoIAlign ``sampling_ratio=2``
  (mmdet 0, adaptive), smooth-L1 box losses (mmdet L1), K+1-way softmax box classifier (same as mmdet).
* RetinaNet: FPN on C3-C5 -> P3-P5 (mmdet ``start_level=1``), P6 by a stride-2 conv on C5 and P7 on P6 (mmdet
  ``add_extra_convs='on_input'``; torchvision applies a ReLU between P6 and P7, mmdet's RetinaNet config does not:
  same parameters and MACs). Detections per image 100 (mmdet ``test_cfg.max_per_img``; torchvision's default 300).
  Exactly K sigmoid logits per anchor as mmdet's RetinaHead: labels are shifted to 0..K-1 inside the model, so the
  model still takes and returns labels 1..K like the R-CNN models.

Inputs and outputs follow torchvision's detection API: a list of ``[3, H, W]`` float images in 0..1 (normalised by
the model with the backbone's mean/std), targets with ``boxes`` (xyxy pixels), ``labels`` (1..K), ``masks``. In
training the dataset pipeline has already resized and flipped, and :class:`DetectionTransform` only normalises and
pads; in evaluation it resizes to ``min_size``/``max_size`` and the predictions come back in the original image's
pixels.

Complexity (:func:`detector_complexity`) is counted the way the published tables are: mmdet's ``get_flops.py`` at
1280x800, which runs the dense part on the image and the RoI heads on a fixed 1000 proposals (box head) and the first
100 of them (mask head), in :func:`inceptionnext.complexity.count_macs`'s MAC convention (RoIAlign, anchors and NMS
free). With this protocol timm's ConvNeXt-T in the same Mask R-CNN counts 48.10M / 262.3 GMACs against the published
48M / 262G, and torchvision's ResNet-50 Mask R-CNN its documented 44,401,393 parameters (tests/test_det_models.py).
InceptionNeXt-T/S/B Mask R-CNN (80 classes, 1280x800): 44.26M / 256.6 G, 65.57M / 341.7 G, 100.85M / 475.0 G, of
which the RoI heads are 14.3 G (box) + 53.0 G (mask) for every backbone.
"""

from __future__ import annotations

import copy
import difflib
import fnmatch
import inspect
import math
import os
from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torchvision.models.detection import FasterRCNN, MaskRCNN, RetinaNet
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops.feature_pyramid_network import FeaturePyramidNetwork, LastLevelMaxPool, LastLevelP6P7
from torchvision.ops.misc import FrozenBatchNorm2d

from ..complexity import count_macs, count_params
from ..errors import ConfigError
from ..models.metanext import make_norm
from ..models.registry import is_model, list_models
from ..segmentation.segmentor import build_feature_backbone, feature_channels_and_strides

__all__ = [
    "ARCHS",
    "BN_POLICIES",
    "DETECTORS",
    "DROP_PATH_DET",
    "PUBLISHED_DET",
    "DetectionBackbone",
    "DetectionTransform",
    "create_detector",
    "create_named_detector",
    "list_detectors",
    "convert_sync_batchnorm",
    "detector_complexity",
    "complexity_rows",
    "format_complexity_rows",
    "torchvision_maskrcnn_resnet50",
]

MASKRCNN, FASTERRCNN, RETINANET = "maskrcnn", "fasterrcnn", "retinanet"
ARCHS = (MASKRCNN, FASTERRCNN, RETINANET)
BN_POLICIES = ("sync", "frozen", "train")
PYRAMIDS = ("p2-p6", "p3-p7")  # R-CNN family, RetinaNet
STAGE_NORMS = ("batchnorm", "layernorm", None)

# Peak stochastic depth of the backbone. InceptionNeXt shares ConvNeXt's macro design (stage depths 3-3-9-3 / 3-3-27-3,
# widths 96-768 / 128-1024), so it takes ConvNeXt's COCO values (facebookresearch/ConvNeXt, object_detection/configs/
# convnext/): mask_rcnn_convnext_tiny_..._3x_coco_in1k.py 0.4; cascade_mask_rcnn_convnext_{tiny,small,base}_..._3x_
# coco_in1k.py 0.4 / 0.6 / 0.7 (there is no Mask R-CNN config for S/B). Atto keeps its ImageNet value, 0.1 (Table 9).
DROP_PATH_DET: dict[str, float] = {
    "inceptionnext_atto": 0.1,
    "inceptionnext_tiny": 0.4,
    "inceptionnext_small": 0.6,
    "inceptionnext_base": 0.7,
    # the comparison rows with timm's ConvNeXt, same configs
    "convnext_tiny": 0.4,
    "convnext_small": 0.6,
    "convnext_base": 0.7,
}

# Published COCO val2017 Mask R-CNN 3x (multi-scale training) figures of the peers. "FLOPs" there are mmcv's
# multiply-accumulates from mmdet's get_flops.py at 1280x800, the convention of detector_complexity's "macs".
# ConvNeXt-T: ConvNeXt paper Table 3 and facebookresearch/ConvNeXt object_detection/README.md. Swin-T: the Swin-T row
# of the same Table 3 and SwinTransformer/Swin-Transformer-Object-Detection README.md ("Mask R-CNN, ImageNet-1K, 3x").
PUBLISHED_DET: dict[str, dict[str, Any]] = {
    "convnext_tiny": dict(
        label="ConvNeXt-T", arch=MASKRCNN, schedule="3x", box_ap=46.2, mask_ap=41.7, params_m="48", macs_g="262",
        source="ConvNeXt paper Table 3; facebookresearch/ConvNeXt object_detection/README.md",
    ),
    "swin_tiny": dict(
        label="Swin-T", arch=MASKRCNN, schedule="3x", box_ap=46.0, mask_ap=41.6, params_m="48", macs_g="267",
        source="ConvNeXt paper Table 3 (Swin-T row); SwinTransformer/Swin-Transformer-Object-Detection README.md",
    ),
}  # fmt: skip

# mmdet's get_flops.py protocol (TwoStageDetector.forward_dummy): the box head runs on 1000 proposals (test_cfg.rpn.
# max_per_img), the mask head on the first 100 (test_cfg.rcnn.max_per_img).
COUNTED_PROPOSALS = 1000
COUNTED_DETECTIONS = 100


def _is_bn(module: nn.Module) -> bool:
    return isinstance(module, _BatchNorm)  # BatchNorm2d and the SyncBatchNorm that DDP conversion puts in its place


class DetectionBackbone(nn.Module):
    """MetaNeXt features -> per-stage norm -> FPN; returns the pyramid as an ordered dict of 256-channel maps.

    Args:
        name: a backbone of this package (``inceptionnext_tiny``, ...) or a timm name (``convnext_tiny``) for
            comparison rows.
        pyramid: ``"p2-p6"`` (R-CNN family: C2-C5 into the FPN, P6 by max pooling; maps ``"0"``-``"3"`` and
            ``"pool"`` as torchvision's RoI pooling expects) or ``"p3-p7"`` (RetinaNet: C3-C5, P6/P7 by stride-2
            convs on C5).
        out_channels: FPN width (256 in every published config).
        drop_path_rate: peak stochastic depth of the backbone.
        stage_norm: ``"batchnorm"`` (default), ``"layernorm"`` or ``None``: a fresh norm on each stage output that
            enters the FPN. InceptionNeXt's stage outputs are residual streams that no norm follows (in the
            classifier the next norm sits in the downsampling layer or the head); the authors add a SyncBN there for
            dense tasks (sail-sg/inceptionnext issues #10, #11), and ConvNeXt's detection backbone a LayerNorm
            (use ``"layernorm"`` for the timm ConvNeXt rows).
        bn: what the backbone's BatchNorm layers do while the detector trains:

            * ``"sync"`` (default): they train, and the engine converts them (with the stage norms) to
              ``SyncBatchNorm`` under DDP on CUDA (:func:`convert_sync_batchnorm`), so the batch statistics cover
              every GPU's images: 16 images of ~1333x800 in the COCO recipes (8 GPUs x 2). The default because it
              is the authors' choice for dense tasks (SyncBN in the backbone for segmentation), because the released
              running statistics were collected on 224x224 ImageNet crops rather than full COCO images, and
              because the stage norms are new and have no statistics to keep. With one process it is plain BN on
              the images of one GPU: 2 images per GPU make per-GPU statistics noisy, so use ``"frozen"`` to
              fine-tune a pretrained backbone on a single GPU.
            * ``"frozen"``: mmdet's ``norm_eval=True``: the backbone's BN layers stay in eval mode and keep their
              running statistics even while the model trains; their affine parameters still train. Only for a
              pretrained backbone (a random one has no statistics worth keeping). The fresh stage norms are not
              frozen: they have nothing to freeze and behave as under ``"sync"``.
            * ``"train"``: plain BN with per-process batch statistics, never converted (CPU runs, ablations).
        pretrained: load the released ImageNet-1K weights into the backbone.
        checkpoint: load this ImageNet classification checkpoint into the backbone instead (its head keys are
            ignored; read with the package's safe loader).
    """

    def __init__(
        self,
        name: str = "inceptionnext_tiny",
        *,
        pyramid: str = "p2-p6",
        out_channels: int = 256,
        drop_path_rate: float = 0.0,
        stage_norm: str | None = "batchnorm",
        bn: str = "sync",
        pretrained: bool = False,
        checkpoint: str | os.PathLike | None = None,
    ) -> None:
        super().__init__()
        if pyramid not in PYRAMIDS:
            raise ConfigError(f"unknown pyramid {pyramid!r}: use one of {PYRAMIDS}")
        if bn not in BN_POLICIES:
            raise ConfigError(f"unknown BatchNorm policy bn={bn!r}: use one of {BN_POLICIES}")
        if stage_norm not in STAGE_NORMS:
            raise ConfigError(f"unknown stage_norm {stage_norm!r}: use 'batchnorm', 'layernorm' or None")
        _check_backbone_name(name)
        self.name, self.pyramid, self.bn, self.stage_norm = name, pyramid, bn, stage_norm
        self.body = build_feature_backbone(
            name, drop_path_rate=drop_path_rate, pretrained=pretrained, checkpoint=checkpoint
        )
        channels, strides = feature_channels_and_strides(self.body)
        # RetinaNet starts at C3 (mmdet start_level=1); C2 is still computed, as the input of stage 2
        self.levels = list(range(len(channels)))[1 if pyramid == "p3-p7" else 0 :]
        self.feature_channels = [channels[i] for i in self.levels]
        self.feature_strides = [strides[i] for i in self.levels]
        self.stage_norms = nn.ModuleList(
            make_norm(stage_norm, c) if stage_norm is not None else nn.Identity() for c in self.feature_channels
        )
        if pyramid == "p2-p6":
            extra: nn.Module = LastLevelMaxPool()
        else:
            extra = LastLevelP6P7(self.feature_channels[-1], out_channels)
            extra.use_P5 = False  # P6 from C5 ("on_input") even where C5 happens to have out_channels channels
        self.fpn = FeaturePyramidNetwork(self.feature_channels, out_channels, extra_blocks=extra)
        self.out_channels = out_channels
        cfg = getattr(self.body, "pretrained_cfg", None) or {}
        self.image_mean = list(cfg.get("mean", (0.485, 0.456, 0.406)))
        self.image_std = list(cfg.get("std", (0.229, 0.224, 0.225)))

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        if self.channels_last:  # the batch torchvision's transform built is NCHW; the whole pyramid follows x
            x = x.contiguous(memory_format=torch.channels_last)
        feats = self.body(x)
        if getattr(self.body, "output_fmt", "NCHW") == "NHWC":  # timm's channels-last models (Swin, ...)
            feats = [f.permute(0, 3, 1, 2) for f in feats]
        inputs = OrderedDict((str(j), norm(feats[i])) for j, (i, norm) in enumerate(zip(self.levels, self.stage_norms)))
        return self.fpn(inputs)

    #: run on channels-last tensors (set by :func:`use_channels_last`): on CPU the convolutions' backward is about
    #: 1.6x faster than in NCHW for the digits detector (measured: 8.1 -> 5.1 s per step of 4 images, same machine)
    channels_last = False

    def train(self, mode: bool = True) -> DetectionBackbone:
        super().train(mode)
        if mode and self.bn == "frozen":
            for m in self.body.modules():
                if _is_bn(m):
                    m.eval()
        return self

    def no_weight_decay(self) -> set[str]:
        """The backbone's exempt parameters (LayerScale), under their names in this module."""
        fn = getattr(self.body, "no_weight_decay", None)
        return {f"body.{n}" for n in fn()} if callable(fn) else set()


class DetectionTransform(GeneralizedRCNNTransform):
    """torchvision's detection transform, resizing only in evaluation.

    In training the dataset pipeline has resized (keep ratio, multi-scale) and flipped the images and their targets,
    so this only normalises with the backbone's mean/std and pads the batch to a multiple of ``size_divisible``. In
    eval mode it also resizes so that the short side is ``min_size`` and the long side at most ``max_size`` (mmdet's
    1333x800 test scale), and ``postprocess`` maps boxes and masks back to each original image.
    """

    def resize(
        self, image: torch.Tensor, target: dict[str, torch.Tensor] | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor] | None]:
        if self.training:
            return image, target
        return super().resize(image, target)


class _DetectorMixin:
    """What the training engine asks of a model, shared by the three detectors, and the check of target labels."""

    arch: str
    num_classes: int
    backbone: DetectionBackbone

    @property
    def bn_policy(self) -> str:
        return self.backbone.bn

    def no_weight_decay(self) -> set[str]:
        return {f"backbone.{n}" for n in self.backbone.no_weight_decay()}

    def forward(self, images: list[torch.Tensor], targets: list[dict[str, torch.Tensor]] | None = None) -> Any:
        if targets is not None:
            for i, t in enumerate(targets):
                labels = t["labels"]
                if labels.numel() and (int(labels.min()) < 1 or int(labels.max()) > self.num_classes):
                    raise ConfigError(
                        f"target {i} has labels {int(labels.min())}..{int(labels.max())}, outside 1..{self.num_classes}"
                        f" (0 is background): build the model with num_classes equal to the dataset's categories"
                    )
            targets = self._encode(targets)
        out = super().forward(images, targets)
        return out if self.training else self._decode(out)

    def _encode(self, targets: list[dict[str, torch.Tensor]]) -> list[dict[str, torch.Tensor]]:
        return targets

    def _decode(self, detections: list[dict[str, torch.Tensor]]) -> list[dict[str, torch.Tensor]]:
        return detections


class _MaskRCNN(_DetectorMixin, MaskRCNN):
    pass


class _FasterRCNN(_DetectorMixin, FasterRCNN):
    pass


class _RetinaNet(_DetectorMixin, RetinaNet):
    """RetinaNet with K sigmoid logits per anchor for labels 1..K.

    torchvision's RetinaNet one-hot encodes the label as the logit index, so labels 1..K would need K+1 logits, one
    of them never positive (9 x 2,305 = 20,745 dead parameters and 0.44 GMACs at 1280x800); mmdet's
    RetinaHead has K. The labels are shifted to 0..K-1 on the way in and back on the way out.
    """

    def _encode(self, targets: list[dict[str, torch.Tensor]]) -> list[dict[str, torch.Tensor]]:
        return [{**t, "labels": t["labels"] - 1} for t in targets]

    def _decode(self, detections: list[dict[str, torch.Tensor]]) -> list[dict[str, torch.Tensor]]:
        return [{**d, "labels": d["labels"] + 1} for d in detections]


_CLASSES: dict[str, type[nn.Module]] = {MASKRCNN: _MaskRCNN, FASTERRCNN: _FasterRCNN, RETINANET: _RetinaNet}
# keyword arguments create_detector sets itself, or that would bypass the backbone's transform and layout
_RESERVED = {"self", "backbone", "num_classes", "min_size", "max_size", "image_mean", "image_std", "kwargs"}
_TRANSFORM_KWARGS = ("size_divisible",)


def _check_backbone_name(name: str) -> None:
    if is_model(name):
        return
    import timm

    if timm.is_model(name.split(".")[0]):
        return
    close = difflib.get_close_matches(name, list_models() + list(DROP_PATH_DET), n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    raise ConfigError(f"unknown backbone {name!r}: use a name of inceptionnext.list_models() or of timm{hint}")


def _with_hint(name: str, known: Iterable[str]) -> str:
    close = difflib.get_close_matches(name, list(known), n=1)
    return f"{name} (did you mean {close[0]}?)" if close else name


def _detector_kwargs(arch: str) -> set[str]:
    params = inspect.signature(_CLASSES[arch].__init__).parameters
    return {n for n in params if n not in _RESERVED} | set(_TRANSFORM_KWARGS)


def create_detector(
    arch: str,
    backbone: str = "inceptionnext_tiny",
    num_classes: int = 80,
    *,
    pretrained_backbone: bool = False,
    backbone_checkpoint: str | os.PathLike | None = None,
    drop_path_rate: float | None = None,
    stage_norm: str | None = "batchnorm",
    bn: str = "sync",
    min_size: int = 800,
    max_size: int = 1333,
    head_channels: int | None = None,
    **kwargs: Any,
) -> nn.Module:
    """Build a torchvision detector on a :class:`DetectionBackbone`.

    Args:
        arch: ``"maskrcnn"``, ``"fasterrcnn"`` or ``"retinanet"``.
        backbone: a backbone name of this package or of timm.
        num_classes: object categories K (80 for COCO); the background class is added where torchvision needs it.
        pretrained_backbone: load the released ImageNet-1K weights into the backbone.
        backbone_checkpoint: load an ImageNet classification checkpoint file into the backbone instead.
        drop_path_rate: peak stochastic depth; ``None`` takes :data:`DROP_PATH_DET` (0 for backbones not listed).
        stage_norm: the fresh norm on each stage output (see :class:`DetectionBackbone`).
        bn: the BatchNorm policy, ``"sync"`` (default), ``"frozen"`` or ``"train"`` (see :class:`DetectionBackbone`).
        min_size, max_size: the evaluation scale (short side, long-side cap), mmdet's 800/1333 by default.
        head_channels: ``None`` keeps the published widths (FPN 256, box head 1024, mask head 256); a smaller width
            ``c`` scales them for small problems: FPN ``c``, box head ``4c``, mask head ``c`` (RetinaNet: its
            subnets run at the FPN width). Only the embedded CPU default uses it.
        **kwargs: the torchvision class's own arguments (``box_score_thresh``, ``rpn_post_nms_top_n_train``,
            ``rpn_anchor_generator``, ``detections_per_img``, ...) and ``size_divisible``; a name the class does not
            take raises :class:`ConfigError` (torchvision would ignore it silently).
    """
    if arch not in ARCHS:
        close = difflib.get_close_matches(str(arch), ARCHS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"unknown detector {arch!r}: use one of {ARCHS}{hint}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ConfigError(f"num_classes must be a positive number of object categories, got {num_classes!r}")
    if not (isinstance(min_size, int) and isinstance(max_size, int) and 0 < min_size <= max_size):
        raise ConfigError(f"need 0 < min_size <= max_size (integers), got min_size={min_size!r}, max_size={max_size!r}")
    if drop_path_rate is None:
        drop_path_rate = DROP_PATH_DET.get(backbone, 0.0)
    if not 0.0 <= drop_path_rate < 1.0:
        raise ConfigError(f"drop_path_rate must be in [0, 1), got {drop_path_rate}")
    if pretrained_backbone and backbone_checkpoint is not None:
        raise ConfigError("give pretrained_backbone or backbone_checkpoint, not both")
    allowed = _detector_kwargs(arch)
    unknown = sorted(set(kwargs) - allowed)
    if unknown:
        hints = [_with_hint(u, allowed) for u in unknown]
        raise ConfigError(f"{arch} does not take {', '.join(hints)}")

    if head_channels is not None and (not isinstance(head_channels, int) or head_channels < 8):
        raise ConfigError(
            f"head_channels must be an integer >= 8 (or None for the published widths), got {head_channels!r}"
        )
    body = DetectionBackbone(
        backbone,
        pyramid="p3-p7" if arch == RETINANET else "p2-p6",
        drop_path_rate=drop_path_rate,
        stage_norm=stage_norm,
        bn=bn,
        pretrained=pretrained_backbone,
        checkpoint=backbone_checkpoint,
        out_channels=head_channels or 256,
    )
    if head_channels is not None and arch != RETINANET:
        kwargs.update(_narrow_heads(arch, head_channels, num_classes + 1, kwargs))
    transform_kwargs = {k: kwargs.pop(k) for k in _TRANSFORM_KWARGS if k in kwargs}
    if arch == RETINANET:
        kwargs.setdefault("detections_per_img", 100)  # mmdet retinanet_r50_fpn.py test_cfg.max_per_img
        classes = num_classes  # sigmoid logits, labels shifted to 0..K-1 (_RetinaNet)
    else:
        kwargs.setdefault("rpn_post_nms_top_n_train", 1000)  # mmdet train_cfg.rpn_proposal.max_per_img
        classes = num_classes + 1  # softmax over K categories + background (label 0)
    model = _CLASSES[arch](
        body, num_classes=None if "box_predictor" in kwargs else classes, min_size=min_size, max_size=max_size,
        image_mean=body.image_mean, image_std=body.image_std, **kwargs,
    )  # fmt: skip
    model.transform = DetectionTransform(min_size, max_size, body.image_mean, body.image_std, **transform_kwargs)
    model.arch, model.backbone_name, model.num_classes = arch, backbone, num_classes
    return model


def _narrow_heads(arch: str, c: int, classes: int, given: dict[str, Any]) -> dict[str, Any]:
    """torchvision's R-CNN heads at width ``c`` (box head ``4c``, mask head ``c``), for what ``given`` leaves unset."""
    from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
    from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor

    heads: dict[str, Any] = {}
    if "box_head" not in given and "box_predictor" not in given:
        heads["box_head"] = TwoMLPHead(c * 7 * 7, 4 * c)  # 7x7 RoIAlign output, as torchvision's default
        heads["box_predictor"] = FastRCNNPredictor(4 * c, classes)
    if arch == MASKRCNN and "mask_head" not in given and "mask_predictor" not in given:
        heads["mask_head"] = MaskRCNNHeads(c, [c] * 4, 1)
        heads["mask_predictor"] = MaskRCNNPredictor(c, c, classes)
    return heads


# ------------------------------------------------------------------------------------------------- named builders

DETECTORS: dict[str, Callable[..., nn.Module]] = {}


def _register(arch: str, backbone: str, **defaults: Any) -> None:
    name = f"{arch}_{backbone}_fpn"
    if name in DETECTORS:
        raise ValueError(f"detector {name!r} registered twice")

    def builder(**kwargs: Any) -> nn.Module:
        return create_detector(arch, backbone, **{**defaults, **kwargs})

    builder.__name__ = builder.__qualname__ = name
    builder.__doc__ = f"{arch} with an FPN on {backbone} (keyword arguments as create_detector's)."
    DETECTORS[name] = builder


for _arch in ARCHS:
    for _size in ("atto", "tiny", "small", "base"):
        _register(_arch, f"inceptionnext_{_size}")
    for _size in ("tiny", "small", "base"):  # comparison rows: ConvNeXt's detection backbone norms each output (LN)
        _register(_arch, f"convnext_{_size}", stage_norm="layernorm")


def list_detectors(pattern: str | None = None) -> list[str]:
    """Registered detector names, optionally filtered by a shell pattern (``"maskrcnn_*"``)."""
    names = sorted(DETECTORS)
    return names if pattern is None else [n for n in names if fnmatch.fnmatch(n, pattern)]


def create_named_detector(name: str, **kwargs: Any) -> nn.Module:
    """Build a registered detector (``maskrcnn_inceptionnext_tiny_fpn``, ...); keyword arguments as
    :func:`create_detector`'s."""
    if name not in DETECTORS:
        close = difflib.get_close_matches(name, DETECTORS, n=3, cutoff=0.5)
        hint = f"; did you mean {', '.join(close)}?" if close else f"; known: {', '.join(list_detectors())}"
        raise ConfigError(f"unknown detector {name!r}{hint}")
    return DETECTORS[name](**kwargs)


def use_channels_last(model: nn.Module, enable: bool = True) -> nn.Module:
    """Parameters and the backbone's input in channels-last memory format (in place; returns ``model``)."""
    model.to(memory_format=torch.channels_last if enable else torch.contiguous_format)
    for m in model.modules():
        if isinstance(m, DetectionBackbone):
            m.channels_last = enable
    return model


def convert_sync_batchnorm(model: nn.Module) -> nn.Module:
    """What the engine calls under DDP on CUDA: BN -> SyncBN unless the model's policy is ``"train"``.

    Under ``"frozen"`` the converted backbone layers stay in eval mode (the policy is applied in ``train()``), and
    the fresh stage norms synchronise.
    """
    if getattr(model, "bn_policy", "sync") == "train":
        return model
    return nn.SyncBatchNorm.convert_sync_batchnorm(model)


# ---------------------------------------------------------------------------------------------------- complexity


class _Dense(nn.Module):
    """The part that runs on the whole image: backbone, FPN and the RPN head (R-CNN) or the RetinaNet head."""

    def __init__(self, detector: nn.Module) -> None:
        super().__init__()
        self.detector = detector

    def forward(self, x: torch.Tensor) -> Any:
        feats = self.detector.backbone(x)
        feats = list(feats.values()) if isinstance(feats, dict) else [feats]
        head = self.detector.rpn.head if hasattr(self.detector, "rpn") else self.detector.head
        return head(feats)


class _RoIHead(nn.Module):
    """A head and its predictor on ``rois`` pooled RoI features, fed as one ``[1, rois*C, h, w]`` tensor."""

    def __init__(self, head: nn.Module, predictor: nn.Module, rois: int) -> None:
        super().__init__()
        self.head, self.predictor, self.rois = head, predictor, rois

    def forward(self, x: torch.Tensor) -> Any:
        return self.predictor(self.head(x.view(self.rois, -1, *x.shape[-2:])))


def _pool_size(pool: nn.Module) -> tuple[int, int]:
    size = pool.output_size
    return (size, size) if isinstance(size, int) else tuple(size)


def _macs(module: nn.Module, input_size: tuple[int, int, int]) -> int:
    """:func:`count_macs`, with torchvision's FrozenBatchNorm2d (ResNet backbones) charged as the package charges an
    eval BatchNorm (2 per element), which the package counter does not know."""
    frozen = 0

    def hook(mod: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        nonlocal frozen
        frozen += 2 * output.numel()

    handles = [m.register_forward_hook(hook) for m in module.modules() if isinstance(m, FrozenBatchNorm2d)]
    try:
        return count_macs(module, input_size) + frozen
    finally:
        for h in handles:
            h.remove()


def detector_complexity(model: nn.Module, size: tuple[int, int] = (800, 1280)) -> dict[str, Any]:
    """Parameters and inference MACs of one image of ``size`` (H, W), as mmdet's ``get_flops.py`` counts them.

    The dense part (backbone, stage norms, FPN, RPN head or RetinaNet head) runs on the image padded to the
    transform's ``size_divisible``; the R-CNN box head and predictor on :data:`COUNTED_PROPOSALS` (1000) pooled RoIs
    and the mask head on :data:`COUNTED_DETECTIONS` (100), the fixed numbers of mmdet's ``forward_dummy``. RoIAlign,
    anchors, box decoding, NMS and mask pasting are not counted (mmcv's counter does not see them either). MACs
    follow :func:`inceptionnext.complexity.count_macs` (convs and linears; BN 2, LN 5 per element). Counting runs on
    the ``meta`` device (a meta copy of a model that is not there already), so it is fast and allocates nothing.

    Returns ``params`` (every parameter of the model as built), ``macs`` (the total) and its parts ``dense_macs``,
    ``box_macs``, ``mask_macs``, with ``size``, ``proposals`` and ``detections``.
    """
    params = count_params(model)
    first = next(model.parameters())
    meta = model if first.device.type == "meta" else copy.deepcopy(model).to("meta")
    div = getattr(meta.transform, "size_divisible", 32)
    h, w = (math.ceil(s / div) * div for s in size)
    dense = _macs(_Dense(meta), (3, h, w))
    box = mask = 0
    roi = getattr(meta, "roi_heads", None)
    if roi is not None:
        c = meta.backbone.out_channels
        ph, pw = _pool_size(roi.box_roi_pool)
        box = _macs(_RoIHead(roi.box_head, roi.box_predictor, COUNTED_PROPOSALS), (COUNTED_PROPOSALS * c, ph, pw))
        if roi.has_mask():
            mh, mw = _pool_size(roi.mask_roi_pool)
            head = _RoIHead(roi.mask_head, roi.mask_predictor, COUNTED_DETECTIONS)
            mask = _macs(head, (COUNTED_DETECTIONS * c, mh, mw))
    return dict(
        params=params, macs=dense + box + mask, dense_macs=dense, box_macs=box, mask_macs=mask, size=tuple(size),
        proposals=COUNTED_PROPOSALS if roi is not None else 0, detections=COUNTED_DETECTIONS if mask else 0,
    )  # fmt: skip


def torchvision_maskrcnn_resnet50() -> nn.Module:
    """torchvision's ``maskrcnn_resnet50_fpn`` as its COCO weights are built (FrozenBatchNorm2d, 3 trainable stages,
    91 classes), without downloading them: the model its documented 44,401,393 parameters belong to. (Built with
    ``weights=None`` torchvision would use trainable BatchNorm2d, whose affine parameters add 53,120.)"""
    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone

    body = resnet_fpn_backbone(backbone_name="resnet50", weights=None, norm_layer=FrozenBatchNorm2d, trainable_layers=3)
    return MaskRCNN(body, num_classes=91)


def complexity_rows(
    names: Iterable[str] = ("maskrcnn_inceptionnext_tiny_fpn", "maskrcnn_inceptionnext_small_fpn",
                            "maskrcnn_inceptionnext_base_fpn", "maskrcnn_convnext_tiny_fpn"),
    size: tuple[int, int] = (800, 1280),
    num_classes: int = 80,
    calibration: bool = True,
) -> list[dict[str, Any]]:  # fmt: skip
    """The params/MACs table of docs/detection.md: named detectors counted on the meta device, then (with
    ``calibration``) torchvision's ResNet-50 Mask R-CNN (:func:`torchvision_maskrcnn_resnet50`) counted the same way
    (its documented parameter count checks the parameter side), then :data:`PUBLISHED_DET` as printed."""
    rows = []
    for name in names:
        with torch.device("meta"):
            model = create_named_detector(name, num_classes=num_classes)
        rows.append(dict(name=name, **detector_complexity(model, size), published=None))
    if calibration:
        with torch.device("meta"):
            model = torchvision_maskrcnn_resnet50()
        rows.append(dict(name="torchvision maskrcnn_resnet50_fpn", **detector_complexity(model, size), published=None))
    for pub in PUBLISHED_DET.values():
        rows.append(dict(name=f"{pub['label']} {pub['arch']} {pub['schedule']} (published)", published=pub))
    return rows


def format_complexity_rows(rows: Iterable[dict[str, Any]]) -> str:
    """A markdown table of :func:`complexity_rows`."""
    lines = [
        "| detector | params (M) | GMACs | dense | box head | mask head |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        pub = r.get("published")
        if pub is not None:
            lines.append(f"| {r['name']} | {pub['params_m']} | {pub['macs_g']} | | | |")
            continue
        lines.append(
            f"| {r['name']} | {r['params'] / 1e6:.2f} | {r['macs'] / 1e9:.1f} | {r['dense_macs'] / 1e9:.1f} | "
            f"{r['box_macs'] / 1e9:.1f} | {r['mask_macs'] / 1e9:.1f} |"
        )
    return "\n".join(lines)
