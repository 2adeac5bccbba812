"""Reading image files: the one reader behind training, validation, segmentation, predict and Grad-CAM.

Every path reads pixels the same way, so a model is evaluated and served on what it was trained on: a 16-bit PNG
that ``Image.convert("RGB")`` would clip to white, or a transparent PNG that it would flatten on black, comes out
the same in ``train``, ``validate`` and ``predict``.
"""

from __future__ import annotations

import os

import numpy as np
from PIL import Image, UnidentifiedImageError

from ..errors import UserError

__all__ = ["IMAGE_SUFFIXES", "ImageError", "read_image"]

#: file suffixes taken as images when a folder is searched (predict, cam, segment predict)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")

_HIGH_DEPTH_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")


class ImageError(UserError, ValueError):
    """A file that is not a readable image; batch tools report it and go on with the other files."""


def read_image(path: str | os.PathLike) -> Image.Image:
    """An RGB image from any common file: grayscale and palette images are converted, transparency is composited
    on white, 16-bit and float images are rescaled to 8 bits (their own min..max to 0..255, since 12- and 16-bit
    sensors fill different ranges). Raises :class:`ImageError` for unreadable files."""
    try:
        with Image.open(path) as img:
            img.load()
            if img.mode in _HIGH_DEPTH_MODES:
                arr = np.asarray(img, dtype=np.float64)
                lo, hi = float(arr.min()), float(arr.max())
                arr = (arr - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(arr)
                return Image.fromarray(arr.round().astype(np.uint8)).convert("RGB")
            if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (img.mode == "P" and "transparency" in img.info):
                rgba = img.convert("RGBA")
                background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
                return Image.alpha_composite(background, rgba).convert("RGB")
            return img.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
        raise ImageError(f"{path}: not a readable image ({type(e).__name__}: {e})") from e
