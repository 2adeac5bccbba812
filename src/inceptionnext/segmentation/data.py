"""Semantic segmentation data: ADE20K (ADEChallengeData2016), the ADE20K train/eval pipelines, and an embedded
default built from real texture photographs.

The pipelines follow the ADE20K setting of the paper (Section 4.2, trained with mmsegmentation): random rescale of
a 2048x512 scale by 0.5-2.0, 512x512 random crop that avoids crops dominated by one class, horizontal flip,
photometric distortion, normalisation and padding. They are written here with numpy, Pillow and torch only, so the
library needs neither OpenCV nor mmcv.

All randomness of a sample comes from a numpy generator seeded from (seed, epoch, index): a sample is the same
whatever the number of processes and loader workers, and a resumed run replays an epoch exactly.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from ..data.images import ImageError, read_image
from ..errors import UserError

__all__ = [
    "ADE20KDataset",
    "ADE20K_CLASSES",
    "EvalPipeline",
    "IGNORE_INDEX",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "Mosaic",
    "SegDataError",
    "TextureMosaicDataset",
    "TrainPipeline",
    "build_seg_dataset",
    "hflip",
    "make_texture_mosaic",
    "normalize",
    "pad_to",
    "photometric_distortion",
    "random_crop",
    "random_rescale",
    "rescale_size",
    "resize_image",
    "resize_mask",
]

IGNORE_INDEX = 255

# fmt: off
ADE20K_CLASSES: tuple[str, ...] = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass", "cabinet",
    "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain", "chair", "car", "water",
    "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field", "armchair", "seat", "fence", "desk",
    "rock", "wardrobe", "lamp", "bathtub", "railing", "cushion", "base", "box", "column", "signboard",
    "chest of drawers", "counter", "sand", "sink", "skyscraper", "fireplace", "refrigerator", "grandstand", "path",
    "stairs", "runway", "case", "pool table", "pillow", "screen door", "stairway", "river", "bridge", "bookcase",
    "blind", "coffee table", "toilet", "flower", "book", "hill", "bench", "countertop", "stove", "palm",
    "kitchen island", "computer", "swivel chair", "boat", "bar", "arcade machine", "hovel", "bus", "towel", "light",
    "truck", "tower", "chandelier", "awning", "streetlight", "booth", "television receiver", "airplane",
    "dirt track", "apparel", "pole", "land", "bannister", "escalator", "ottoman", "bottle", "buffet", "poster",
    "stage", "van", "ship", "fountain", "conveyer belt", "canopy", "washer", "plaything", "swimming pool", "stool",
    "barrel", "basket", "waterfall", "tent", "bag", "minibike", "cradle", "oven", "ball", "food", "step", "tank",
    "trade name", "microwave", "pot", "animal", "bicycle", "lake", "dishwasher", "screen", "blanket", "sculpture",
    "hood", "sconce", "vase", "traffic light", "tray", "ashcan", "fan", "pier", "crt screen", "plate", "monitor",
    "bulletin board", "shower", "radiator", "glass", "clock", "flag",
)
# fmt: on
assert len(ADE20K_CLASSES) == 150

# ImageNet statistics on the 0-255 scale: the pipelines normalise uint8 pixels directly, as the reference configs do
IMAGENET_MEAN = (123.675, 116.28, 103.53)
IMAGENET_STD = (58.395, 57.12, 57.375)

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
ANN_EXTENSIONS = (".png",)


class SegDataError(UserError, ValueError):
    """Segmentation data that cannot be used as it is; the message names the files and says what to fix."""


def _names(items: Sequence[str], limit: int = 10) -> str:
    """At most ``limit`` names, so a message stays readable when thousands of files are wrong."""
    shown = ", ".join(items[:limit])
    return shown + (f" ... ({len(items)} in all)" if len(items) > limit else "")


# --------------------------------------------------------------------------------------------------------------------
# geometric and photometric operations (numpy HxWxC / HxW arrays)
# --------------------------------------------------------------------------------------------------------------------


def rescale_size(h: int, w: int, scale: tuple[float, float]) -> tuple[int, int]:
    """(new_h, new_w) keeping the aspect ratio, as large as possible with the long side <= ``max(scale)`` and the
    short side <= ``min(scale)``.

    This is the "keep ratio" rule of the ADE20K configs: the (2048, 512) scale means "short side 512 unless the long
    side would exceed 2048", so images may be enlarged as well as reduced.
    """
    if h <= 0 or w <= 0:
        raise ValueError(f"image size must be positive, got {h}x{w}")
    long_max, short_max = max(scale), min(scale)
    factor = min(long_max / max(h, w), short_max / min(h, w))
    return max(1, int(h * factor + 0.5)), max(1, int(w * factor + 0.5))


def resize_image(img: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of a uint8 HxWx3 image to ``size`` (h, w), returned as uint8.

    torch's bilinear with half-pixel centres and no antialiasing matches OpenCV's INTER_LINEAR, the interpolation
    the reference numbers were trained and evaluated with (Pillow would antialias when reducing).
    """
    h, w = img.shape[:2]
    if (h, w) == tuple(size):
        return img
    t = torch.from_numpy(np.ascontiguousarray(img, dtype=np.uint8)).permute(2, 0, 1)[None]
    t = F.interpolate(t, size=tuple(size), mode="bilinear", align_corners=False)  # torch's fast uint8 kernel
    return t[0].permute(1, 2, 0).numpy()  # a strided view: the crop that follows copies only what it keeps


def resize_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of an HxW label map (any integer dtype) to ``size`` (h, w).

    Source pixels are picked at half-pixel centres, the same geometry as the bilinear image resize, so labels stay
    aligned with the pixels they describe (labels must never be interpolated).
    """
    h, w = mask.shape
    nh, nw = size
    if (h, w) == (nh, nw):
        return mask
    rows = np.minimum(((np.arange(nh) + 0.5) * (h / nh)).astype(np.int64), h - 1)
    cols = np.minimum(((np.arange(nw) + 0.5) * (w / nw)).astype(np.int64), w - 1)
    return np.take(np.take(mask, cols, axis=1), rows, axis=0)  # two 1-D gathers: several times faster than 2-D


def random_rescale(
    img: np.ndarray,
    mask: np.ndarray,
    scale: tuple[int, int],
    ratio_range: tuple[float, float],
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray]:
    """Rescale image and mask together to ``scale`` times a ratio drawn uniformly from ``ratio_range``.

    Multi-scale training: the target scale is ``(int(scale[0] * r), int(scale[1] * r))`` and the image is fitted into
    it keeping its aspect ratio (see :func:`rescale_size`).
    """
    r = float(rng.uniform(ratio_range[0], ratio_range[1]))
    target = (int(scale[0] * r), int(scale[1] * r))
    size = rescale_size(img.shape[0], img.shape[1], target)
    return resize_image(img, size), resize_mask(mask, size)


def random_crop(
    img: np.ndarray,
    mask: np.ndarray,
    crop_size: tuple[int, int],
    cat_max_ratio: float,
    rng: np.random.Generator,
    ignore_index: int = IGNORE_INDEX,
    max_tries: int = 10,
) -> tuple[np.ndarray, np.ndarray]:
    """Random ``crop_size`` (h, w) crop; a side smaller than the crop is kept whole (padding comes later).

    With ``cat_max_ratio < 1`` the crop is redrawn (up to ``max_tries`` draws in all) until it holds more than one
    class and no class covers ``cat_max_ratio`` or more of its labelled (not ``ignore_index``) pixels, so training
    does not waste steps on crops of pure sky or wall; if no draw qualifies, the last one is kept.
    """
    h, w = mask.shape
    ch, cw = crop_size

    def draw() -> tuple[int, int]:
        return int(rng.integers(0, max(h - ch, 0) + 1)), int(rng.integers(0, max(w - cw, 0) + 1))

    for _ in range(max(1, max_tries)):
        y0, x0 = draw()
        if cat_max_ratio >= 1.0:  # the check is off
            break
        labels = mask[y0 : y0 + ch, x0 : x0 + cw]
        counts = np.bincount(labels[labels != ignore_index].ravel().astype(np.int64))
        counts = counts[counts > 0]
        if len(counts) > 1 and counts.max() / counts.sum() < cat_max_ratio:
            break
    return img[y0 : y0 + ch, x0 : x0 + cw], mask[y0 : y0 + ch, x0 : x0 + cw]


def hflip(img: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mirror image and mask left-right together (views, no copy)."""
    return img[:, ::-1], mask[:, ::-1]


def _rgb_to_hsv(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """float32 RGB in [0, 255] -> hue in degrees [0, 360), saturation [0, 1], value [0, 255] (planar, for speed)."""
    r, g, b = np.moveaxis(rgb, -1, 0).copy()
    v = np.maximum(np.maximum(r, g), b)
    c = v - np.minimum(np.minimum(r, g), b)
    s = c / np.maximum(v, 1e-12)
    inv = 60.0 / np.maximum(c, 1e-12)
    h = np.where(v == r, (g - b) * inv, np.where(v == g, (b - r) * inv + 120.0, (r - g) * inv + 240.0))
    return h % 360.0, s, v


def _hsv_to_rgb(h: np.ndarray, s: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Inverse of :func:`_rgb_to_hsv`, HxWx3 float32 (the closed form without per-sector branches)."""
    sixth, vs = h / 60.0, v * s
    channels = []
    for n in (5.0, 3.0, 1.0):
        k = (n + sixth) % 6.0
        channels.append(v - vs * np.clip(np.minimum(k, 4.0 - k), 0.0, 1.0))
    return np.stack(channels, axis=-1)


def photometric_distortion(
    img: np.ndarray,
    rng: np.random.Generator,
    brightness_delta: float = 32.0,
    contrast_range: tuple[float, float] = (0.5, 1.5),
    saturation_range: tuple[float, float] = (0.5, 1.5),
    hue_delta: float = 36.0,
) -> np.ndarray:
    """Random brightness, contrast, saturation and hue (each with probability 0.5), returned as float32 in [0, 255].

    Order: brightness, then contrast either first or last (probability 0.5 each), with saturation and hue in between.
    ``hue_delta`` is in degrees: the reference implementation's 18 is in OpenCV's 8-bit hue unit of 2 degrees, so
    it shifts the hue by up to 36 degrees. Values are clipped to [0, 255] after each step, as on uint8 images.
    """
    out = img.astype(np.float32)
    if rng.integers(2):
        out = np.clip(out + rng.uniform(-brightness_delta, brightness_delta), 0, 255)
    contrast_first = bool(rng.integers(2))

    def contrast(x: np.ndarray) -> np.ndarray:
        if rng.integers(2):
            x = np.clip(x * rng.uniform(*contrast_range), 0, 255)
        return x

    if contrast_first:
        out = contrast(out)
    sat = rng.uniform(*saturation_range) if rng.integers(2) else None
    hue = rng.uniform(-hue_delta, hue_delta) if rng.integers(2) else None
    if sat is not None or hue is not None:
        h, s, v = _rgb_to_hsv(out)
        if sat is not None:
            s = np.clip(s * sat, 0.0, 1.0)
        if hue is not None:
            h = (h + hue) % 360.0
        out = np.clip(_hsv_to_rgb(h, s, v), 0, 255)
    if not contrast_first:
        out = contrast(out)
    return out.astype(np.float32, copy=False)


def normalize(img: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """(img - mean) / std per channel on the 0-255 scale, float32 HxWx3."""
    return (img.astype(np.float32) - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)


def pad_to(
    img: np.ndarray, mask: np.ndarray, size: tuple[int, int], ignore_index: int = IGNORE_INDEX
) -> tuple[np.ndarray, np.ndarray]:
    """Pad at the bottom and right up to ``size`` (h, w): image with 0 (the mean after normalisation), mask with
    ``ignore_index`` so the padding never counts in the loss."""
    h, w = mask.shape
    ph, pw = max(size[0] - h, 0), max(size[1] - w, 0)
    if ph == 0 and pw == 0:
        return img, mask
    img = np.pad(img, ((0, ph), (0, pw), (0, 0)), constant_values=0)
    mask = np.pad(mask, ((0, ph), (0, pw)), constant_values=ignore_index)
    return img, mask


def _to_tensors(img: np.ndarray, mask: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """HxWx3 -> 3xHxW tensor (dtype kept) and HxW int64 tensor."""
    t_img = torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1)))
    t_mask = torch.from_numpy(np.ascontiguousarray(mask).astype(np.int64, copy=False))
    return t_img, t_mask


# --------------------------------------------------------------------------------------------------------------------
# pipelines
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class TrainPipeline:
    """The ADE20K training pipeline: random rescale, crop, flip, photometric distortion, normalise, pad.

    Takes a uint8 HxWx3 RGB image and an HxW label map (``IGNORE_INDEX`` = unlabelled) and returns a float32 3xHxW
    tensor and an int64 HxW tensor, both ``crop_size``. ``scale`` is (long side max, short side max) before the
    random ratio; every random draw comes from the ``rng`` argument, so a sample is reproducible.
    """

    scale: tuple[int, int] = (2048, 512)
    ratio_range: tuple[float, float] = (0.5, 2.0)
    crop_size: tuple[int, int] = (512, 512)
    cat_max_ratio: float = 0.75
    flip_prob: float = 0.5
    photometric: bool = True
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    brightness_delta: float = 32.0
    contrast_range: tuple[float, float] = (0.5, 1.5)
    saturation_range: tuple[float, float] = (0.5, 1.5)
    hue_delta: float = 36.0  # degrees (the reference's 18 in OpenCV's 2-degree hue unit)
    ignore_index: int = IGNORE_INDEX

    def __call__(
        self, img: np.ndarray, mask: np.ndarray, rng: np.random.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if mask.dtype != np.uint8 and mask.size and mask.min() >= 0 and mask.max() <= 255:
            mask = mask.astype(np.uint8)  # 8x less memory to resize and crop; int64 again on output
        img, mask = random_rescale(img, mask, self.scale, self.ratio_range, rng)
        img, mask = random_crop(img, mask, self.crop_size, self.cat_max_ratio, rng, self.ignore_index)
        if rng.random() < self.flip_prob:
            img, mask = hflip(img, mask)
        if self.photometric:
            img = photometric_distortion(
                img, rng, self.brightness_delta, self.contrast_range, self.saturation_range, self.hue_delta
            )
        img = normalize(img, self.mean, self.std)
        img, mask = pad_to(img, mask, self.crop_size, self.ignore_index)
        return _to_tensors(img, mask)


@dataclass
class EvalPipeline:
    """The ADE20K evaluation pipeline: fit the image into ``scale`` keeping its aspect ratio, normalise.

    The mask is returned at its original size, untouched: metrics are computed at the original resolution, so the
    model's logits must be resized back to the mask's size (as the reference evaluation does).
    """

    scale: tuple[int, int] = (2048, 512)
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def __call__(self, img: np.ndarray, mask: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        img = resize_image(img, rescale_size(img.shape[0], img.shape[1], self.scale))
        return _to_tensors(normalize(img, self.mean, self.std), mask)


def _apply(
    pipeline: Callable | None, img: np.ndarray, mask: np.ndarray, rng: np.random.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run a pipeline on one sample: an ``EvalPipeline`` takes no generator, any other callable gets ``rng``; no
    pipeline gives the raw uint8 3xHxW image and int64 mask as tensors."""
    if pipeline is None:
        return _to_tensors(img, mask)
    if isinstance(pipeline, EvalPipeline):
        return pipeline(img, mask)
    return pipeline(img, mask, rng)


def _sample_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The generator of one sample: a pure function of (seed, epoch, index), never of process or worker state."""
    return np.random.default_rng([seed % 2**64, epoch % 2**64, index])


# --------------------------------------------------------------------------------------------------------------------
# ADE20K
# --------------------------------------------------------------------------------------------------------------------


class ADE20KDataset(Dataset):
    """ADEChallengeData2016: ``root/images/<split>/*.jpg`` paired by file stem with ``root/annotations/<split>/*.png``.

    Annotations are single-channel PNGs with 0 = "other" (unlabelled) and 1..150 the classes. With
    ``reduce_zero_label`` (the benchmark convention) 0 becomes ``IGNORE_INDEX`` and k becomes k - 1; without it the
    labels are kept and "other" is a 151st class (index 0). The folder is checked when the dataset is built (missing
    folders, unpaired files, empty split) so a bad path fails at start-up, not hours into training; each sample is
    checked when read (unreadable file, image/mask size mismatch, labels outside 0..150).
    """

    classes: tuple[str, ...] = ADE20K_CLASSES
    num_classes: int = 150
    SPLITS = {"training": "training", "validation": "validation", "train": "training", "val": "validation"}

    def __init__(
        self,
        root: str | os.PathLike,
        split: str = "training",
        pipeline: Callable | None = None,
        reduce_zero_label: bool = True,
        seed: int = 0,
    ) -> None:
        if split not in self.SPLITS:
            raise SegDataError(f"ADE20K split must be 'training' or 'validation', got {split!r}")
        split = self.SPLITS[split]
        root = Path(root)
        expected = f"expected {root}/images/{split}/*.jpg and {root}/annotations/{split}/*.png (ADEChallengeData2016)"
        if not root.is_dir():
            raise SegDataError(f"ADE20K root not found: {root}; {expected}")
        img_dir, ann_dir = root / "images" / split, root / "annotations" / split
        for d in (img_dir, ann_dir):
            if not d.is_dir():
                raise SegDataError(f"missing folder {d}; {expected}")
        images = self._index(img_dir, IMG_EXTENSIONS)
        annotations = self._index(ann_dir, ANN_EXTENSIONS)
        no_ann = sorted(images[s].name for s in images.keys() - annotations.keys())
        no_img = sorted(annotations[s].name for s in annotations.keys() - images.keys())
        if no_ann or no_img:
            parts = []
            if no_ann:
                parts.append(f"{len(no_ann)} image(s) in {img_dir} without annotation: {_names(no_ann)}")
            if no_img:
                parts.append(f"{len(no_img)} annotation(s) in {ann_dir} without image: {_names(no_img)}")
            raise SegDataError("missing pairs (image and annotation are paired by file stem): " + "; ".join(parts))
        if not images:
            raise SegDataError(f"empty split: no images in {img_dir}; {expected}")
        stems = sorted(images)
        self.samples: list[tuple[Path, Path]] = [(images[s], annotations[s]) for s in stems]
        self.root, self.split = root, split
        self.pipeline = pipeline
        self.reduce_zero_label = reduce_zero_label
        if not reduce_zero_label:
            self.classes = ("other", *ADE20K_CLASSES)
            self.num_classes = 151
        self.seed = seed
        self.epoch = 0

    @staticmethod
    def _index(folder: Path, extensions: tuple[str, ...]) -> dict[str, Path]:
        """stem -> file for the files of ``folder`` with one of ``extensions``; two files with one stem are an
        error because the pairing would be ambiguous."""
        found: dict[str, Path] = {}
        duplicates = []
        for entry in sorted(os.scandir(folder), key=lambda e: e.name):
            if entry.name.startswith(".") or not entry.name.lower().endswith(extensions) or entry.is_dir():
                continue
            p = Path(entry.path)
            if p.stem in found:
                duplicates.append(f"{found[p.stem].name}/{p.name}")
            found[p.stem] = p
        if duplicates:
            raise SegDataError(f"{folder}: several files share a stem, so pairing is ambiguous: {_names(duplicates)}")
        return found

    def set_epoch(self, epoch: int) -> None:
        """Select the augmentation draw of ``epoch`` (call before each epoch, like a DistributedSampler)."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """(uint8 HxWx3 RGB image, int64 HxW label map with the label mapping applied), both checked."""
        img_path, ann_path = self.samples[index]
        try:  # the reader of classification and predict: 16-bit rescaled, transparency on white
            img = np.array(read_image(img_path))  # a writable copy (torch warns on read-only arrays)
        except ImageError as e:
            cause = e.__cause__ or e
            raise SegDataError(f"cannot read image {img_path}: {type(cause).__name__}: {cause}") from e
        try:
            with Image.open(ann_path) as im:
                mode, raw = im.mode, np.asarray(im)
        except (OSError, ValueError, UnidentifiedImageError, Image.DecompressionBombError) as e:
            raise SegDataError(f"cannot read annotation {ann_path}: {type(e).__name__}: {e}") from e
        if raw.ndim != 2:
            raise SegDataError(f"annotation {ann_path} has mode {mode}; expected a single-channel label PNG (mode L)")
        if raw.shape != img.shape[:2]:
            raise SegDataError(
                f"size mismatch: image {img_path.name} is {img.shape[1]}x{img.shape[0]} (WxH) but annotation "
                f"{ann_path} is {raw.shape[1]}x{raw.shape[0]}"
            )
        mask = raw.astype(np.int64)
        if mask.size and (mask.min() < 0 or mask.max() > 150):
            values = np.unique(mask)
            bad = [str(v) for v in values[(values < 0) | (values > 150)]]
            raise SegDataError(f"annotation {ann_path} has labels outside 0..150: {_names(bad)}")
        if self.reduce_zero_label:
            mask = np.where(mask == 0, IGNORE_INDEX, mask - 1)
        return img, mask

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        index = _check_index(index, len(self))
        img, mask = self.load(index)
        return _apply(self.pipeline, img, mask, _sample_rng(self.seed, self.epoch, index))


def _check_index(index: int, length: int) -> int:
    if index < 0:
        index += length
    if not 0 <= index < length:
        raise IndexError(f"index {index} out of range for a dataset of {length} samples")
    return index


# --------------------------------------------------------------------------------------------------------------------
# embedded default: texture mosaics from real photographs
# --------------------------------------------------------------------------------------------------------------------


class Mosaic(NamedTuple):
    """One generated mosaic: the grey image, its labels, and how it was made (for inspection and tests).

    ``regions[y, x]`` is the region id of a pixel; ``placements[r]`` = (label, y0, x0, flip_v, flip_h, gain) says
    region ``r`` shows ``band[label][y0:y0+size, x0:x0+size]``, flipped as told, times ``gain``.
    """

    image: np.ndarray
    mask: np.ndarray
    regions: np.ndarray
    placements: list[tuple[int, int, int, bool, bool, float]]


def make_texture_mosaic(
    bands: Sequence[np.ndarray],
    size: int,
    rng: np.random.Generator,
    num_regions: tuple[int, int] = (3, 6),
    intensity_jitter: float = 0.1,
) -> Mosaic:
    """A ``size`` x ``size`` mosaic of textures over a random Voronoi partition, with exact labels.

    3-6 seeds at distinct pixels (so every region is non-empty) each get a random class, at least two classes per
    mosaic; each region is filled from its own random crop of that class's texture band (random position, random
    vertical/horizontal flip, gain drawn from 1 +- ``intensity_jitter`` so brightness alone does not give the class).
    """
    n = int(rng.integers(num_regions[0], num_regions[1] + 1))
    flat = rng.choice(size * size, size=n, replace=False)
    sy, sx = (flat // size).astype(np.float32), (flat % size).astype(np.float32)
    yy = np.arange(size, dtype=np.float32)[:, None, None]
    xx = np.arange(size, dtype=np.float32)[None, :, None]
    regions = ((yy - sy) ** 2 + (xx - sx) ** 2).argmin(axis=-1)
    labels = rng.integers(0, len(bands), size=n)
    if len(bands) > 1 and np.all(labels == labels[0]):
        labels[rng.integers(n)] = (labels[0] + rng.integers(1, len(bands))) % len(bands)
    image = np.empty((size, size), np.uint8)
    placements = []
    for r in range(n):
        band = bands[labels[r]]
        y0 = int(rng.integers(0, band.shape[0] - size + 1))
        x0 = int(rng.integers(0, band.shape[1] - size + 1))
        flip_v, flip_h = bool(rng.integers(2)), bool(rng.integers(2))
        gain = float(rng.uniform(1 - intensity_jitter, 1 + intensity_jitter)) if intensity_jitter > 0 else 1.0
        crop = band[y0 : y0 + size, x0 : x0 + size]
        if flip_v:
            crop = crop[::-1]
        if flip_h:
            crop = crop[:, ::-1]
        where = regions == r
        values = crop[where]
        if gain != 1.0:
            values = np.clip(values * gain + 0.5, 0, 255).astype(np.uint8)
        image[where] = values
        placements.append((int(labels[r]), y0, x0, flip_v, flip_h, gain))
    return Mosaic(image, labels[regions].astype(np.int64), regions, placements)


class TextureMosaicDataset(Dataset):
    """The embedded default: mosaics of three real texture photographs bundled with scikit-image (brick, grass,
    gravel, 512x512 grey), labelled per pixel, so segmentation runs and can be checked without any download.

    Train mosaics use rows 0..383 of every photograph and val mosaics rows 384..511, so no texture pixel is shared
    between the splits. Train mosaics are redrawn every epoch (``set_epoch``) from (seed, epoch, index); the val
    split is a fixed set that depends only on the index (not on the seed nor the epoch), so val numbers of
    different runs are comparable.
    """

    classes: tuple[str, ...] = ("brick", "grass", "gravel")
    num_classes: int = 3
    SPLITS = {"train": "train", "val": "val", "training": "train", "validation": "val"}
    ROWS = {"train": (0, 384), "val": (384, 512)}
    DEFAULT_LENGTH = {"train": 400, "val": 100}

    def __init__(
        self,
        split: str = "train",
        size: int = 128,
        length: int | None = None,
        pipeline: Callable | None = None,
        seed: int = 0,
        intensity_jitter: float = 0.1,
    ) -> None:
        if split not in self.SPLITS:
            raise SegDataError(f"texture mosaic split must be 'train' or 'val', got {split!r}")
        if size < 1:
            raise SegDataError(f"mosaic size must be positive, got {size}")
        self.split = self.SPLITS[split]
        self.size = size
        self.length = self.DEFAULT_LENGTH[self.split] if length is None else int(length)
        self.pipeline = pipeline
        self.seed = seed
        self.epoch = 0
        self.intensity_jitter = intensity_jitter
        self.texture_rows = self.ROWS[self.split]
        self.bands = [self._band(name, size) for name in self.classes]

    def _band(self, name: str, size: int) -> np.ndarray:
        """This split's rows of one photograph, mirrored outward if a mosaic is larger than the band (the mirror
        reuses the band's own pixels, so the splits stay disjoint)."""
        try:
            import skimage.data
        except ImportError as e:  # pragma: no cover - scikit-image is a dependency of the default data
            raise SegDataError(
                "the embedded texture mosaics need scikit-image: pip install 'inceptionnext[segmentation]'"
            ) from e
        tex = np.asarray(getattr(skimage.data, name)())
        if tex.ndim == 3:  # pragma: no cover - the bundled textures are grey
            tex = tex[..., :3].mean(axis=-1).round().astype(np.uint8)
        r0, r1 = self.texture_rows
        band = np.ascontiguousarray(tex[r0:r1])
        ph, pw = max(size - band.shape[0], 0), max(size - band.shape[1], 0)
        if ph or pw:
            band = np.pad(band, ((0, ph), (0, pw)), mode="symmetric")
        return band

    def set_epoch(self, epoch: int) -> None:
        """New train mosaics and augmentations for ``epoch``; the val mosaics do not change."""
        self.epoch = epoch

    def __len__(self) -> int:
        return self.length

    def mosaic(self, index: int) -> Mosaic:
        """The mosaic of sample ``index`` with its construction record (see :class:`Mosaic`)."""
        index = _check_index(index, len(self))
        if self.split == "val":
            rng = np.random.default_rng([0x7E57, 1, index])
        else:
            rng = np.random.default_rng([0x7E57, 0, self.seed % 2**64, self.epoch % 2**64, index])
        return make_texture_mosaic(self.bands, self.size, rng, intensity_jitter=self.intensity_jitter)

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """(uint8 HxWx3 image, the grey mosaic stacked to RGB; int64 HxW labels in 0..2)."""
        m = self.mosaic(index)
        return np.repeat(m.image[:, :, None], 3, axis=2), m.mask

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        index = _check_index(index, len(self))
        img, mask = self.load(index)
        return _apply(self.pipeline, img, mask, _sample_rng(self.seed, self.epoch, index))


def build_seg_dataset(
    data: str | os.PathLike | None, split: str, pipeline: Callable | None, seed: int = 0
) -> ADE20KDataset | TextureMosaicDataset:
    """``data=None``: the embedded texture mosaics; otherwise ADE20K at ``data`` ("train" -> images/training,
    "val" -> images/validation)."""
    if split not in ADE20KDataset.SPLITS:  # the names TextureMosaicDataset.SPLITS accepts too
        raise SegDataError(f"split must be 'train' or 'val', got {split!r}")
    if data is None:
        return TextureMosaicDataset(split, pipeline=pipeline, seed=seed)
    return ADE20KDataset(data, split, pipeline=pipeline, seed=seed)
