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

from ..complexity import count_macs, count_params
from ..engine.checkpointing import load_task_model
from ..inference import find_images, read_image, unique_names
from .config import SegConfig
from .data import EvalPipeline

__all__ = ["load_segmentor", "palette", "predict_masks", "benchmark_segmentor"]


def load_segmentor(checkpoint: str | os.PathLike) -> tuple[Any, SegConfig, list[str]]:
    """A trained segmentor from this package's checkpoint, with its config and class names."""
    from .engine import build_segmentor

    return load_task_model(checkpoint, SegConfig, build_segmentor, key="head", task="segmentation", command="segment")


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
    image, with a legend of the classes present) for every image. ``<name>`` is the image's stem, or its path below
    the folder shared with the images of the same stem (:func:`~inceptionnext.inference.unique_names`), so no
    output overwrites another. Returns (written files, problems)."""
    from .engine import infer_logits

    model, cfg, classes = load_segmentor(checkpoint)
    pipe = EvalPipeline(scale=tuple(cfg.scale))
    colours = palette(len(classes))
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    files, problems = find_images(list(inputs))
    written: list[Path] = []
    for f, name in zip(files, unique_names(files)):
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
        mask_path = out / f"{name}_mask.png"
        Image.fromarray(pred).save(mask_path)
        blend = (rgb * (1 - alpha) + colours[pred] * alpha).round().astype(np.uint8)
        overlay = _with_legend(Image.fromarray(blend), [(classes[c], colours[c]) for c in np.unique(pred)])
        overlay_path = out / f"{name}_overlay.png"
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


# mmseg's tools/benchmark.py (0.x), which the paper's FPS of Tables 6 and 7 come from: batch 1 through the test
# pipeline, 5 warm-up images then 195 timed (200 in all), FPS = timed images / their total time, cudnn's autotuner
# off, no_grad, the logits resized back to the original image size (``rescale=True``) and arg-maxed.
SEG_FPS_WARMUP = 5
SEG_FPS_IMAGES = 195
# Without ADE20K: one image of this size (H, W), a 4:3 ADE20K val image after the test resize to fit 2048x512.
SEG_FPS_SYNTHETIC = (512, 683)


def benchmark_segmentor(
    head: str,
    backbone: str,
    *,
    num_classes: int = 150,
    size: tuple[int, int] | None = None,
    runs: int | None = None,
    warmup: int | None = None,
    device: str | None = None,
    fps: bool = True,
    data: str | os.PathLike | None = None,
    mode: str = "whole",
) -> dict[str, Any]:
    """Params, MACs at the paper's input size (UperNet 512x2048, FPN 512x512) and, with ``fps``, inference FPS as
    mmseg measures it (see above), next to Tables 6 and 7.

    The FPS images are ADE20K's validation images when ``data`` (an ADEChallengeData2016 root) is given, resized to
    fit 2048x512 keeping their aspect ratio (mmseg's test pipeline; cycled when the folder holds fewer than needed);
    otherwise a synthetic image of ``size`` (default :data:`SEG_FPS_SYNTHETIC`). ``runs`` timed images (default 195)
    after ``warmup`` (default 5). The timed region is what mmseg times: the copy to the device, the forward pass,
    resizing the logits to the original size, softmax, arg-max and the copy of the label map back. It runs under
    ``torch.inference_mode`` (the package's ``infer_logits``) where mmseg uses ``torch.no_grad``: neither records
    autograd history; inference mode also skips tensor version counting.
    """
    from .. import benchmark as bm
    from .engine import infer_logits
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
    runs = SEG_FPS_IMAGES if runs is None else runs
    warmup = SEG_FPS_WARMUP if warmup is None else warmup
    if runs < 1 or warmup < 0:
        raise ValueError(f"runs must be >= 1 and warmup >= 0, got {runs} and {warmup}")
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = create_segmentor(head, backbone, num_classes).eval().to(dev)
    n, image = _fps_images(data, size)
    times: list[float] = []
    shapes: list[tuple[int, int]] = []
    mmseg = bm.BackendSettings(cudnn_benchmark=False, matmul_tf32=False, cudnn_tf32=False, autocast_dtype=None)
    with bm.backend(mmseg), torch.no_grad():
        for i in range(warmup + runs):
            img, out_size = image(i % n)  # read and resized outside the timed region, as mmseg's loader does
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            t0 = time.perf_counter()
            probs = infer_logits(model, img.to(dev)[None], out_size, mode=mode)
            probs.argmax(1).cpu()
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            if i >= warmup:
                times.append(time.perf_counter() - t0)
                shapes.append(tuple(img.shape[-2:]))
    mean_h = sum(h for h, _ in shapes) / len(shapes)
    mean_w = sum(w for _, w in shapes) / len(shapes)
    if data is None:
        source = f"synthetic {shapes[0][0]}x{shapes[0][1]}"
    else:
        source = f"ADE20K val ({n} images, resized to fit 2048x512; mean {mean_h:.0f}x{mean_w:.0f})"
    return result | {
        "fps": len(times) / sum(times),
        "fps_input": source,
        "fps_images": len(times),
        "fps_warmup": warmup,
        "fps_mean_hw": (mean_h, mean_w),
        "fps_mode": mode,
        "device": str(dev),
    }


def _fps_images(data: str | os.PathLike | None, size: tuple[int, int] | None):
    """(number of images, ``image(i)`` -> (normalised image at its network size, original (H, W)))."""
    if data is None:
        h, w = size or SEG_FPS_SYNTHETIC
        x = torch.randn(3, h, w)
        return 1, lambda i: (x, (h, w))
    from .data import build_seg_dataset

    dataset = build_seg_dataset(data, "val", None)
    if len(dataset) == 0:
        raise ValueError(f"{data} holds no validation images")
    pipe = EvalPipeline()  # mmseg's ADE20K test pipeline: fit into 2048x512 keeping the ratio, normalise

    def image(i: int) -> tuple[torch.Tensor, tuple[int, int]]:
        rgb, mask = dataset.load(i)
        return pipe(rgb, mask)[0], (rgb.shape[0], rgb.shape[1])

    return len(dataset), image


class _PredictView(torch.nn.Module):
    """Counts the inference path (no auxiliary head), as Tables 6 and 7 measure MACs."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.predict(x)
