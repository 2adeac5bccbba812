"""Top-1/top-5 of a model on an ImageFolder val set or the embedded digits set, with its eval preprocessing."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from torch.utils.data import DataLoader

from ..data import DataError, SeededTransform, build_dataset
from ..errors import ConfigError
from ..inference import eval_transform, load_model
from .classification import evaluate
from .runtime import ShardSampler, autocast_settings, cleanup_distributed, init_distributed

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
        raise ConfigError("give a checkpoint (--checkpoint PATH) or --pretrained")
    loaded = load_model(model_name, checkpoint, pretrained=pretrained, use_ema=use_ema)
    model, pre = loaded.model, loaded.preprocessing
    if data is None and loaded.train_config is not None:
        data = loaded.train_config.get("data")  # the run's own val set
    img_size = pre["input_size"][-1]
    dataset = build_dataset(data, "val", img_size)
    if loaded.train_config is not None and list(dataset.classes) != loaded.class_names:
        raise DataError(
            f"the val set's classes {list(dataset.classes)[:5]}... differ from the checkpoint's "
            f"{loaded.class_names[:5]}..."
        )
    if model.num_classes != len(dataset.classes):
        raise DataError(f"{loaded.name} predicts {model.num_classes} classes, the val set has {len(dataset.classes)}")
    transform = eval_transform(pre)
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
        "model": loaded.name,
        "weights": loaded.weights,
        "data": data or "digits (embedded)",
        **metrics,
        "img_size": img_size,
        "crop_pct": pre.get("crop_pct"),
        "interpolation": pre.get("interpolation"),
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
