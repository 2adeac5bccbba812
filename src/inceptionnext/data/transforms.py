"""Train and eval transforms through timm's data pipeline."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from timm.data import create_transform

if TYPE_CHECKING:  # the engine imports this module
    from ..engine.config import TrainConfig

__all__ = ["build_transform", "eval_preprocessing"]


def eval_preprocessing(cfg: TrainConfig, model_cfg: dict[str, Any]) -> dict[str, Any]:
    """Eval resize/crop/normalisation: the run's config where set, else the model's pretrained config."""
    return dict(
        input_size=(3, cfg.img_size, cfg.img_size),
        crop_pct=cfg.crop_pct if cfg.crop_pct is not None else model_cfg["crop_pct"],
        interpolation=model_cfg["interpolation"],
        mean=tuple(cfg.mean or model_cfg["mean"]),
        std=tuple(cfg.std or model_cfg["std"]),
    )


def build_transform(cfg: TrainConfig, model_cfg: dict[str, Any], is_training: bool):
    pre = eval_preprocessing(cfg, model_cfg)
    if not is_training:
        return create_transform(**pre, is_training=False)
    return create_transform(
        pre["input_size"],
        is_training=True,
        scale=tuple(cfg.scale),
        ratio=tuple(cfg.ratio),
        hflip=cfg.hflip,
        color_jitter=cfg.color_jitter,
        auto_augment=cfg.aa,
        interpolation=cfg.train_interpolation,
        mean=pre["mean"],
        std=pre["std"],
        re_prob=cfg.reprob,
        re_mode="pixel",
        re_count=1,
    )
