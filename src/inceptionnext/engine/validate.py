"""Top-1/top-5 of a model on an ImageFolder val set or the embedded digits set, with its eval preprocessing.

An unreadable val image is left out, not replaced: the accuracy is over the readable images, each counted once, and
the result says how many were left out and which (``skipped`` and ``skipped_images``; ``skipped_images.txt`` next to
``results.json``).
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import Any

from torch.utils.data import DataLoader

from ..data import DataError, ReadableBatches, SeededTransform, ShardStream, build_dataset, collate_readable
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
    num_classes: int | None = None,
    crop_pct: float | None = None,
) -> dict[str, Any]:
    """Evaluate a checkpoint (this package's training checkpoints carry model, classes and preprocessing) or the
    released weights of ``model_name``. Writes ``results.json`` and ``results.csv`` to ``output`` when given.

    Unreadable images are left out (``skipped``, ``skipped_images`` in the result; :class:`DataError` when none
    is readable). ``INCEPTIONNEXT_NO_PROGRESS`` turns the progress bar off, as in training."""
    progress = progress and os.environ.get("INCEPTIONNEXT_NO_PROGRESS") is None
    if checkpoint is None and not pretrained:
        raise ConfigError("give a checkpoint (--checkpoint PATH) or --pretrained")
    if crop_pct is not None and not 0 < crop_pct <= 1:
        raise ConfigError(f"crop_pct must be in (0, 1], got {crop_pct:g}")
    loaded = load_model(model_name, checkpoint, pretrained=pretrained, use_ema=use_ema, num_classes=num_classes)
    model, pre = loaded.model, loaded.preprocessing
    if crop_pct is not None:  # e.g. 0.95, timm's setting for inceptionnext_base (the official one is 0.875)
        pre = {**pre, "crop_pct": crop_pct}
    if data is None and loaded.train_config is not None:
        data = loaded.train_config.get("data")  # the run's own val set
    img_size = pre["input_size"][-1]
    dataset = build_dataset(data, "val", img_size, unreadable="skip")
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
        if isinstance(dataset, ShardStream):  # shards: split among ranks and workers by the stream itself
            eval_set, sampler = dataset.configure(transform, 0, dist.rank, dist.world_size, batch_size), None
        else:
            eval_set, sampler = (
                SeededTransform(dataset, transform),
                ShardSampler(len(dataset), dist.rank, dist.world_size),
            )
        loader = DataLoader(
            eval_set,
            batch_size,
            num_workers=workers,
            sampler=sampler,
            collate_fn=collate_readable,
        )
        amp_dtype, _ = autocast_settings(dist.device, amp)
        batches = ReadableBatches(loader)
        try:
            metrics = evaluate(model, batches, dist.device, amp_dtype, "validate", progress and dist.is_main)
        except DataError:  # nothing was evaluated
            if not batches.skipped:
                raise
            raise DataError(
                f"none of the {len(dataset)} images of {data}/val is readable (e.g. {batches.skipped[0]})"
            ) from None
        skipped = batches.all_skipped()
    finally:
        cleanup_distributed()
    result = {
        "model": loaded.name,
        "weights": loaded.weights,
        "data": data or "digits (embedded)",
        **metrics,
        "skipped": len(skipped),
        "skipped_images": skipped,
        "img_size": img_size,
        "crop_pct": pre.get("crop_pct"),
        "interpolation": pre.get("interpolation"),
    }
    if output:
        out = Path(output)
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps(result, indent=1))
        if skipped:
            (out / "skipped_images.txt").write_text("".join(f"{p}\n" for p in skipped))
        row = {k: v for k, v in result.items() if k != "skipped_images"}  # the list is in results.json
        with open(out / "results.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(row))
            writer.writeheader()
            writer.writerow(row)
    return result
