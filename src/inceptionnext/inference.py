"""Loading a model for inference with its preprocessing and class names; finding user images.

A checkpoint whose classifier has another number of classes than the model is refused here, where training would
re-initialise the head to fine-tune it: a random head gives confident, meaningless predictions (with the ImageNet
names when the model has 1000 classes). Images are read by :func:`inceptionnext.data.images.read_image`, the reader
of the datasets too (re-exported here).

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

import torch
from torch import nn

from .checkpoint import CheckpointError, extract_state_dict, load_state_dict_checked, read_checkpoint
from .data.images import IMAGE_SUFFIXES, ImageError, read_image
from .errors import ConfigError
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
    "distinct",
    "unique_names",
]


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
    use_ema: bool = False, num_classes: int | None = None,
) -> LoadedModel:  # fmt: skip
    """A model ready for eval, from this package's training checkpoint (which names the model and its classes),
    from ``name`` + a checkpoint file, from released weights (``pretrained``), or a timm/HF model name.

    ``num_classes``: the class count of a checkpoint that does not carry its class names (predictions are then
    class indices). A checkpoint whose classifier does not fit the model raises
    :class:`~inceptionnext.checkpoint.CheckpointError` naming both counts; ``use_ema`` without EMA weights in the
    checkpoint raises too, rather than quietly using the raw weights.
    """
    if use_ema and checkpoint is None:
        raise ConfigError("use_ema (--use-ema) needs a checkpoint that holds EMA weights (--checkpoint PATH)")
    if num_classes is not None and (checkpoint is None or num_classes < 1):
        raise ConfigError(f"num_classes (--num-classes) must be >= 1 and go with a checkpoint, got {num_classes}")
    obj = read_checkpoint(checkpoint) if checkpoint else None
    if isinstance(obj, dict) and "config" in obj and "class_names" in obj:  # a training checkpoint of this package
        if "model_name" not in obj:
            raise CheckpointError(
                f"{checkpoint} is a segmentation checkpoint, not a classifier: use `inceptionnext segment eval` or "
                "`segment predict`"
            )
        cfg = obj["config"]
        name = name or obj["model_name"]
        classes = list(obj["class_names"])
        if num_classes is not None and num_classes != len(classes):
            raise ConfigError(f"{checkpoint} carries {len(classes)} class names; num_classes={num_classes} disagrees")
        model = create_any_model(name, num_classes=len(classes), **cfg.get("model_kwargs", {}))
        state = extract_state_dict(obj, use_ema=use_ema)
        load_state_dict_checked(model, state, source=str(checkpoint), reinit_head=False)
        pre = resolve_data_config(obj["eval_preprocessing"])
        weights = f"{checkpoint} ({'EMA' if use_ema else 'raw'} weights, epoch {obj['epoch'] + 1})"
        return LoadedModel(model.eval(), name, pre, classes, weights, train_config=dict(cfg))
    if name is None:
        raise ConfigError(f"{checkpoint} is not a training checkpoint of this package: name the model (--model)")
    from_hub = name.startswith(HUB_PREFIXES)  # an exported folder always carries its weights
    kwargs = {} if num_classes is None else {"num_classes": num_classes}
    model = create_any_model(name, pretrained=(pretrained or from_hub) and checkpoint is None, **kwargs)
    if checkpoint:
        state = extract_state_dict(obj, use_ema=use_ema)
        load_state_dict_checked(model, state, source=str(checkpoint), reinit_head=False)
    cfg = getattr(model, "pretrained_cfg", None) or {}
    pre = resolve_data_config(cfg)
    classes = cfg.get("label_names")
    if classes is not None and len(classes) != getattr(model, "num_classes", len(classes)):
        classes = None  # the names of the released head, not of this one
    if classes is None and getattr(model, "num_classes", 0) == 1000:
        classes = imagenet_class_names()
    weights = str(checkpoint) if checkpoint else ("released weights" if pretrained else "random init")
    return LoadedModel(model.eval(), name, pre, list(classes) if classes else None, weights)


def eval_transform(pre: Mapping[str, Any]):
    """timm's eval transform (resize, center crop, normalise) for preprocessing settings; unset keys take the
    defaults of :func:`~inceptionnext.models.pretrained.resolve_data_config`."""
    from timm.data import create_transform

    return create_transform(**resolve_data_config(pre), is_training=False)


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


def unique_names(paths: list[str | os.PathLike]) -> list[str]:
    """A distinct output name (no suffix) for each input path, in order: the file's stem where it is unique, else
    its path below the deepest folder the colliding files share (``a/x.jpg``, ``b/x.jpg`` -> ``a__x``, ``b__x``),
    else a numbered name (:func:`distinct`). Names are compared without case, as macOS and Windows file systems do."""
    paths = [Path(p) for p in paths]
    names = [p.stem for p in paths]
    groups: dict[str, list[int]] = {}
    for i, n in enumerate(names):
        groups.setdefault(n.lower(), []).append(i)
    for members in groups.values():
        if len(members) < 2:
            continue
        resolved = [paths[i].resolve() for i in members]
        common = Path(os.path.commonpath([str(r.parent) for r in resolved]))
        for i, r in zip(members, resolved):
            names[i] = "__".join(r.relative_to(common).with_suffix("").parts)
    return distinct(names)


def distinct(names: list[str]) -> list[str]:
    """``names`` with repeats (compared without case) numbered: ``x``, ``x-2``, ``x-3``."""
    taken: set[str] = set()
    out = []
    for n in names:
        candidate, k = n, 2
        while candidate.lower() in taken:
            candidate, k = f"{n}-{k}", k + 1
        taken.add(candidate.lower())
        out.append(candidate)
    return out
