"""Detection run configuration: defaults < recipe (``inceptionnext/detection/recipes``) < flags.

The defaults are the Mask R-CNN 1x recipe of the peer configs (Swin-T, mmdet 2.x), scaled to nothing: a recipe sets
the model and the data; ``--dry-run`` prints what a run would use. Every value the COCO recipes take from a public
config says which one next to it, in the YAML file.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from ..engine.config import (
    AMP_MODES,
    BatchScaledConfig,
    check_choice,
    check_positive,
    check_range,
    config_field,
    task_config,
)
from ..errors import ConfigError

__all__ = ["ARCHS", "BN_POLICIES", "DET_RECIPES", "OPTIMIZERS", "DetConfig", "PIPELINES", "resolve_det_config"]

DET_RECIPES = "inceptionnext.detection.recipes"
#: torchvision detectors on the MetaNeXt backbone + FPN
ARCHS = ("maskrcnn", "fasterrcnn", "retinanet")
#: BatchNorm of the backbone: batch statistics synced over processes, frozen statistics (mmdet's norm_eval), or
#: plain per-process batch statistics
BN_POLICIES = ("sync", "frozen", "train")
#: training pipelines: one scale (mmdet's coco_instance), or the multi-scale + crop policy of the Swin/ConvNeXt
#: "mstrain 480-800" configs
PIPELINES = ("single", "mstrain")
#: no weight decay on: norms, biases and LayerScale (timm's rule, ConvNeXt's constructor: every 1-d parameter), norm
#: layers only (Swin's paramwise_cfg), or nothing (mmdet's default optimizer constructor, its SGD configs)
NO_DECAY = ("1d", "norms", "none")
#: the optimizers of the public detection configs: AdamW (Swin, ConvNeXt) and SGD with momentum (mmdet's RetinaNet)
OPTIMIZERS = ("adamw", "sgd")

_f = config_field


@dataclass
class DetConfig(BatchScaledConfig):
    """Every knob of a detection run. Field names are the YAML keys; ``--field-name`` the flags."""

    # model
    arch: str = _f("maskrcnn", "detector", choices=ARCHS)
    backbone: str = _f("inceptionnext_tiny", "backbone model name")
    pretrained: bool = _f(False, "initialise the backbone from the released ImageNet-1K weights")
    backbone_checkpoint: str | None = _f(None, "initialise the backbone from this classification checkpoint")
    drop_path: float | None = _f(None, "backbone stochastic depth (null: the backbone's default for detection)")
    stage_norm: str | None = _f("batchnorm", "norm on each backbone stage output: batchnorm | layernorm | none")
    bn: str = _f("sync", "backbone BatchNorm: sync (SyncBN under DDP), frozen (norm_eval), train", choices=BN_POLICIES)
    head_channels: int | None = _f(
        None, "width of FPN and heads (null: the published 256 / 1024 / 256); smaller for small problems"
    )
    anchor_sizes: list | None = _f(
        None, "R-CNN anchor size per pyramid level P2-P6 (null: torchvision's and mmdet's 32 64 128 256 512)"
    )
    rpn_batch_size: int = _f(256, "anchors sampled per image for the RPN loss (mmdet and torchvision: 256)")
    roi_batch_size: int = _f(
        512, "proposals sampled per image for the box and mask losses (mmdet and torchvision: 512)"
    )
    rpn_pre_nms_train: int = _f(
        2000, "training: RPN proposals per pyramid level kept before NMS (mmdet train_cfg.rpn_proposal.nms_pre)"
    )
    rpn_post_nms_train: int = _f(
        1000, "training: RPN proposals per image kept after NMS (mmdet train_cfg.rpn_proposal.max_per_img)"
    )
    min_size: int = _f(800, "evaluation: resize the short side to this (keeping the ratio)")
    max_size: int = _f(1333, "evaluation: ... with the long side at most this")
    # data
    data: str | None = _f(None, "COCO root (annotations/instances_{train,val}2017.json); default: embedded composites")
    workers: int = _f(2, "data loading processes per training process")
    fresh_composites: bool = _f(
        True, "embedded data only: draw new training composites every epoch (false: the same ones each epoch)"
    )
    pipeline: str = _f("mstrain", "training augmentation", choices=PIPELINES)
    scale: list = _f([1333, 800], "training scale (long short) of the single-scale pipeline")
    short_sides: list = _f(
        [480, 512, 544, 576, 608, 640, 672, 704, 736, 768, 800], "mstrain: short sides to choose from"
    )
    crop_short_sides: list = _f([400, 500, 600], "mstrain crop policy: short sides before the crop")
    crop_size: list = _f([384, 600], "mstrain crop policy: crop height and width range (absolute_range)")
    flip: float = _f(0.5, "horizontal flip probability")
    # optimisation
    epochs: int = _f(12, "training epochs")
    batch_size: int = _f(2, "images per process and step")
    optimizer: str = _f("adamw", "optimizer: adamw or sgd (with momentum)", choices=OPTIMIZERS)
    lr: float = _f(1e-4, "peak learning rate for a global batch of lr_base_batch")
    lr_base_batch: int = _f(16, "global batch the lr is given for; scaled linearly to the effective batch")
    weight_decay: float = _f(0.05, "weight decay (AdamW: decoupled; SGD: L2)")
    no_decay: str = _f(
        "norms", "parameters without weight decay: 1d (norms, biases, LayerScale), norms, or none", choices=NO_DECAY
    )
    layer_decay: float | None = _f(None, "layer-wise lr decay of the backbone (ConvNeXt's 3x config: 0.95)")
    layer_decay_layers: int = _f(6, "layer-wise decay: the number of backbone layer groups (ConvNeXt: 6)")
    betas: list = _f([0.9, 0.999], "AdamW betas")
    momentum: float = _f(0.9, "SGD momentum")
    fused_optimizer: bool = _f(True, "torch's one-kernel AdamW / SGD update where the device has it")
    warmup_iters: int = _f(500, "linear warm-up steps")
    warmup_ratio: float = _f(0.001, "warm-up starts at lr x warmup_ratio")
    lr_steps: list = _f([8, 11], "epochs after which the lr is multiplied by lr_gamma")
    lr_gamma: float = _f(0.1, "step decay factor")
    clip_grad: float | None = _f(None, "gradient norm clipping (null: off)")
    # evaluation
    eval_interval: int = _f(1, "epochs between evaluations (the last epoch is always evaluated)")
    # runtime
    amp: str = _f("auto", "mixed precision (auto: bf16 on CUDA when supported; CPU runs fp32)", choices=AMP_MODES)
    channels_last: bool = _f(True, "channels-last memory format for the detector (faster on CPU and CUDA)")
    fused_mixer: bool = _f(
        False, "run the backbone's Inception mixers with the fused Triton kernel (CUDA; opt-in until measured)"
    )
    seed: int = _f(0, "seed of everything")
    output: str = _f("output/detect", "directory for checkpoints, config, logs and plots")
    log_interval: int = _f(20, "steps between loss checks and progress updates")
    recipe: str | None = _f(None, "name of the recipe the run started from", cli=False)
    notes: str = _f("", "where the recipe departs from its sources", cli=False)


def resolve_det_config(recipe: str | os.PathLike | None = None, overrides: dict[str, Any] | None = None) -> DetConfig:
    cfg = task_config(DetConfig, DET_RECIPES, recipe, overrides, nullable=("stage_norm",))
    check_choice(cfg, "arch", "bn", "pipeline", "no_decay", "optimizer", "amp")
    check_positive(cfg, "epochs", "batch_size", "lr_base_batch", "log_interval", "eval_interval", "min_size")
    check_positive(cfg, "max_size", "layer_decay_layers", "rpn_batch_size", "roi_batch_size")
    check_positive(cfg, "rpn_pre_nms_train", "rpn_post_nms_train")
    check_range(cfg, "lr", low=0.0, low_open=True)
    check_range(cfg, "weight_decay", "warmup_ratio", "lr_gamma", low=0.0)
    check_range(cfg, "momentum", low=0.0, high=1.0, high_open=True)
    check_range(cfg, "warmup_iters", "workers", low=0)
    check_range(cfg, "flip", low=0.0, high=1.0)
    if cfg.drop_path is not None:
        check_range(cfg, "drop_path", low=0.0, high=1.0, high_open=True)
    if cfg.layer_decay is not None:
        check_range(cfg, "layer_decay", low=0.0, high=1.0, low_open=True)
    if cfg.bn == "frozen" and not (cfg.pretrained or cfg.backbone_checkpoint):
        raise ConfigError(
            "bn: frozen keeps the backbone's BatchNorm statistics, and a randomly initialised backbone has none worth "
            "keeping: give --pretrained or --backbone-checkpoint FILE, or use --bn sync / train"
        )
    if cfg.anchor_sizes is not None:
        if cfg.arch == "retinanet":
            raise ConfigError("anchor_sizes sets the R-CNN anchors (one per level P2-P6); RetinaNet keeps its own")
        if len(cfg.anchor_sizes) != 5 or not all(isinstance(a, int) and a > 0 for a in cfg.anchor_sizes):
            raise ConfigError(f"anchor_sizes needs 5 positive integers (P2-P6), got {cfg.anchor_sizes}")
    return cfg
