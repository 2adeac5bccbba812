"""The embedded datasets written out as ImageFolders, so any trainer (this one, timm's ``train.py``) reads the
same files.

* ``digits``: scikit-learn's handwritten digits exactly as the embedded default set (:class:`~.datasets.DigitsDataset`,
  same split, same upscaling), as lossless PNG: training from the folder sees the same pixels as training without
  ``--data``.
* ``photos``: a 10-class, 224 px JPEG set made from real photographs bundled with scikit-image. The class is the
  photograph a crop comes from (astronaut, brick, camera, chelsea, coffee, grass, gravel, hubble_deep_field,
  immunohistochemistry, rocket). Training crops are cut from the top 70% of every photograph and validation crops
  from the bottom 30%, so no pixel is shared between the splits. Crops are squares of 15-35% of the photograph's
  shorter side, at a random position, resized to ``image_size`` with bicubic interpolation: a few hundred JPEGs
  that decode and augment like ImageNet's, for measuring a 224 px training pipeline offline.

``inceptionnext data make digits|photos OUT`` calls :func:`write_image_folder`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from .datasets import DataError, DigitsDataset

__all__ = ["EMBEDDED", "PHOTO_CLASSES", "write_image_folder"]

EMBEDDED = ("digits", "photos")
PHOTO_CLASSES = (
    "astronaut", "brick", "camera", "chelsea", "coffee", "grass", "gravel", "hubble_deep_field",
    "immunohistochemistry", "rocket",
)  # fmt: skip
PHOTO_SPLIT = 0.7  # rows above this fraction of the height give training crops, rows below it validation crops
PHOTO_CROP = (0.15, 0.35)  # crop side as a fraction of the photograph's shorter side


def _photo(name: str) -> np.ndarray:
    try:
        import skimage.data
    except ImportError as e:  # pragma: no cover - scikit-image is in the dev extra
        raise DataError("the embedded photographs need scikit-image: pip install 'inceptionnext[segmentation]'") from e
    img = np.asarray(getattr(skimage.data, name)())
    if img.ndim == 2:
        img = np.stack([img] * 3, axis=-1)
    return img[..., :3]


def _photo_crops(
    split: str, per_class: int, image_size: int, seed: int
) -> list[tuple[str, int, tuple[int, int, int], Image.Image]]:
    """(photograph, number, (top, left, side), crop resized to ``image_size``) for ``per_class`` crops of each."""
    out = []
    for c, name in enumerate(PHOTO_CLASSES):
        img = _photo(name)
        h, w = img.shape[:2]
        cut = round(PHOTO_SPLIT * h)
        r0, r1 = (0, cut) if split == "train" else (cut, h)
        rng = np.random.default_rng([seed, c, split == "val"])
        for i in range(per_class):
            side = int(rng.uniform(*PHOTO_CROP) * min(h, w))
            side = min(side, r1 - r0, w)
            y = int(rng.integers(r0, r1 - side + 1))
            x = int(rng.integers(0, w - side + 1))
            crop = Image.fromarray(img[y : y + side, x : x + side]).resize((image_size, image_size), Image.BICUBIC)
            out.append((name, i, (y, x, side), crop))
    return out


def write_image_folder(
    name: str,
    root: str | os.PathLike,
    *,
    image_size: int | None = None,
    per_class: tuple[int, int] = (60, 20),
    quality: int = 90,
    seed: int = 0,
) -> dict[str, Any]:
    """Write the embedded set ``name`` as ``root/train/<class>/*`` and ``root/val/<class>/*``; returns its summary.

    ``image_size``: digits default 32 (the ``digits`` recipe), photos default 224. ``per_class`` (train, val) and
    ``quality`` (JPEG) apply to ``photos`` only; digits keep their fixed 1,438 / 359 split. ``root`` must not exist or
    be empty: nothing is overwritten.
    """
    if name not in EMBEDDED:
        raise DataError(f"unknown embedded dataset {name!r}; choose one of {', '.join(EMBEDDED)}")
    root = Path(root)
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise DataError(f"{root} exists and is not an empty folder; give a new folder (nothing is overwritten)")
    counts: dict[str, int] = {}
    if name == "digits":
        size = image_size or 32
        for split in ("train", "val"):
            ds = DigitsDataset(split, size=size)
            for c in ds.classes:
                (root / split / c).mkdir(parents=True, exist_ok=True)
            for i in range(len(ds)):
                ds.load(i).save(root / split / ds.classes[ds.targets[i]] / f"{i:05d}.png")
            counts[split] = len(ds)
        classes = list(DigitsDataset.classes)
    else:
        size = image_size or 224
        for split, n in zip(("train", "val"), per_class):
            crops = _photo_crops(split, n, size, seed)
            for cls, i, _, crop in crops:
                folder = root / split / cls
                folder.mkdir(parents=True, exist_ok=True)
                crop.save(folder / f"{cls}_{split}_{i:04d}.jpg", quality=quality)
            counts[split] = len(crops)
        classes = list(PHOTO_CLASSES)
    info = {"name": name, "image_size": size, "classes": classes, "counts": counts}
    (root / "embedded.json").write_text(json.dumps(info, indent=1) + "\n")
    return info
