"""Datasets: ImageFolder (ImageNet layout) with clear errors, the embedded digits set, and per-sample seeding.

Augmentation randomness is seeded per sample from (seed, epoch, index) instead of drawn from the process RNG, so
a run gives the same batches whatever the number of processes and loader workers, and a resumed run replays an
epoch exactly.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from ..errors import UserError

__all__ = ["DataError", "DigitsDataset", "ImageFolderDataset", "SeededTransform", "build_dataset"]

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


class DataError(UserError, RuntimeError):
    """A data directory that cannot be used as it is; the message says what to fix."""


class DigitsDataset(Dataset):
    """scikit-learn's bundled handwritten digits (1,797 real 8x8 images, 10 classes), as RGB PIL images.

    The split is fixed: a stratified 80/20 split drawn once with seed 0 (1,438 train / 359 val). Images are
    upscaled from 8x8 with bicubic interpolation to ``size`` (the 16 grey levels become 0-255).
    """

    classes = [str(i) for i in range(10)]

    def __init__(self, split: str = "train", size: int = 32) -> None:
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        try:
            from sklearn.datasets import load_digits
        except ImportError as e:  # pragma: no cover - scikit-learn is a dependency of the default data
            raise DataError("the embedded digits set needs scikit-learn: pip install 'inceptionnext[digits]'") from e
        digits = load_digits()
        rng = np.random.default_rng(0)
        val_idx = np.concatenate(
            [
                rng.permutation(np.flatnonzero(digits.target == c))[: round(0.2 * (digits.target == c).sum())]
                for c in range(10)
            ]
        )
        mask = np.zeros(len(digits.target), dtype=bool)
        mask[val_idx] = True
        keep = mask if split == "val" else ~mask
        self.images = (digits.images[keep] * (255.0 / 16.0)).round().astype(np.uint8)
        self.targets = digits.target[keep].tolist()
        self.size = size
        self.transform: Callable | None = None

    def __len__(self) -> int:
        return len(self.targets)

    def load(self, index: int) -> Image.Image:
        img = Image.fromarray(self.images[index], mode="L").resize((self.size, self.size), Image.BICUBIC)
        return img.convert("RGB")

    def __getitem__(self, index: int) -> tuple[Any, int]:
        img = self.load(index)
        return (self.transform(img) if self.transform else img), self.targets[index]


class ImageFolderDataset(Dataset):
    """``root/<class>/<image>`` (ImageNet's layout), checked up front.

    Unreadable images (corrupt, truncated, not images) are skipped and counted: the sample is replaced by the next
    readable one, and the path is appended to ``skip_log`` (one line per skipped read), so a single bad JPEG does not
    end a long run. A missing or empty directory, or a class folder with no images, is an error at start-up.
    """

    def __init__(self, root: str | os.PathLike, skip_log: str | os.PathLike | None = None) -> None:
        root = Path(root)
        if not root.is_dir():
            raise DataError(f"data directory not found: {root}")
        class_dirs = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
        if not class_dirs:
            raise DataError(f"{root} has no class folders; expected {root}/<class>/<image> (ImageFolder layout)")
        self.classes = [d.name for d in class_dirs]
        self.samples: list[tuple[str, int]] = []
        empty = []
        for label, d in enumerate(class_dirs):
            files = sorted(
                os.path.join(dp, f)
                for dp, _, fs in os.walk(d, followlinks=True)
                for f in fs
                if f.lower().endswith(IMG_EXTENSIONS)
            )
            if not files:
                empty.append(d.name)
            self.samples.extend((f, label) for f in files)
        if empty:
            raise DataError(
                f"{root}: class folder(s) with no images ({', '.join(IMG_EXTENSIONS)}): {', '.join(empty[:10])}"
                + (f" ... ({len(empty)} in all)" if len(empty) > 10 else "")
            )
        self.targets = [t for _, t in self.samples]
        self.skip_log = Path(skip_log) if skip_log else None
        self.transform: Callable | None = None

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        # the label follows the image actually read (a skipped file is replaced by the next one)
        for attempt in range(len(self.samples)):
            j = (index + attempt) % len(self.samples)
            path, target = self.samples[j]
            try:
                with Image.open(path) as im:
                    img = im.convert("RGB")
                break
            except (OSError, ValueError, Image.DecompressionBombError) as e:
                if self.skip_log is not None:
                    with open(self.skip_log, "a") as f:
                        f.write(f"{path}\t{type(e).__name__}: {e}\n")
        else:
            raise DataError(f"no readable image among {len(self.samples)} files")
        return (self.transform(img) if self.transform else img), target


class SeededTransform(Dataset):
    """Applies ``transform`` with every RNG it may use (python, numpy, torch) seeded from (seed, epoch, index).

    The process RNG states are restored afterwards, so the training loop's own randomness (Mixup, drop path) is
    not disturbed when loading runs in the main process.
    """

    def __init__(self, dataset: Dataset, transform: Callable, seed: int = 0) -> None:
        self.dataset = dataset
        self.transform = transform
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        img, target = self.dataset[index]
        sample_seed = hash((self.seed, self.epoch, index)) & 0xFFFF_FFFF
        py_state, np_state = random.getstate(), np.random.get_state()
        random.seed(sample_seed)
        np.random.seed(sample_seed)
        try:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(sample_seed)
                out = self.transform(img)
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)
        return out, target


def build_dataset(data: str | None, split: str, img_size: int, skip_log: str | os.PathLike | None = None) -> Dataset:
    """``data=None``: the embedded digits set; otherwise ``data/<split>`` in the ImageFolder layout."""
    if data is None:
        return DigitsDataset(split, size=img_size)
    root = Path(data)
    if not root.is_dir():
        raise DataError(f"data directory not found: {root} (expected {root}/train/<class>/... and {root}/val/...)")
    if not (root / split).is_dir():
        raise DataError(f"{root} has no {split}/ folder; expected {root}/train/<class>/... and {root}/val/<class>/...")
    return ImageFolderDataset(root / split, skip_log=skip_log)
