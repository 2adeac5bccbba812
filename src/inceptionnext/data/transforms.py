"""Train and eval transforms through timm's data pipeline."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import torch
from PIL import Image, ImageOps
from timm.data import create_transform
from timm.data.random_erasing import RandomErasing

from ..models.pretrained import resolve_data_config

__all__ = ["AugmentSettings", "batch_erasing", "build_transform", "eval_preprocessing"]


class AugmentSettings(Protocol):
    """The run settings the transforms read (the training engine's config has them). A protocol, so that the data
    layer does not depend on the engine that uses it."""

    img_size: int
    crop_pct: float | None
    mean: Sequence[float] | None
    std: Sequence[float] | None
    scale: Sequence[float]
    ratio: Sequence[float]
    hflip: float
    color_jitter: float | None
    aa: str | None
    train_interpolation: str
    reprob: float


def eval_preprocessing(cfg: AugmentSettings, model_cfg: Mapping[str, Any]) -> dict[str, Any]:
    """Eval resize/crop/normalisation: the run's config where set, else the model's pretrained config."""
    return resolve_data_config(
        model_cfg,
        dict(
            input_size=(3, cfg.img_size, cfg.img_size),
            crop_pct=cfg.crop_pct,
            mean=cfg.mean or None,  # an empty list means unset, as None does
            std=cfg.std or None,
        ),
    )


def build_transform(cfg: AugmentSettings, model_cfg: Mapping[str, Any], is_training: bool):
    """The per-sample transform: timm's ``create_transform`` with the run's settings. Training leaves random erasing
    out: it is applied to the batch after Mixup/CutMix (:func:`batch_erasing`), where the official runs applied it."""
    pre = eval_preprocessing(cfg, model_cfg)
    if not is_training:
        return create_transform(**pre, is_training=False)
    return _posterize_like_the_official_runs(
        create_transform(
            pre["input_size"],
            is_training=True,
            scale=tuple(cfg.scale),
            ratio=tuple(cfg.ratio),
            hflip=cfg.hflip,
            color_jitter=cfg.color_jitter,  # timm applies it only when auto_augment is off, as in the official runs
            auto_augment=cfg.aa,
            interpolation=cfg.train_interpolation,  # "random": bilinear or bicubic per crop (the official default)
            mean=pre["mean"],
            std=pre["std"],
            re_prob=0.0,  # on the batch, after Mixup: batch_erasing
        )
    )


def batch_erasing(cfg: AugmentSettings, device: torch.device) -> RandomErasing | None:
    """Random erasing (probability ``cfg.reprob``, one region of per-pixel normal noise, as the official runs) for
    normalised training batches, applied after Mixup/CutMix; ``None`` when ``reprob`` is 0.

    This is the order of the official training script (timm's ``train.py``, whose default prefetcher mixes the
    batch in its collate function and then erases each mixed image on the device): an erased region hides both mixed
    images. Each image of the batch is erased or not on its own, from the process's RNG (saved in the checkpoints).
    """
    if cfg.reprob <= 0:
        return None
    return RandomErasing(probability=cfg.reprob, mode="pixel", max_count=1, device=str(device))


def _posterize(img: Image.Image, bits_to_keep: int, **_: Any) -> Image.Image:
    """timm's posterize, with 0 bits kept giving what Pillow gave before it refused 0 (a black image).

    RandAugment's increasing posterize keeps ``4 - int(magnitude / 10 * 4)`` bits: 0 when the noisy magnitude
    (``mstd0.5`` around 9) is clipped at 10, about 2% of its draws. Pillow 9 (the official runs) returned a black image
    then; Pillow >= 10 raises ``ValueError: bits must be between or equal to 1 and 8`` and ends the run in a loader
    worker. timm's own transform, as installed, raises too.
    """
    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)
    return ImageOps.posterize(img, bits_to_keep)


def _posterize_like_the_official_runs(transform: Any) -> Any:
    """Give every posterize op of the RandAugment/AutoAugment policies in ``transform`` :func:`_posterize`."""
    for t in getattr(transform, "transforms", ()):
        # RandAugment.ops: AugmentOps; AutoAugment.policy: lists of AugmentOps
        ops = [*getattr(t, "ops", ()), *(op for sub in getattr(t, "policy", ()) for op in sub)]
        for op in ops:
            if "Posterize" in getattr(op, "name", ""):
                op.aug_fn = _posterize
    return transform
