"""Top-1/top-5 of a model on an ImageFolder val set or the embedded digits set, with its eval preprocessing.

The model is a checkpoint, released weights, or an already loaded model (``loaded=``): the CLI passes an exported
file that way (:func:`inceptionnext.serve.load_exported_model`: fp32/int8 ONNX, fp32/bf16 TorchScript), so the
accuracy cost of a reduced-precision export is measured by the same loop, on the same images, as its checkpoint.

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
from ..inference import LoadedModel, eval_transform, load_model
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
    loaded: LoadedModel | None = None,
) -> dict[str, Any]:
    """Evaluate a checkpoint (this package's training checkpoints carry model, classes and preprocessing), the
    released weights of ``model_name``, or ``loaded`` (e.g. an exported file; it runs in the precision it was
    exported in, ``amp`` does not apply). Writes ``results.json`` and ``results.csv`` to ``output`` when given.

    Unreadable images are left out (``skipped``, ``skipped_images`` in the result; :class:`DataError` when none
    is readable). ``INCEPTIONNEXT_NO_PROGRESS`` turns the progress bar off, as in training."""
    progress = progress and os.environ.get("INCEPTIONNEXT_NO_PROGRESS") is None
    if loaded is not None:
        if checkpoint is not None or pretrained or model_name is not None:
            raise ConfigError("give a loaded model or a checkpoint / --pretrained / model name, not both")
    elif checkpoint is None and not pretrained:
        raise ConfigError("give a checkpoint (--checkpoint PATH), --pretrained or an exported file (--exported)")
    if crop_pct is not None and not 0 < crop_pct <= 1:
        raise ConfigError(f"crop_pct must be in (0, 1], got {crop_pct:g}")
    precision = None
    if loaded is None:
        loaded = load_model(model_name, checkpoint, pretrained=pretrained, use_ema=use_ema, num_classes=num_classes)
    else:
        precision = getattr(loaded.model, "precision", None)  # an exported file: its own precision, no autocast
        amp = "fp32"
    model, pre = loaded.model, loaded.preprocessing
    if crop_pct is not None:  # e.g. 0.95, timm's setting for inceptionnext_base (the official one is 0.875)
        pre = {**pre, "crop_pct": crop_pct}
    if data is None and loaded.train_config is not None:
        data = loaded.train_config.get("data")  # the run's own val set
    img_size = pre["input_size"][-1]
    dataset = build_dataset(data, "val", img_size, unreadable="skip")
    names_are_folders = loaded.train_config is not None or _same_names_reordered(loaded.class_names, dataset.classes)
    if names_are_folders and list(dataset.classes) != loaded.class_names:
        raise DataError(
            f"the val set's classes {list(dataset.classes)[:5]}... differ from the checkpoint's "
            f"{loaded.class_names[:5]}..."
        )
    if model.num_classes is not None and model.num_classes != len(dataset.classes):
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
    if precision is not None:
        result["precision"] = precision
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


def _same_names_reordered(names: list[str] | None, classes: list[str]) -> bool:
    """The model's class names are the data's folder names (an export of a training checkpoint), maybe in another
    order; ImageNet exports carry descriptions ("tench, Tinca tinca"), not the val set's synset folder names."""
    return names is not None and sorted(names) == sorted(classes)
