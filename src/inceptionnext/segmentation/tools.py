"""Loading segmentation checkpoints, colour-coded predictions, and the FPS / MACs benchmark of Tables 6 and 7."""

from __future__ import annotations

import colorsys
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..checkpoint import CheckpointError, load_state_dict_checked, read_checkpoint
from ..complexity import count_macs, count_params
from ..inference import find_images, read_image
from .config import SegConfig
from .data import EvalPipeline

__all__ = ["load_segmentor", "palette", "predict_masks", "benchmark_segmentor"]


def load_segmentor(checkpoint: str | os.PathLike) -> tuple[Any, SegConfig, list[str]]:
    """A trained segmentor from this package's checkpoint, with its config and class names."""
    from .engine import build_segmentor

    ckpt = read_checkpoint(checkpoint)
    if not isinstance(ckpt, dict) or "config" not in ckpt or "class_names" not in ckpt:
        raise CheckpointError(f"{checkpoint} is not a segmentation checkpoint of this package (no config/class names)")
    cfg = SegConfig(**{**ckpt["config"], "pretrained": False, "backbone_checkpoint": None})
    model = build_segmentor(cfg, len(ckpt["class_names"]))
    load_state_dict_checked(model, ckpt["model"], source=str(checkpoint))
    return model.eval(), cfg, list(ckpt["class_names"])


def palette(n: int) -> np.ndarray:
    """``n`` well-separated RGB colours (golden-ratio hues, alternating lightness), fixed for a class count."""
    colours = []
    for i in range(n):
        h = (i * 0.618033988749895) % 1.0
        light, sat = (0.5, 0.85) if i % 2 == 0 else (0.38, 0.7)
        colours.append([round(255 * c) for c in colorsys.hls_to_rgb(h, light, sat)])
    return np.array(colours, dtype=np.uint8)


@torch.inference_mode()
def predict_masks(
    checkpoint: str | os.PathLike,
    inputs: list[str | os.PathLike],
    output: str | os.PathLike,
    *,
    alpha: float = 0.5,
    mode: str | None = None,
) -> tuple[list[Path], list[str]]:
    """Writes ``<name>_mask.png`` (class indices) and ``<name>_overlay.png`` (colour-coded classes blended over the
    image, with a legend of the classes present) for every image. Returns (written files, problems)."""
    from .engine import infer_logits

    model, cfg, classes = load_segmentor(checkpoint)
    pipe = EvalPipeline(scale=tuple(cfg.scale))
    colours = palette(len(classes))
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    files, problems = find_images(list(inputs))
    written: list[Path] = []
    for f in files:
        try:
            rgb = np.array(read_image(f))  # writable copy for the resize
        except ValueError as e:
            problems.append(str(e))
            continue
        img, _ = pipe(rgb, np.zeros(rgb.shape[:2], dtype=np.int64))
        probs = infer_logits(
            model,
            img[None],
            rgb.shape[:2],
            mode=mode or cfg.eval_mode,
            crop=tuple(cfg.slide_crop),
            stride=tuple(cfg.slide_stride),
        )
        pred = probs.argmax(1)[0].numpy().astype(np.uint8)
        mask_path = out / f"{f.stem}_mask.png"
        Image.fromarray(pred).save(mask_path)
        blend = (rgb * (1 - alpha) + colours[pred] * alpha).round().astype(np.uint8)
        overlay = _with_legend(Image.fromarray(blend), [(classes[c], colours[c]) for c in np.unique(pred)])
        overlay_path = out / f"{f.stem}_overlay.png"
        overlay.save(overlay_path)
        written += [mask_path, overlay_path]
    return written, problems


def _with_legend(img: Image.Image, entries: list[tuple[str, np.ndarray]]) -> Image.Image:
    from PIL import ImageDraw

    row = 14
    canvas = Image.new("RGB", (img.width, img.height + row * len(entries) + 4), (255, 255, 255))
    canvas.paste(img, (0, 0))
    draw = ImageDraw.Draw(canvas)
    for i, (name, colour) in enumerate(entries):
        y = img.height + 2 + i * row
        draw.rectangle([2, y + 2, 12, y + 12], fill=tuple(int(c) for c in colour))
        draw.text((16, y), name, fill=(0, 0, 0))
    return canvas


def benchmark_segmentor(
    head: str,
    backbone: str,
    *,
    num_classes: int = 150,
    size: tuple[int, int] | None = None,
    runs: int = 5,
    warmup: int = 2,
    device: str | None = None,
    fps: bool = True,
) -> dict[str, Any]:
    """Params, MACs at the paper's input size (UperNet 512x2048, FPN 512x512) and, with ``fps``, inference FPS at
    512x2048 (batch 1, whole image, after warm-up, synchronised on GPU), next to Tables 6 and 7."""
    from .segmentor import PAPER_SEG, UPERNET, create_segmentor

    paper = PAPER_SEG.get((head, backbone), {})
    mac_size = tuple(paper.get("input", (512, 2048) if head == UPERNET else (512, 512)))
    with torch.device("meta"):
        meta_model = create_segmentor(head, backbone, num_classes).eval()
    params = count_params(meta_model)
    macs = count_macs(_PredictView(meta_model), (3, *mac_size))
    result = {
        "head": head,
        "backbone": backbone,
        "params_m": params / 1e6,
        "macs_g": macs / 1e9,
        "mac_input": f"{mac_size[0]}x{mac_size[1]}",
        "paper": paper,
    }
    if not fps:
        return result
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = create_segmentor(head, backbone, num_classes).eval().to(dev)
    fps_size = size or (512, 2048)
    x = torch.randn(1, 3, *fps_size, device=dev)
    times = []
    with torch.inference_mode():
        for i in range(warmup + runs):
            if dev.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            model.predict(x)
            if dev.type == "cuda":
                torch.cuda.synchronize()
            if i >= warmup:
                times.append(time.perf_counter() - t0)
    return result | {
        "fps": 1.0 / float(np.median(times)),
        "fps_input": f"{fps_size[0]}x{fps_size[1]}",
        "device": str(dev),
    }


class _PredictView(torch.nn.Module):
    """Counts the inference path (no auxiliary head), as Tables 6 and 7 measure MACs."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.predict(x)
