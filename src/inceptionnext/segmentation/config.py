"""Segmentation run configuration: defaults < recipe (``inceptionnext/segmentation/recipes``) < flags."""

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
from ..engine.optim import NO_DECAY_RULES
from .segmentor import SEG_HEADS

__all__ = ["EVAL_MODES", "HEADS", "SEG_RECIPES", "SegConfig", "resolve_seg_config"]

SEG_RECIPES = "inceptionnext.segmentation.recipes"
#: decode heads: UperNet (Table 6) and Semantic FPN (Table 7), as the segmentor defines them
HEADS = SEG_HEADS
#: evaluation: the whole image at once, or sliding windows
EVAL_MODES = ("whole", "slide")

_f = config_field


@dataclass
class SegConfig(BatchScaledConfig):
    """Every knob of a segmentation run. Field names are the YAML keys; ``--field-name`` the flags."""

    # model
    head: str = _f("upernet", "decode head", choices=HEADS)
    backbone: str = _f("inceptionnext_tiny", "backbone model name")
    pretrained: bool = _f(False, "initialise the backbone from the released ImageNet-1K weights")
    backbone_checkpoint: str | None = _f(None, "initialise the backbone from this classification checkpoint")
    stage_norm: str | None = _f(
        "batchnorm", "norm on each backbone stage output (the authors add SyncBN): batchnorm | layernorm | none"
    )
    drop_path: float = _f(0.2, "backbone stochastic depth (Table 10)")
    head_channels: int | None = _f(None, "width of the head (UperNet 512, FPN 256 when null); smaller for small data")
    # data
    data: str | None = _f(None, "ADEChallengeData2016 root; default: the embedded texture mosaics")
    workers: int = _f(4, "data loading processes per training process")
    crop_size: list = _f([512, 512], "training crop (h w)")
    scale: list = _f([2048, 512], "resize scale (long short) for training (x ratio) and evaluation")
    ratio_range: list = _f([0.5, 2.0], "random rescale ratio range")
    cat_max_ratio: float = _f(0.75, "largest share of one class in a training crop")
    photometric: bool = _f(True, "photometric distortion")
    # optimisation
    iterations: int = _f(160000, "optimizer steps")
    batch_size: int = _f(2, "images per process and step")
    lr: float = _f(6e-5, "peak learning rate for a global batch of lr_base_batch")
    lr_base_batch: int = _f(16, "global batch the lr is given for; scaled linearly to the effective batch")
    weight_decay: float = _f(0.01, "AdamW weight decay, on the parameters no_decay leaves")
    no_decay: str = _f(
        "timm",
        "parameters without weight decay: timm = norms, biases, LayerScale; norms = norm layers only (Swin's UperNet "
        "config); none = decay everything (PoolFormer's FPN config)",
        choices=NO_DECAY_RULES,
    )
    betas: list = _f([0.9, 0.999], "AdamW betas")
    fused_optimizer: bool = _f(True, "torch's one-kernel AdamW update on CPU and CUDA (false: the per-parameter loop)")
    warmup_iters: int = _f(1500, "linear warm-up steps")
    warmup_ratio: float = _f(1e-6, "warm-up starts at lr x warmup_ratio")
    poly_power: float = _f(1.0, "poly decay power")
    min_lr: float = _f(0.0, "poly decay floor")
    # evaluation
    eval_interval: int = _f(16000, "steps between evaluations (and checkpoints)")
    eval_mode: str = _f("whole", "whole image or sliding windows", choices=EVAL_MODES)
    slide_crop: list = _f([512, 512], "sliding-window size (h w)")
    slide_stride: list = _f([341, 341], "sliding-window stride (h w)")
    aug_test: bool = _f(False, "multi-scale (0.5-1.75) + flip evaluation")
    # runtime
    amp: str = _f("auto", "mixed precision (CPU runs fp32)", choices=AMP_MODES)
    fused_mixer: bool = _f(
        False, "run the backbone's Inception mixers with the fused Triton kernel (CUDA; opt-in until measured)"
    )
    seed: int = _f(0, "seed of everything")
    output: str = _f("output/segment", "directory for checkpoints, config, logs and plots")
    log_interval: int = _f(50, "steps between loss checks and progress updates")
    recipe: str | None = _f(None, "name of the recipe the run started from", cli=False)
    notes: str = _f("", "where the recipe departs from other sources", cli=False)


def resolve_seg_config(recipe: str | os.PathLike | None = None, overrides: dict[str, Any] | None = None) -> SegConfig:
    cfg = task_config(SegConfig, SEG_RECIPES, recipe, overrides, nullable=("stage_norm",))
    check_choice(cfg, "head", "eval_mode", "amp", "no_decay")
    check_positive(cfg, "iterations", "batch_size", "eval_interval", "lr_base_batch", "log_interval")
    check_range(cfg, "lr", low=0.0, low_open=True)
    check_range(cfg, "weight_decay", "min_lr", "warmup_ratio", "poly_power", low=0.0)
    check_range(cfg, "warmup_iters", "workers", low=0)
    check_range(cfg, "drop_path", low=0.0, high=1.0, high_open=True)
    return cfg
