"""Top-1/top-5 of a model on an ImageFolder val set or the embedded digits set, with its eval preprocessing."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from timm.data import create_transform
from torch.utils.data import DataLoader

from ..checkpoint import extract_state_dict, load_state_dict_checked, read_checkpoint
from ..data import SeededTransform, build_dataset
from ..models import create_model
from .distributed import cleanup_distributed, init_distributed
from .trainer import ShardSampler, autocast_settings, evaluate

__all__ = ["validate"]


def validate(
    model_name: str | None = None,
    checkpoint: str | None = None,
    *,
    pretrained: bool = False,
    data: str | None = None,
    use_ema: bool = False,
    batch_size: int = 64,
    workers: int = 2,
    amp: str = "auto",
    output: str | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Evaluate a checkpoint (this package's training checkpoints carry model, classes and preprocessing) or the
    released weights of ``model_name``. Writes ``results.json`` and ``results.csv`` to ``output`` when given."""
    if checkpoint is None and not pretrained:
        raise ValueError("give a checkpoint (--checkpoint PATH) or --pretrained")
    obj = read_checkpoint(checkpoint) if checkpoint else None
    own = isinstance(obj, dict) and "config" in obj and "class_names" in obj
    if own:
        cfg = obj["config"]
        model_name = model_name or obj["model_name"]
        data = data if data is not None else cfg.get("data")
        classes = obj["class_names"]
        model = create_model(model_name, num_classes=len(classes), **cfg.get("model_kwargs", {}))
        load_state_dict_checked(model, extract_state_dict(obj, use_ema=use_ema), source=str(checkpoint))
        pre = dict(obj["eval_preprocessing"])
        weights = f"{checkpoint} ({'EMA' if use_ema else 'raw'} weights, epoch {obj['epoch'] + 1})"
    else:
        if model_name is None:
            raise ValueError(f"{checkpoint} is not a training checkpoint of this package: name the model (--model)")
        model = create_model(model_name, pretrained=pretrained and checkpoint is None)
        if checkpoint:
            load_state_dict_checked(model, extract_state_dict(obj, use_ema=use_ema), source=str(checkpoint))
        pre = {k: model.pretrained_cfg[k] for k in ("input_size", "crop_pct", "interpolation", "mean", "std")}
        weights = checkpoint or f"released weights of {model_name}"
        classes = None

    img_size = pre["input_size"][-1]
    dataset = build_dataset(data, "val", img_size)
    if classes is not None and list(dataset.classes) != list(classes):
        raise ValueError(
            f"the val set's classes {list(dataset.classes)[:5]}... differ from the checkpoint's {list(classes)[:5]}..."
        )
    if model.num_classes != len(dataset.classes):
        raise ValueError(f"{model_name} predicts {model.num_classes} classes, the val set has {len(dataset.classes)}")
    transform = create_transform(
        tuple(pre["input_size"]),
        is_training=False,
        crop_pct=pre["crop_pct"],
        interpolation=pre["interpolation"],
        mean=tuple(pre["mean"]),
        std=tuple(pre["std"]),
    )
    dist = init_distributed()
    try:
        model.to(dist.device)
        loader = DataLoader(
            SeededTransform(dataset, transform),
            batch_size,
            num_workers=workers,
            sampler=ShardSampler(len(dataset), dist.rank, dist.world_size),
        )
        amp_dtype, _ = autocast_settings(dist.device, amp)
        metrics = evaluate(model, loader, dist.device, amp_dtype, "validate", progress and dist.is_main)
    finally:
        cleanup_distributed()
    result = {
        "model": model_name,
        "weights": str(weights),
        "data": data or "digits (embedded)",
        **metrics,
        "img_size": img_size,
        "crop_pct": pre["crop_pct"],
        "interpolation": pre["interpolation"],
    }
    if output:
        out = Path(output)
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps(result, indent=1))
        with open(out / "results.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(result))
            writer.writeheader()
            writer.writerow(result)
    return result
