"""Datasets: ImageFolder (ImageNet layout) with clear errors, the embedded digits set, and per-sample seeding.

Images are read by :func:`inceptionnext.data.images.read_image`, the reader of ``predict`` as well.

Augmentation randomness is seeded per sample from (seed, epoch, index) instead of drawn from the process RNG, so
a run gives the same batches whatever the number of processes and loader workers, and a resumed run replays an
epoch exactly.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate, get_worker_info

from ..errors import UserError
from .images import ImageError, read_image

__all__ = [
    "DataError",
    "DigitsDataset",
    "EpochIndices",
    "ImageFolderDataset",
    "SeededTransform",
    "UnreadableImage",
    "build_dataset",
    "collate_readable",
    "ReadableBatches",
]

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


class DataError(UserError, RuntimeError):
    """A data directory that cannot be used as it is; the message says what to fix."""


class UnreadableImage(NamedTuple):
    """What an evaluation dataset gives in place of an image it cannot read (see :func:`collate_readable`)."""

    path: str
    reason: str


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


def unreadable_image(name: str, error: Exception, skip_log: str | os.PathLike | None) -> UnreadableImage:
    """The stand-in for an image that could not be read, logged (``NAME<TAB>reason``) to ``skip_log`` when given."""
    cause = error.__cause__ or error
    reason = f"{type(cause).__name__}: {cause}"
    if skip_log is not None:
        with open(skip_log, "a") as f:
            f.write(f"{name}\t{reason}\n")
    return UnreadableImage(name, reason)


class ImageFolderDataset(Dataset):
    """``root/<class>/<image>`` (ImageNet's layout), checked up front; images read by :func:`.images.read_image`.

    Unreadable images (corrupt, truncated, not images) never end a long run; ``unreadable`` says what takes their
    place, and each skipped read is appended to ``skip_log`` (one line per read):

    * ``"next"`` (training): the next readable image in file order, with its own label, so every batch stays full.
      Where a whole class turns out unreadable, :class:`DataError` names it (the run would silently learn one class
      less). Each loader process remembers which files failed and where their run of failures ends, so the files of
      a broken folder are read once, not once per sample that walks past them (that walk was quadratic).
    * ``"skip"`` (evaluation): ``(UnreadableImage(path, reason), target)``; :func:`collate_readable` drops it from
      the batch, so an accuracy is computed over the readable images only, each counted once.

    A missing or empty directory, or a class folder with no images, is an error at start-up.
    """

    def __init__(
        self, root: str | os.PathLike, skip_log: str | os.PathLike | None = None, unreadable: str = "next"
    ) -> None:
        if unreadable not in ("next", "skip"):
            raise ValueError(f"unreadable must be 'next' or 'skip', got {unreadable!r}")
        root = Path(root)
        if not root.is_dir():
            raise DataError(f"data directory not found: {root}")
        class_dirs = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
        if not class_dirs:
            raise DataError(f"{root} has no class folders; expected {root}/<class>/<image> (ImageFolder layout)")
        self.root = root
        self.classes = [d.name for d in class_dirs]
        self.samples: list[tuple[str, int]] = []
        self.class_ranges: list[tuple[int, int]] = []  # samples are grouped by class: [start, end) of each
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
            self.class_ranges.append((len(self.samples), len(self.samples) + len(files)))
            self.samples.extend((f, label) for f in files)
        if empty:
            raise DataError(
                f"{root}: class folder(s) with no images ({', '.join(IMG_EXTENSIONS)}): {', '.join(empty[:10])}"
                + (f" ... ({len(empty)} in all)" if len(empty) > 10 else "")
            )
        self.targets = [t for _, t in self.samples]
        self.skip_log = Path(skip_log) if skip_log else None
        self.unreadable = unreadable
        self.transform: Callable | None = None
        # per loader process: unreadable index -> where the walk past it ended; classes seen with a readable image
        self._jump: dict[int, int] = {}
        self._readable_classes: set[int] = set()

    def __len__(self) -> int:
        return len(self.samples)

    def _read(self, j: int) -> Image.Image | UnreadableImage:
        path = self.samples[j][0]
        try:
            img = read_image(path)
        except ImageError as e:
            return unreadable_image(path, e, self.skip_log)
        self._readable_classes.add(self.samples[j][1])
        return img

    def _first_readable(self, index: int) -> tuple[Image.Image, int]:
        """The first readable image at or after ``index`` (cyclically) and its index."""
        n = len(self.samples)
        walked: list[int] = []
        j, distance = index, 0
        while distance < n:
            if j in self._jump:  # known unreadable: go straight to where the last walk from here ended
                step = (self._jump[j] - j) % n or n
                walked.append(j)
                j, distance = (j + step) % n, distance + step
                continue
            img = self._read(j)
            if not isinstance(img, UnreadableImage):
                for k in walked:
                    self._jump[k] = j
                self._check_classes(index, j)
                return img, j
            walked.append(j)
            self._jump[j] = (j + 1) % n
            j, distance = (j + 1) % n, distance + 1
        raise DataError(f"{self.root}: none of the {n} image files is readable")

    def _check_classes(self, start: int, found: int) -> None:
        """A walk from ``start`` to ``found`` crossed the classes in between: is any of them wholly unreadable?"""
        first, last = self.samples[start][1], self.samples[found][1]
        crossed = range(first, last) if first <= last else [*range(first, len(self.classes)), *range(0, last)]
        for c in crossed:
            if c in self._readable_classes:
                continue
            lo, hi = self.class_ranges[c]
            # the walk covered the class from ``start`` (or its beginning) to its end: read what lies before
            before = [k for k in range(lo, start if c == first else lo) if k not in self._jump]
            if all(isinstance(self._read(k), UnreadableImage) for k in before):
                raise DataError(
                    f"{self.root}: no image of class {self.classes[c]!r} is readable ({hi - lo} files, e.g. "
                    f"{self.samples[lo][0]}); fix or remove the folder"
                    + (f" (every failed read is listed in {self.skip_log})" if self.skip_log else "")
                )

    def __getitem__(self, index: int) -> tuple[Any, int]:
        if self.unreadable == "skip":
            img = self._read(index)
            if isinstance(img, UnreadableImage):
                return img, self.samples[index][1]
        else:  # the label follows the image actually read
            img, index = self._first_readable(index)
        return (self.transform(img) if self.transform else img), self.samples[index][1]


def collate_readable(batch: list[tuple[Any, int]]) -> tuple[Any, Any, list[UnreadableImage]]:
    """Collate for an :class:`ImageFolderDataset` with ``unreadable="skip"``: ``(images, targets, skipped)``, with
    ``(None, None, skipped)`` for a batch of which no image was readable."""
    skipped = [x for x, _ in batch if isinstance(x, UnreadableImage)]
    kept = [(x, y) for x, y in batch if not isinstance(x, UnreadableImage)]
    if not kept:
        return None, None, skipped
    x, y = default_collate(kept)
    return x, y, skipped


class ReadableBatches:
    """The (images, targets) batches of a loader built with :func:`collate_readable`, less the
    batches of which nothing was readable; collects the files left out."""

    def __init__(self, loader: DataLoader) -> None:
        self.loader = loader
        self.skipped: list[str] = []

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for x, y, skipped in self.loader:
            self.skipped += [s.path for s in skipped]
            if x is not None:
                yield x, y

    def all_skipped(self) -> list[str]:
        """The files left out by every process, sorted."""
        mine = self.skipped
        if torch.distributed.is_initialized():
            parts: list[list[str]] = [[] for _ in range(torch.distributed.get_world_size())]
            torch.distributed.all_gather_object(parts, mine)
            mine = [p for part in parts for p in part]
        return sorted(mine)


class SeededTransform(Dataset):
    """Applies ``transform`` with every RNG it may use (python, numpy, torch's CPU generator) seeded from
    (seed, epoch, index).

    A key is an index, or an ``(epoch, index)`` pair as :class:`EpochIndices` yields them: the pair carries the epoch
    to loader workers that outlive an epoch (``persistent_workers``), whose copy of this dataset never sees
    :meth:`set_epoch`.

    Seeding costs about 10 us per sample: ``random.seed``, ``np.random.seed`` and the CPU generator's own
    ``manual_seed`` (``torch.manual_seed`` would also queue a seed for every accelerator, ~0.3 ms). In a loader worker
    nothing else draws from these RNGs, so their states are not saved; in the main process (``workers=0``) they are
    saved and restored, so the training loop's own randomness (Mixup, drop path) is not disturbed.
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

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, int]:
        epoch, index = key if isinstance(key, tuple) else (self.epoch, key)
        img, target = self.dataset[index]
        if isinstance(img, UnreadableImage):  # left out of the batch by collate_readable
            return img, target
        return self.apply(img, index, epoch), target

    def apply(self, img: Any, index: int, epoch: int | None = None) -> Any:
        """``transform(img)`` seeded from (seed, epoch, index); streamed data passes each sample's epoch index.
        ``epoch`` defaults to the one :meth:`set_epoch` gave."""
        sample_seed = hash((self.seed, self.epoch if epoch is None else epoch, index)) & 0xFFFF_FFFF
        if get_worker_info() is not None:  # a loader worker: these RNGs serve the transforms only
            _seed_transform_rngs(sample_seed)
            return self.transform(img)
        states = random.getstate(), np.random.get_state(), torch.default_generator.get_state()
        _seed_transform_rngs(sample_seed)
        try:
            return self.transform(img)
        finally:
            random.setstate(states[0])
            np.random.set_state(states[1])
            torch.default_generator.set_state(states[2])


def _seed_transform_rngs(seed: int) -> None:
    """Seed python's, numpy's and torch's CPU RNG (the CPU generator alone: ``torch.manual_seed`` also queues a seed
    for every accelerator, ~0.3 ms)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.default_generator.manual_seed(seed)


class EpochIndices(Sampler):
    """Yields ``(epoch, index)`` for every index of ``sampler`` (a ``DistributedSampler`` or any sampler with
    ``set_epoch``), so a :class:`SeededTransform` in a persistent loader worker seeds each sample with its epoch."""

    def __init__(self, sampler: Sampler) -> None:
        self.sampler = sampler
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch = self.epoch
        return ((epoch, i) for i in self.sampler)


def build_dataset(
    data: str | None, split: str, img_size: int, skip_log: str | os.PathLike | None = None, unreadable: str = "next"
) -> Dataset:
    """``data=None``: the embedded digits set; otherwise ``data/<split>`` in the ImageFolder layout (``unreadable``:
    see :class:`ImageFolderDataset`)."""
    if data is None:
        return DigitsDataset(split, size=img_size)
    root = Path(data)
    if not root.is_dir():
        raise DataError(f"data directory not found: {root} (expected {root}/train/<class>/... and {root}/val/...)")
    if not (root / split).is_dir():
        raise DataError(f"{root} has no {split}/ folder; expected {root}/train/<class>/... and {root}/val/<class>/...")
    return ImageFolderDataset(root / split, skip_log=skip_log, unreadable=unreadable)
