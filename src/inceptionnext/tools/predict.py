"""Top-k classification of image files and folders with a model's eval preprocessing."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm import tqdm

from ..errors import ConfigError
from ..inference import LoadedModel, classify, eval_transform, find_images, read_image

__all__ = ["Prediction", "PredictReport", "predict", "format_predictions"]


@dataclass
class Prediction:
    path: str
    topk: list[dict[str, Any]]  # {"index", "label", "prob"}


@dataclass
class PredictReport:
    model: str
    weights: str
    predictions: list[Prediction] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "weights": self.weights,
            "predictions": [{"path": p.path, "topk": p.topk} for p in self.predictions],
            "errors": self.errors,
        }


def predict(
    loaded: LoadedModel, paths: list[str | os.PathLike], *, topk: int = 5, batch_size: int = 32, progress: bool = True
) -> PredictReport:
    """Classify every image under ``paths`` (files or folders). Unreadable files are reported and skipped."""
    if topk < 1 or batch_size < 1:
        raise ConfigError(f"topk and batch_size must be >= 1, got topk={topk}, batch_size={batch_size}")
    files, errors = find_images(list(paths))
    report = PredictReport(loaded.name, loaded.weights, errors=list(errors))
    transform = eval_transform(loaded.preprocessing)
    device = next(loaded.model.parameters(), torch.empty(0)).device  # parameter-free wrappers (onnxruntime): CPU
    names = loaded.class_names
    bar = tqdm(total=len(files), desc="predict", unit="img", disable=not progress or len(files) < 2 * batch_size)
    for start in range(0, len(files), batch_size):
        tensors, kept = [], []
        for f in files[start : start + batch_size]:
            try:
                tensors.append(transform(read_image(f)))
                kept.append(f)
            except ValueError as e:
                report.errors.append(str(e))
        bar.update(len(files[start : start + batch_size]))
        if not tensors:
            continue
        probs, idx = classify(loaded, torch.stack(tensors).to(device), topk)
        for f, p_row, i_row in zip(kept, probs.tolist(), idx.tolist()):
            top = [{"index": i, "label": names[i] if names else str(i), "prob": p} for p, i in zip(p_row, i_row)]
            report.predictions.append(Prediction(str(f), top))
    bar.close()
    return report


def format_predictions(report: PredictReport) -> str:
    lines = [f"{report.model} [{report.weights}]"]
    for p in report.predictions:
        best = ", ".join(f"{t['label']} {100 * t['prob']:.1f}%" for t in p.topk)
        lines.append(f"{p.path}: {best}")
    for e in report.errors:
        lines.append(f"skipped: {e}")
    lines.append(f"{len(report.predictions)} images classified, {len(report.errors)} skipped")
    return "\n".join(lines)
