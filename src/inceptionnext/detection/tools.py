"""Loading detection checkpoints, drawing predictions, and the params / MACs / img/s benchmark."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw

from ..engine.checkpointing import load_task_model
from ..inference import find_images, read_image, unique_names
from ..segmentation.tools import palette
from .config import DetConfig

__all__ = ["benchmark_detector", "draw_detections", "load_detector", "predict_images"]


def load_detector(checkpoint: str | os.PathLike) -> tuple[Any, DetConfig, list[str]]:
    """A trained detector from this package's checkpoint, with its config and class names."""
    from .engine import build_detector

    return load_task_model(checkpoint, DetConfig, build_detector, key="arch", task="detection", command="detect")


def draw_detections(
    rgb: np.ndarray, output: dict[str, torch.Tensor], classes: list[str], *, score_threshold: float = 0.5
) -> Image.Image:
    """``rgb`` with each detection above ``score_threshold``: its mask blended in its class colour (Mask R-CNN), its
    box, and ``class score`` above the box."""
    colours = palette(len(classes))
    keep = output["scores"] >= score_threshold
    img = rgb.astype(np.float32)
    if "masks" in output:
        for mask, label in zip(output["masks"][keep], output["labels"][keep]):
            m = mask[0].numpy() >= 0.5
            img[m] = img[m] * 0.5 + colours[int(label) - 1] * 0.5
    canvas = Image.fromarray(img.round().clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(canvas)
    for box, label, score in zip(output["boxes"][keep], output["labels"][keep], output["scores"][keep]):
        colour = tuple(int(c) for c in colours[int(label) - 1])
        x0, y0, x1, y1 = (float(v) for v in box)
        draw.rectangle([x0, y0, x1, y1], outline=colour, width=2)
        text = f"{classes[int(label) - 1]} {float(score):.2f}"
        ty = max(0.0, y0 - 11)
        draw.rectangle([x0, ty, x0 + 6 * len(text) + 2, ty + 11], fill=colour)
        draw.text((x0 + 1, ty), text, fill=(255, 255, 255))
    return canvas


@torch.inference_mode()
def predict_images(
    checkpoint: str | os.PathLike,
    inputs: list[str | os.PathLike],
    output: str | os.PathLike,
    *,
    score_threshold: float = 0.5,
) -> tuple[list[Path], list[str]]:
    """Writes ``<name>_detections.png`` (boxes, masks and class names drawn on the image) for every image and
    ``detections.json`` (per image: boxes xyxy in the image's pixels, class names, scores). ``<name>`` is unique
    per image (:func:`~inceptionnext.inference.unique_names`). Returns (written files, problems)."""
    import json

    model, _, classes = load_detector(checkpoint)
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    files, problems = find_images(list(inputs))
    written: list[Path] = []
    records = []
    for f, name in zip(files, unique_names(files)):
        try:
            rgb = np.array(read_image(f))
        except ValueError as e:
            problems.append(str(e))
            continue
        x = torch.from_numpy(rgb).permute(2, 0, 1).float() / 255
        pred = {k: v.float() if v.is_floating_point() else v for k, v in model([x])[0].items()}
        path = out / f"{name}_detections.png"
        draw_detections(rgb, pred, classes, score_threshold=score_threshold).save(path)
        written.append(path)
        keep = pred["scores"] >= score_threshold
        records.append(
            {
                "image": str(f),
                "boxes": [[round(float(v), 2) for v in b] for b in pred["boxes"][keep]],
                "classes": [classes[int(label) - 1] for label in pred["labels"][keep]],
                "scores": [round(float(s), 4) for s in pred["scores"][keep]],
            }
        )
    if records:
        path = out / "detections.json"
        tmp = path.with_name(path.name + ".partial")
        tmp.write_text(json.dumps(records, indent=1))
        os.replace(tmp, path)
        written.append(path)
    return written, problems


@torch.inference_mode()
def benchmark_detector(
    name_or_arch: str,
    backbone: str,
    *,
    size: tuple[int, int] = (800, 1280),
    runs: int = 10,
    warmup: int = 2,
    fps: bool = True,
    device: str | None = None,
) -> dict[str, Any]:
    """Params and MACs of ``arch`` + ``backbone`` (80 COCO classes) at ``size`` (h, w), and, with ``fps``, images per
    second of batch-1 inference on ``device`` (CUDA when present) over ``runs`` timed images after ``warmup``."""
    from .models import create_detector, detector_complexity

    model = create_detector(name_or_arch, backbone, 80).eval()
    res: dict[str, Any] = {"arch": name_or_arch, "backbone": backbone, "size": size}
    res.update(detector_complexity(model, size=size))
    if fps:
        dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        model.to(dev)
        x = [torch.rand(3, *size, device=dev)]
        for _ in range(warmup):
            model(x)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(runs):
            model(x)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        res.update(img_per_s=runs / (time.perf_counter() - t0), device=str(dev))
    return res
