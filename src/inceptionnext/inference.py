"""Loading a model for inference with its preprocessing and class names; reading user images robustly.

Preprocessing is resolved in one place, :func:`inceptionnext.models.pretrained.resolve_data_config`: a model's
``pretrained_cfg`` (timm's models included), a training checkpoint's ``eval_preprocessing`` or an exported file's
metadata, with the same defaults everywhere.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import nn

from .checkpoint import extract_state_dict, load_state_dict_checked, read_checkpoint
from .errors import ConfigError, UserError
from .models.factory import create_any_model
from .models.pretrained import HUB_PREFIXES, resolve_data_config

__all__ = [
    "ImageError",
    "LoadedModel",
    "load_model",
    "eval_transform",
    "read_image",
    "find_images",
    "imagenet_class_names",
]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


class ImageError(UserError, ValueError):
    """A file that is not a readable image; batch tools report it and go on with the other files."""


@dataclass
class LoadedModel:
    model: nn.Module
    name: str
    preprocessing: dict[str, Any]
    class_names: list[str] | None = None
    weights: str = "random init"
    train_config: dict[str, Any] | None = None  # set for this package's training checkpoints


def imagenet_class_names() -> list[str]:
    """The 1000 ImageNet-1K class descriptions shipped inside timm (no download)."""
    from timm.data import ImageNetInfo

    info = ImageNetInfo()
    return [info.index_to_description(i) for i in range(info.num_classes())]


def load_model(
    name: str | None = None, checkpoint: str | os.PathLike | None = None, *, pretrained: bool = False,
    use_ema: bool = False,
) -> LoadedModel:  # fmt: skip
    """A model ready for eval, from this package's training checkpoint (which names the model and its classes),
    from ``name`` + a checkpoint file, from released weights (``pretrained``), or a timm/HF model name."""
    obj = read_checkpoint(checkpoint) if checkpoint else None
    if isinstance(obj, dict) and "config" in obj and "class_names" in obj:  # this package's training checkpoint
        cfg = obj["config"]
        name = name or obj["model_name"]
        classes = list(obj["class_names"])
        model = create_any_model(name, num_classes=len(classes), **cfg.get("model_kwargs", {}))
        load_state_dict_checked(model, extract_state_dict(obj, use_ema=use_ema), source=str(checkpoint))
        pre = resolve_data_config(obj["eval_preprocessing"])
        weights = f"{checkpoint} ({'EMA' if use_ema else 'raw'} weights, epoch {obj['epoch'] + 1})"
        return LoadedModel(model.eval(), name, pre, classes, weights, train_config=dict(cfg))
    if name is None:
        raise ConfigError(f"{checkpoint} is not a training checkpoint of this package: name the model (--model)")
    from_hub = name.startswith(HUB_PREFIXES)  # an exported folder always carries its weights
    model = create_any_model(name, pretrained=(pretrained or from_hub) and checkpoint is None)
    if checkpoint:
        load_state_dict_checked(model, extract_state_dict(obj, use_ema=use_ema), source=str(checkpoint))
    cfg = getattr(model, "pretrained_cfg", None) or {}
    pre = resolve_data_config(cfg)
    classes = cfg.get("label_names")
    if classes is None and getattr(model, "num_classes", 0) == 1000:
        classes = imagenet_class_names()
    weights = str(checkpoint) if checkpoint else ("released weights" if pretrained else "random init")
    return LoadedModel(model.eval(), name, pre, list(classes) if classes else None, weights)


def eval_transform(pre: Mapping[str, Any]):
    """timm's eval transform (resize, center crop, normalise) for preprocessing settings; unset keys take the
    defaults of :func:`~inceptionnext.models.pretrained.resolve_data_config`."""
    from timm.data import create_transform

    return create_transform(**resolve_data_config(pre), is_training=False)


def read_image(path: str | os.PathLike) -> Image.Image:
    """An RGB image from any common file: grayscale and palette images are converted, transparency is composited
    on white, 16-bit and float images are rescaled to 8 bits. Raises :class:`ImageError` for unreadable files."""
    try:
        with Image.open(path) as img:
            img.load()
            if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
                arr = np.asarray(img, dtype=np.float64)
                lo, hi = float(arr.min()), float(arr.max())
                arr = (arr - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(arr)
                return Image.fromarray(arr.round().astype(np.uint8)).convert("RGB")
            if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
                rgba = img.convert("RGBA")
                background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
                return Image.alpha_composite(background, rgba).convert("RGB")
            return img.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
        raise ImageError(f"{path}: not a readable image ({type(e).__name__}: {e})") from e


def find_images(paths: list[str | os.PathLike]) -> tuple[list[Path], list[str]]:
    """Expand directories (recursively, sorted) into image files; returns (images, problems)."""
    images: list[Path] = []
    problems: list[str] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                problems.append(f"{p}: no image files ({', '.join(IMAGE_SUFFIXES)})")
            images.extend(found)
        elif p.is_file():
            images.append(p)
        else:
            problems.append(f"{p}: no such file or directory")
    return images, problems


@torch.inference_mode()
def classify(loaded: LoadedModel, batch: torch.Tensor, topk: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    probs = loaded.model(batch).float().softmax(-1)
    return probs.topk(min(topk, probs.shape[-1]), dim=-1)
