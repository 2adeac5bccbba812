"""Object detection data: COCO instances datasets, the COCO training pipelines of the reference Mask R-CNN configs,
and an embedded default of handwritten digits pasted on real photographs.

Samples follow torchvision's detection API: a float image ``[3, H, W]`` in 0..1 (not normalised: the model's
transform normalises) and a target dict with ``boxes`` (float32 ``[N, 4]``, absolute xyxy pixels), ``labels``
(int64 ``[N]`` in ``1..K``, 0 is background), ``masks`` (uint8 ``[N, H, W]``), ``image_id`` (int64 scalar, the COCO
image id) and ``orig_size`` (int64 ``[2]``, the file's (h, w)). Crowd regions are never in a target: they stay in
``dataset.coco``, the ground truth that COCOeval reads, where a detection matched to one is ignored.

Training resizes and flips here (the model's transform must then not resize); evaluation gives the original image
and the model resizes it and maps its predictions back. Every random draw of a sample comes from a numpy generator
seeded from (seed, epoch, index), as in segmentation: a sample is the same whatever the number of processes and
loader workers, and a resumed run replays an epoch exactly.
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import math
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from ..data.datasets import DataError
from ..data.images import ImageError, read_image
from ..errors import ConfigError
from ..segmentation.data import rescale_size, resize_image

__all__ = [
    "COCO_MS_SHORT_SIDES",
    "Composite",
    "CocoDetectionDataset",
    "DigitComposites",
    "EvalPipeline",
    "PHOTOS",
    "TrainPipeline",
    "build_det_dataset",
    "collate_detection",
    "crop_sample",
    "digit_split",
    "hflip_sample",
    "make_composite",
    "masks_to_boxes",
    "photo_regions",
    "resize_sample",
    "write_composites_coco",
]

#: short sides of the "mstrain 480-800" resize: 480, 512, ..., 800 (step 32), as listed in the Swin-T and ConvNeXt-T
#: Mask R-CNN configs (Swin-Transformer-Object-Detection configs/swin/
#: mask_rcnn_swin_tiny_patch4_window7_mstrain_480-800_adamw_1x_coco.py, AutoAugment policy 1)
COCO_MS_SHORT_SIDES: tuple[int, ...] = tuple(range(480, 801, 32))

BOX_TOLERANCE = 1.0  # pixels a box may stick out of its image (rounding in converters) before it is an error
Target = dict[str, Any]  # numpy arrays before the pipeline, tensors after it


def _first(items: Sequence[str], limit: int = 5) -> str:
    """At most ``limit`` items, so a message stays readable when thousands of annotations are wrong."""
    shown = "; ".join(items[:limit])
    return shown + (f" ... ({len(items)} in all)" if len(items) > limit else "")


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------------------------------
# geometric operations on (uint8 HxWx3 image, numpy target) pairs
# --------------------------------------------------------------------------------------------------------------------


def masks_to_boxes(masks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Tight xyxy boxes (float32 ``[N, 4]``, pixel edges: a one-pixel mask at (y, x) gives [x, y, x+1, y+1]) of
    ``[N, H, W]`` masks, and a bool ``[N]`` saying which masks are non-empty (an empty mask gets a zero box)."""
    n, h, w = masks.shape
    rows, cols = masks.any(axis=2), masks.any(axis=1)
    nonempty = rows.any(axis=1)
    y1, y2 = rows.argmax(axis=1), h - rows[:, ::-1].argmax(axis=1)
    x1, x2 = cols.argmax(axis=1), w - cols[:, ::-1].argmax(axis=1)
    boxes = np.stack([x1, y1, x2, y2], axis=1).astype(np.float32).reshape(n, 4)
    boxes[~nonempty] = 0
    return boxes, nonempty


def _select(target: Target, keep: np.ndarray) -> Target:
    out = dict(target)
    for key in ("boxes", "labels", "masks"):
        if out.get(key) is not None:
            out[key] = out[key][keep]
    return out


def hflip_sample(image: np.ndarray, target: Target) -> tuple[np.ndarray, Target]:
    """Mirror left-right: x1' = W - x2 and x2' = W - x1 (pixel-edge coordinates, as mmdet 2.x's ``bbox_flip``)."""
    w = image.shape[1]
    out = dict(target)
    boxes = target["boxes"]
    out["boxes"] = np.stack([w - boxes[:, 2], boxes[:, 1], w - boxes[:, 0], boxes[:, 3]], axis=1).astype(np.float32)
    if target.get("masks") is not None:
        out["masks"] = target["masks"][:, :, ::-1]
    return image[:, ::-1], out


def resize_sample(image: np.ndarray, target: Target, size: tuple[int, int]) -> tuple[np.ndarray, Target]:
    """Resize to ``size`` (h, w): the image bilinearly (OpenCV's INTER_LINEAR geometry, see
    :func:`~inceptionnext.segmentation.data.resize_image`), masks by nearest neighbour at half-pixel centres (the
    same geometry, so a mask's tight box stays within half a pixel of its box), boxes scaled by (new_w / w,
    new_h / h) and clipped to the image, as mmdet's ``Resize`` does."""
    h, w = image.shape[:2]
    nh, nw = int(size[0]), int(size[1])
    if (h, w) == (nh, nw):
        return image, target
    out = dict(target)
    scale = np.array([nw / w, nh / h, nw / w, nh / h], np.float32)
    boxes = target["boxes"] * scale
    boxes[:, 0::2] = boxes[:, 0::2].clip(0, nw)
    boxes[:, 1::2] = boxes[:, 1::2].clip(0, nh)
    out["boxes"] = boxes.astype(np.float32)
    masks = target.get("masks")
    if masks is not None:
        rows = np.minimum(((np.arange(nh) + 0.5) * (h / nh)).astype(np.int64), h - 1)
        cols = np.minimum(((np.arange(nw) + 0.5) * (w / nw)).astype(np.int64), w - 1)
        out["masks"] = np.take(np.take(masks, rows, axis=1), cols, axis=2)
    return resize_image(image, (nh, nw)), out


def crop_sample(
    image: np.ndarray, target: Target, top: int, left: int, height: int, width: int, *, recompute_boxes: bool = True
) -> tuple[np.ndarray, Target]:
    """Crop ``[top:top+height, left:left+width]``; instances that the crop leaves empty are dropped (a crop may hold
    no instance at all: mmdet's ``allow_negative_crop=True``).

    Boxes are shifted and clipped to the crop as in mmdet's ``RandomCrop``. With ``recompute_boxes`` (and masks),
    each box is then the tight box of its cropped mask and an instance is kept when its mask keeps a pixel: a clipped
    box of a non-rectangular object can be far larger than what is left of it. mmdet's configs leave its
    ``recompute_bbox`` off; detectron2 turns it on for every mask model trained with crops (``DatasetMapper``:
    ``recompute_boxes = MASK_ON and CROP.ENABLED``), which this follows by default.
    """
    out = dict(target)
    boxes = target["boxes"] - np.array([left, top, left, top], np.float32)
    boxes[:, 0::2] = boxes[:, 0::2].clip(0, width)
    boxes[:, 1::2] = boxes[:, 1::2].clip(0, height)
    keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    out["boxes"] = boxes.astype(np.float32)
    masks = target.get("masks")
    if masks is not None:
        masks = masks[:, top : top + height, left : left + width]
        out["masks"] = masks
        if recompute_boxes:
            out["boxes"], keep = masks_to_boxes(masks)
    return image[top : top + height, left : left + width], _select(out, keep)


def _to_tensors(image: np.ndarray, target: Target) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """uint8 HxWx3 -> float 3xHxW in 0..1; numpy target -> tensors in torchvision's formats."""
    # numpy, not torch: a torch elementwise op on a busy 2-core machine can spin its thread pool for milliseconds
    pixels = np.ascontiguousarray(image.transpose(2, 0, 1), dtype=np.float32)
    img = torch.from_numpy(np.divide(pixels, 255.0, out=pixels))
    h, w = image.shape[:2]
    out: dict[str, torch.Tensor] = {
        "boxes": torch.from_numpy(np.ascontiguousarray(target["boxes"], np.float32)).reshape(-1, 4),
        "labels": torch.from_numpy(np.ascontiguousarray(target["labels"], np.int64)),
    }
    masks = target.get("masks")
    if masks is not None:
        out["masks"] = torch.from_numpy(np.ascontiguousarray(masks, np.uint8)).reshape(-1, h, w)
    out["image_id"] = torch.tensor(int(target["image_id"]), dtype=torch.int64)
    out["orig_size"] = torch.tensor(tuple(target["orig_size"]), dtype=torch.int64)
    return img, out


# --------------------------------------------------------------------------------------------------------------------
# pipelines
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainPipeline:
    """The COCO training pipelines of the reference configs, on uint8 HxWx3 images and numpy targets.

    ``policy="single"`` (mmdet ``configs/_base_/datasets/coco_instance.py``, the 1x schedule): ``Resize`` keep-ratio
    to ``scale`` = (1333, 800), i.e. short side 800 unless the long side would pass 1333, then ``RandomFlip`` 0.5.

    ``policy="mstrain"`` (the "mstrain 480-800" pipeline of Swin-T Mask R-CNN 1x and ConvNeXt-T Mask R-CNN 3x,
    Swin-Transformer-Object-Detection ``configs/swin/mask_rcnn_swin_tiny_patch4_window7_mstrain_480-800_adamw_1x_coco
    .py`` and facebookresearch/ConvNeXt ``object_detection/configs/convnext/
    mask_rcnn_convnext_tiny_patch4_window7_mstrain_480-800_adamw_3x_coco_in1k.py``): ``RandomFlip`` 0.5, then
    ``AutoAugment`` picking one of two policies with equal probability: (1) keep-ratio resize with the short side one
    of ``ms_short_sides`` (480, 512, ..., 800) and the long side at most ``max(scale)`` (1333); (2) keep-ratio resize
    with the short side one of ``crop_short_sides`` (400, 500, 600), ``RandomCrop`` of type ``absolute_range`` with
    ``crop_size`` (384, 600) (crop height and width each uniform in [384, 600], at most the image's; offset uniform;
    ``allow_negative_crop=True``), then the resize of policy 1.

    The operations run in the configs' order. :meth:`scaled` shrinks every size for small images (the embedded
    default).
    """

    policy: str = "single"
    flip: float = 0.5
    scale: tuple[int, int] = (1333, 800)
    ms_short_sides: tuple[int, ...] = COCO_MS_SHORT_SIDES
    crop_short_sides: tuple[int, ...] = (400, 500, 600)
    crop_size: tuple[int, int] = (384, 600)
    recompute_boxes: bool = True  # after a crop: see crop_sample

    POLICIES = ("single", "mstrain")

    def __post_init__(self) -> None:
        if self.policy not in self.POLICIES:
            raise ConfigError(f"detection train pipeline policy must be one of {self.POLICIES}, got {self.policy!r}")
        if not 0.0 <= self.flip <= 1.0:
            raise ConfigError(f"flip probability must be in [0, 1], got {self.flip}")
        sizes = (*self.scale, *self.ms_short_sides, *self.crop_short_sides, *self.crop_size)
        if min(sizes, default=0) < 1 or not self.ms_short_sides or not self.crop_short_sides:
            raise ConfigError(f"pipeline sizes must be positive integers, got {self}")
        if self.crop_size[0] > self.crop_size[1]:
            raise ConfigError(f"crop_size is a (min, max) range, got {self.crop_size}")

    def scaled(self, factor: float) -> TrainPipeline:
        """The same pipeline with every size multiplied by ``factor`` (rounded, at least 1 pixel)."""

        def s(values: Sequence[int]) -> tuple[int, ...]:
            return tuple(max(1, round(v * factor)) for v in values)

        return replace(
            self,
            scale=s(self.scale),
            ms_short_sides=s(self.ms_short_sides),
            crop_short_sides=s(self.crop_short_sides),
            crop_size=s(self.crop_size),
        )

    def _resize_short(
        self, image: np.ndarray, target: Target, sides: Sequence[int], rng: np.random.Generator
    ) -> tuple[np.ndarray, Target]:
        short = int(sides[int(rng.integers(len(sides)))])
        h, w = image.shape[:2]
        return resize_sample(image, target, rescale_size(h, w, (max(self.scale), short)))

    def __call__(
        self, image: np.ndarray, target: Target, rng: np.random.Generator
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if self.policy == "single":  # Resize, then RandomFlip
            h, w = image.shape[:2]
            image, target = resize_sample(image, target, rescale_size(h, w, self.scale))
            if rng.random() < self.flip:
                image, target = hflip_sample(image, target)
            return _to_tensors(image, target)
        if rng.random() < self.flip:  # RandomFlip, then AutoAugment
            image, target = hflip_sample(image, target)
        if rng.integers(2) == 0:  # policy 1
            image, target = self._resize_short(image, target, self.ms_short_sides, rng)
        else:  # policy 2: resize, absolute_range crop, resize
            image, target = self._resize_short(image, target, self.crop_short_sides, rng)
            h, w = image.shape[:2]
            lo, hi = self.crop_size
            ch = int(rng.integers(min(h, lo), min(h, hi) + 1))
            cw = int(rng.integers(min(w, lo), min(w, hi) + 1))
            top, left = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
            image, target = crop_sample(image, target, top, left, ch, cw, recompute_boxes=self.recompute_boxes)
            image, target = self._resize_short(image, target, self.ms_short_sides, rng)
        return _to_tensors(image, target)


@dataclass(frozen=True)
class EvalPipeline:
    """Evaluation: the original image, untouched (the model's transform resizes it, 800/1333 by default, and maps its
    predictions back to this size). Takes and ignores a generator so every pipeline has one signature."""

    def __call__(
        self, image: np.ndarray, target: Target, rng: np.random.Generator | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return _to_tensors(image, target)


def _sample_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The generator of one sample: a pure function of (seed, epoch, index), never of process or worker state."""
    return np.random.default_rng([0xDE7, seed % 2**64, epoch % 2**64, index])


def collate_detection(batch: Sequence[tuple[torch.Tensor, dict]]) -> tuple[list[torch.Tensor], list[dict]]:
    """(list of images, list of targets): detection images differ in size, so nothing is stacked."""
    images, targets = [], []
    for image, target in batch:
        images.append(image)
        targets.append(target)
    return images, targets


class _DetectionDataset(Dataset):
    """What both datasets share: class names and COCO category ids in label order, the ground truth as a
    ``pycocotools.coco.COCO``, epochs, and seeded pipelines. Subclasses provide ``load(index)``."""

    classes: tuple[str, ...] = ()
    cat_ids: tuple[int, ...] = ()
    has_masks: bool = True
    pipeline: Callable | None = None
    seed: int = 0
    epoch: int = 0

    @property
    def num_classes(self) -> int:
        """Object classes, without the background (torchvision's detectors take ``num_classes + 1``)."""
        return len(self.classes)

    def set_epoch(self, epoch: int) -> None:
        """Select the augmentation draw of ``epoch`` (call before each epoch, like a DistributedSampler)."""
        self.epoch = epoch

    def load(self, index: int) -> tuple[np.ndarray, Target]:  # pragma: no cover - abstract
        raise NotImplementedError

    def load_sample(self, epoch: int, index: int) -> tuple[np.ndarray, Target]:
        """The image and target of ``index`` in ``epoch``, before the pipeline (the same every epoch unless a
        dataset draws its samples per epoch)."""
        return self.load(index)

    def __len__(self) -> int:  # pragma: no cover - abstract
        raise NotImplementedError

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """A sample by index, or by ``(epoch, index)`` as :class:`~inceptionnext.data.EpochIndices` yields them (so
        persistent loader workers, whose copy never sees :meth:`set_epoch`, still draw the right epoch)."""
        epoch, index = key if isinstance(key, tuple) else (self.epoch, key)
        n = len(self)
        if index < 0:
            index += n
        if not 0 <= index < n:
            raise IndexError(f"index {index} out of range for a dataset of {n} samples")
        image, target = self.load_sample(epoch, index)
        pipeline = self.pipeline if self.pipeline is not None else EvalPipeline()
        return pipeline(image, target, _sample_rng(self.seed, epoch, index))


def _quiet_coco(dataset: dict) -> Any:
    """A ``pycocotools.coco.COCO`` built in memory from a parsed instances dict (its index prints; silenced)."""
    from pycocotools.coco import COCO

    coco = COCO()
    coco.dataset = dataset
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def _mask_api() -> Any:
    try:
        import pycocotools.mask as mask_api
    except ImportError as e:  # pragma: no cover - pycocotools is a dependency of detection
        raise DataError("COCO masks need pycocotools: pip install 'inceptionnext[detection]'") from e
    return mask_api


# --------------------------------------------------------------------------------------------------------------------
# COCO
# --------------------------------------------------------------------------------------------------------------------


def _valid_polygon(poly: Any) -> bool:
    """A flat [x0, y0, x1, y1, ...] list of at least 3 finite points enclosing a positive (shoelace) area."""
    if not isinstance(poly, list) or len(poly) < 6 or len(poly) % 2:
        return False
    try:
        a = np.asarray(poly, dtype=np.float64)
    except (TypeError, ValueError):
        return False
    if a.ndim != 1 or not np.isfinite(a).all():
        return False
    x, y = a[0::2], a[1::2]
    twice_area = np.dot(x[:-1], y[1:]) - np.dot(x[1:], y[:-1]) + x[-1] * y[0] - x[0] * y[-1]
    return abs(float(twice_area)) > 0


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


class CocoDetectionDataset(_DetectionDataset):
    """A COCO instances JSON and its image folder, checked up front so a bad file fails at start-up.

    Errors (:class:`~inceptionnext.data.DataError`, naming the file, the first offending ids and the counts): a
    missing or unparsable annotation file, missing image files, duplicate ids, annotations of unknown images or
    categories, boxes outside their image by more than 1 pixel, and, for the annotations that training uses, empty
    masks (an empty polygon list or an RLE without a pixel), polygons that are degenerate (fewer than 3 points, or
    zero area) and RLEs of the wrong size. A polygon list that mixes valid and degenerate parts keeps its valid parts
    for training (counted, as detectron2 filters them). ``strict=False`` turns the per-annotation errors (boxes
    outside, broken masks) into counted omissions from training.

    Left out of training, with a printed count, never silently: boxes narrower or lower than 1 pixel, or without
    area inside the image (mmdet's ``CocoDataset._parse_ann_info`` rule); crowd regions (kept in :attr:`coco`, where
    COCOeval ignores detections matched to them); and, with ``train=True``, images left without any usable
    annotation (as torchvision's and mmdet's COCO training do). Evaluation (``train=False``) keeps every image.

    A file where no annotation has a ``segmentation`` is a box-only dataset: ``has_masks`` is False and targets carry
    no ``masks`` (train Faster R-CNN or RetinaNet on it, evaluate with ``iou_types=("bbox",)``).
    """

    def __init__(
        self,
        image_dir: str | os.PathLike,
        ann_file: str | os.PathLike,
        pipeline: Callable | None = None,
        *,
        train: bool,
        seed: int = 0,
        strict: bool = True,
        log: Callable[[str], None] | None = None,
    ) -> None:
        self.image_dir, self.ann_file = Path(image_dir), Path(ann_file)
        self.pipeline, self.train, self.seed, self.epoch = pipeline, train, seed, 0
        self.log = log or _stderr
        self.strict = strict
        self.counts: dict[str, int] = {}
        data = self._read_json()
        self._check_categories(data)
        self.images = self._check_images(data)
        usable = self._check_annotations(data)
        if train:
            ids = [i for i in sorted(self.images) if usable.get(i)]
            if len(ids) < len(self.images):
                self._note("images_without_annotations", len(self.images) - len(ids), "training images without any "
                           "usable annotation skipped (as torchvision's and mmdet's COCO training do)")  # fmt: skip
            if not ids:
                raise DataError(f"{self.ann_file}: no training image has a usable annotation")
        else:
            ids = sorted(self.images)
        self.ids: list[int] = ids
        self.annotations: dict[int, list[dict]] = {i: usable.get(i, []) for i in ids}
        self.coco = _quiet_coco(data)

    # ---- checks ----------------------------------------------------------------------------------------------------

    def _note(self, key: str, n: int, what: str) -> None:
        self.counts[key] = self.counts.get(key, 0) + n
        if n:
            self.log(f"{self.ann_file.name}: {n} {what}")

    def _fail(self, problems: list[str]) -> None:
        if problems:
            raise DataError(f"{self.ann_file}: " + " | ".join(problems))

    def _read_json(self) -> dict:
        if not self.ann_file.is_file():
            raise DataError(f"annotation file not found: {self.ann_file} (a COCO instances JSON)")
        if not self.image_dir.is_dir():
            raise DataError(f"image folder not found: {self.image_dir} (the images of {self.ann_file.name})")
        try:
            with open(self.ann_file, "rb") as f:
                data = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DataError(f"{self.ann_file} is not valid JSON: {e}") from e
        missing = [k for k in ("images", "annotations", "categories") if not isinstance(data, dict) or k not in data]
        if missing:
            raise DataError(f"{self.ann_file} is not a COCO instances file: no {', '.join(repr(k) for k in missing)}")
        return data

    def _check_categories(self, data: dict) -> None:
        cats = data["categories"]
        bad = [str(c) for c in cats if not isinstance(c, dict) or not isinstance(c.get("id"), int)]
        ids = [c["id"] for c in cats if isinstance(c, dict) and isinstance(c.get("id"), int)]
        dup = sorted({i for i in ids if ids.count(i) > 1}) if len(set(ids)) < len(ids) else []
        problems = []
        if bad:
            problems.append(f"{len(bad)} categor(ies) without an integer id: {_first(bad)}")
        if dup:
            problems.append(f"duplicate category ids {dup[:10]}")
        if not ids and not bad:
            problems.append("no categories")
        self._fail(problems)
        by_id = {c["id"]: c for c in cats}
        self.cat_ids = tuple(sorted(by_id))
        self.classes = tuple(str(by_id[i].get("name", i)) for i in self.cat_ids)
        self.label_of = {cid: label for label, cid in enumerate(self.cat_ids, start=1)}

    def _check_images(self, data: dict) -> dict[int, dict]:
        images: dict[int, dict] = {}
        bad, dup = [], []
        for im in data["images"]:
            ok = (
                isinstance(im, dict)
                and isinstance(im.get("id"), int)
                and isinstance(im.get("file_name"), str)
                and all(isinstance(im.get(k), int) and im[k] > 0 for k in ("width", "height"))
            )
            if not ok:
                bad.append(str(im)[:120])
            elif im["id"] in images:
                dup.append(str(im["id"]))
            else:
                images[im["id"]] = im
        problems = []
        if bad:
            problems.append(f"{len(bad)} image entr(ies) without integer id, file_name or positive width/height: "
                            f"{_first(bad)}")  # fmt: skip
        if dup:
            problems.append(f"{len(dup)} duplicate image id(s): {_first(dup, 10)}")
        self._fail(problems)
        missing = [
            im["file_name"] for i, im in sorted(images.items()) if not (self.image_dir / im["file_name"]).is_file()
        ]
        if missing:
            raise DataError(f"{len(missing)} image file(s) of {self.ann_file.name} missing from {self.image_dir}: "
                            f"{_first(missing, 10)}")  # fmt: skip
        if not images:
            raise DataError(f"{self.ann_file}: no images")
        return images

    def _check_annotations(self, data: dict) -> dict[int, list[dict]]:
        """Check every annotation; return image id -> the annotations that training uses (with a ``_parts`` key
        holding the valid polygons where some parts were left out)."""
        mask_api = _mask_api()
        anns = data["annotations"]
        found: dict[str, list[str]] = {}
        fatal = ("not_dict", "unknown_image", "unknown_category", "bad_box", "missing_segmentation", "duplicate_id",
                 "crowd_rle_size")  # fmt: skip

        def flag(kind: str, ann: Any, detail: str = "") -> None:
            ref = f"ann {ann.get('id')} (image {ann.get('image_id')})" if isinstance(ann, dict) else str(ann)[:80]
            found.setdefault(kind, []).append(ref + (f" {detail}" if detail else ""))

        with_seg = sum(1 for a in anns if isinstance(a, dict) and not a.get("iscrowd") and "segmentation" in a)
        self.has_masks = with_seg > 0 or not anns
        usable: dict[int, list[dict]] = {}
        ann_ids: set = set()
        crowd = degenerate = parts_left_out = no_area = 0
        for ann in anns:
            if not isinstance(ann, dict):
                flag("not_dict", ann)
                continue
            if ann.get("id") in ann_ids:
                flag("duplicate_id", ann)
            ann_ids.add(ann.get("id"))
            im = self.images.get(ann.get("image_id"))
            if im is None:
                flag("unknown_image", ann)
                continue
            if ann.get("category_id") not in self.label_of:
                flag("unknown_category", ann, f"category_id {ann.get('category_id')!r}")
                continue
            box = ann.get("bbox")
            if not (isinstance(box, list) and len(box) == 4 and all(_is_number(v) for v in box)) or min(box[2:]) < 0:
                flag("bad_box", ann, f"bbox {box!r}")
                continue
            W, H = im["width"], im["height"]  # noqa: N806
            x, y, w, h = box
            t = BOX_TOLERANCE
            if x < -t or y < -t or x + w > W + t or y + h > H + t:
                flag("outside", ann, f"bbox [x, y, w, h] = {box} in a {W}x{H} (WxH) image")
                continue
            if "area" not in ann:  # COCOeval sorts ground truth into small/medium/large by it
                no_area += 1
                ann["area"] = float(w * h)
            ann.setdefault("iscrowd", 0)
            if ann["iscrowd"]:
                crowd += 1
                seg = ann.get("segmentation")
                if isinstance(seg, dict) and list(seg.get("size", ())) != [H, W]:  # COCOeval would fail on it
                    flag("crowd_rle_size", ann, f"RLE size {seg.get('size')} for a {H}x{W} (HxW) image")
                continue
            inter_w = min(x + w, W) - max(x, 0)
            inter_h = min(y + h, H) - max(y, 0)
            if w < 1 or h < 1 or inter_w <= 0 or inter_h <= 0:
                degenerate += 1
                continue
            if self.has_masks:
                seg = ann.get("segmentation")
                if seg is None:
                    flag("missing_segmentation", ann)
                    continue
                problem, parts = self._check_segmentation(seg, H, W, mask_api)
                if problem:
                    flag(problem, ann)
                    continue
                if parts is not None:
                    parts_left_out += len(seg) - len(parts)
                    ann = {**ann, "_parts": parts}
            usable.setdefault(ann["image_id"], []).append(ann)
        labels = {
            "not_dict": "annotation(s) that are not objects",
            "duplicate_id": "duplicate annotation id(s)",
            "unknown_image": "annotation(s) of unknown image ids",
            "unknown_category": "annotation(s) with unknown category ids (not in 'categories')",
            "bad_box": "annotation(s) without a valid bbox [x, y, w, h] (4 finite numbers, w, h >= 0)",
            "outside": f"box(es) outside the image (by more than {BOX_TOLERANCE:g} pixel)",
            "missing_segmentation": "annotation(s) without 'segmentation' in a file where others have one",
            "empty_mask": "empty mask(s) (no polygon, or an RLE without a pixel)",
            "degenerate_polygon": "degenerate polygon(s) (fewer than 3 points, or zero area)",
            "rle_size": "RLE mask(s) whose size is not the image's",
            "crowd_rle_size": "crowd region RLE(s) whose size is not the image's",
            "bad_segmentation": "segmentation(s) that are neither polygon lists nor RLE dicts",
        }
        hard = {k: v for k, v in found.items() if self.strict or k in fatal}
        problems = [f"{len(v)} {labels[k]}: {_first(v)}" for k, v in hard.items()]
        if problems:
            hint = "" if set(hard) <= set(fatal) else " (strict=False leaves such annotations out of training instead)"
            self._fail([*problems[:-1], problems[-1] + hint])
        for k, v in found.items():  # only with strict=False: what is left are per-annotation problems
            self._note(k, len(v), f"{labels[k]} left out of training, e.g. {v[0]}")
        self._note("crowd", crowd, "crowd region(s) kept in the ground truth and left out of training targets")
        self._note("degenerate_boxes", degenerate, "box(es) narrower or lower than 1 pixel left out of training")
        self._note("polygon_parts_left_out", parts_left_out, "degenerate polygon part(s) left out of training masks")
        self._note("missing_area", no_area, "annotation(s) without 'area' given their box area for COCOeval")
        if not self.has_masks:
            self.log(f"{self.ann_file.name}: no annotation has a segmentation: box-only dataset, no masks")
        return usable

    @staticmethod
    def _check_segmentation(seg: Any, h: int, w: int, mask_api: Any) -> tuple[str | None, list | None]:
        """(problem kind or None, the valid polygon parts when some were left out, else None)."""
        if isinstance(seg, list):
            if not seg:
                return "empty_mask", None
            parts = [p for p in seg if _valid_polygon(p)]
            if not parts:
                return "degenerate_polygon", None
            return None, (parts if len(parts) < len(seg) else None)
        if isinstance(seg, dict):
            if list(seg.get("size", ())) != [h, w]:
                return "rle_size", None
            counts = seg.get("counts")
            try:
                if isinstance(counts, list):
                    area = sum(counts[1::2])  # uncompressed RLE: runs alternate 0s, 1s, 0s, ...
                elif isinstance(counts, (str, bytes)):
                    raw = counts.encode("ascii") if isinstance(counts, str) else counts
                    area = int(mask_api.area({"size": [h, w], "counts": raw}))
                else:
                    return "bad_segmentation", None
            except (TypeError, ValueError, UnicodeEncodeError):
                return "bad_segmentation", None
            return ("empty_mask" if area <= 0 else None), None
        return "bad_segmentation", None

    # ---- samples ---------------------------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.ids)

    def _decode(self, ann: dict, h: int, w: int, mask_api: Any) -> np.ndarray:
        seg = ann.get("_parts", ann["segmentation"])
        if isinstance(seg, list):
            rle = mask_api.merge(mask_api.frPyObjects(seg, h, w))
        elif isinstance(seg["counts"], list):
            rle = mask_api.frPyObjects(seg, h, w)
        else:
            rle = seg
        return mask_api.decode(rle)

    def load(self, index: int) -> tuple[np.ndarray, Target]:
        """(uint8 HxWx3 RGB image, numpy target: the usable annotations of image ``self.ids[index]``)."""
        image_id = self.ids[index]
        info = self.images[image_id]
        path = self.image_dir / info["file_name"]
        try:
            image = np.array(read_image(path))
        except ImageError as e:
            cause = e.__cause__ or e
            raise DataError(f"cannot read image {path}: {type(cause).__name__}: {cause}") from e
        h, w = image.shape[:2]
        if (h, w) != (info["height"], info["width"]):
            raise DataError(
                f"{path} is {w}x{h} (WxH) but {self.ann_file.name} says {info['width']}x{info['height']} "
                f"(image id {image_id})"
            )
        anns = self.annotations[image_id]
        boxes = np.array([a["bbox"] for a in anns], np.float32).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]
        boxes[:, 0::2] = boxes[:, 0::2].clip(0, w)
        boxes[:, 1::2] = boxes[:, 1::2].clip(0, h)
        target: Target = {
            "boxes": boxes,
            "labels": np.array([self.label_of[a["category_id"]] for a in anns], np.int64),
            "image_id": image_id,
            "orig_size": (h, w),
        }
        if self.has_masks:
            mask_api = _mask_api()
            masks = np.zeros((len(anns), h, w), np.uint8)
            for i, a in enumerate(anns):
                masks[i] = self._decode(a, h, w, mask_api)
            target["masks"] = masks
        return image, target


# --------------------------------------------------------------------------------------------------------------------
# embedded default: handwritten digits on real photographs
# --------------------------------------------------------------------------------------------------------------------

#: scikit-image's bundled photographs used as backgrounds (no text or coins: they would look like digits)
PHOTOS: tuple[str, ...] = (
    "astronaut",
    "camera",
    "chelsea",
    "coffee",
    "rocket",
    "brick",
    "grass",
    "gravel",
    "moon",
    "immunohistochemistry",
    "hubble_deep_field",
)


class Composite(NamedTuple):
    """One generated composite and how it was made (for inspection and tests).

    ``instances[k]`` = (label 1..10, top, left, ink) places the bool ``ink`` mask (its tight box) at (top, left);
    ``digits[k]`` is the index in scikit-learn's ``load_digits`` of the digit drawn; ``background`` = (photo name,
    top, left, height, width) is the photo region resized to the image.
    """

    image: np.ndarray
    instances: list[tuple[int, int, int, np.ndarray]]
    digits: list[int]
    background: tuple[str, int, int, int, int]


@functools.lru_cache(maxsize=1)
def _digit_bank() -> tuple[np.ndarray, np.ndarray]:
    """(float32 [1797, 8, 8] digits in 0..1, int64 [1797] digit values) from scikit-learn's bundled set."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:  # pragma: no cover - scikit-learn is a dependency of the default data
        raise DataError(
            "the embedded digit composites need scikit-learn: pip install 'inceptionnext[detection]'"
        ) from e
    digits = load_digits()
    return (digits.images / 16.0).astype(np.float32), digits.target.astype(np.int64)


@functools.lru_cache(maxsize=1)
def _photo_bank() -> dict[str, np.ndarray]:
    """name -> uint8 HxWx3 photograph (grey ones stacked to RGB)."""
    try:
        import skimage.data
    except ImportError as e:  # pragma: no cover - scikit-image is a dependency of the default data
        raise DataError(
            "the embedded digit composites need scikit-image: pip install 'inceptionnext[detection]'"
        ) from e
    bank = {}
    for name in PHOTOS:
        img = np.asarray(getattr(skimage.data, name)())
        bank[name] = np.ascontiguousarray(np.repeat(img[:, :, None], 3, axis=2) if img.ndim == 2 else img[..., :3])
    return bank


def digit_split(split: str) -> np.ndarray:
    """Indices of ``load_digits`` images a split draws from: every fifth image (index % 5 == 0, 360 digits) is
    held out for val, the other 1,437 are train's."""
    n = len(_digit_bank()[1])
    every_fifth = np.arange(n) % 5 == 0
    return np.flatnonzero(every_fifth if split == "val" else ~every_fifth)


def photo_regions(split: str, h: int, w: int) -> list[tuple[int, int, int, int]]:
    """(top, left, height, width) regions of an ``h`` x ``w`` photograph a split's backgrounds are cropped from:
    val owns the bottom-right quadrant, train the top half and the left half (never a val pixel)."""
    if split == "val":
        return [(h // 2, w // 2, h - h // 2, w - w // 2)]
    return [(0, 0, h // 2, w), (0, 0, h, w // 2)]


def make_composite(
    split: str,
    rng: np.random.Generator,
    *,
    size: tuple[int, int] = (128, 160),
    num_digits: tuple[int, int] = (2, 5),
    digit_size: tuple[int, int] = (16, 40),
    max_tries: int = 30,
) -> Composite:
    """One composite: a crop of a photograph from the split's region (aspect ratio of the image, 60-100% of the
    largest crop that fits), resized bilinearly to a random h x w in ``size``; then ``num_digits`` digits of the
    split, each upscaled bicubically from 8x8 to a random height in ``digit_size`` (width 70-100% of it) and pasted
    where its square does not overlap another's (no overlap at all: each mask is its whole digit; a digit that finds
    no free place in ``max_tries`` draws is not drawn).

    A digit is alpha-blended in an ink that contrasts with the background it covers (dark ink on a light region,
    light on a dark one, at least 90 grey levels away, slightly tinted); its alpha ramps from 0 to 1 over the
    upscaled grey levels 0.25-0.55 (of 1), so the faint haze that ``load_digits`` has around many digits is not
    drawn. Its mask is its ink: the pixels of alpha >= 0.5; the fainter rim is drawn but not labelled, as an
    annotator's outline would leave it. Boxes are the masks' tight boxes.
    """
    digit_images, digit_values = _digit_bank()
    photos = _photo_bank()
    pool = digit_split(split)
    h = int(rng.integers(size[0], size[1] + 1))
    w = int(rng.integers(size[0], size[1] + 1))
    name = PHOTOS[int(rng.integers(len(PHOTOS)))]
    photo = photos[name]
    regions = photo_regions(split, *photo.shape[:2])
    areas = np.array([rh * rw for _, _, rh, rw in regions], np.float64)
    r_top, r_left, rh, rw = regions[int(rng.choice(len(regions), p=areas / areas.sum()))]
    k = min(rh / h, rw / w) * float(rng.uniform(0.6, 1.0))
    ch, cw = min(rh, max(1, round(k * h))), min(rw, max(1, round(k * w)))
    top, left = r_top + int(rng.integers(0, rh - ch + 1)), r_left + int(rng.integers(0, rw - cw + 1))
    image = resize_image(photo[top : top + ch, left : left + cw], (h, w)).astype(np.float32)
    placed: list[tuple[int, int, int, int]] = []
    instances, digits = [], []
    for _ in range(int(rng.integers(num_digits[0], num_digits[1] + 1))):
        idx = int(pool[int(rng.integers(len(pool)))])
        dh = int(rng.integers(digit_size[0], min(digit_size[1], h) + 1))
        dw = min(w, max(8, round(dh * float(rng.uniform(0.7, 1.0)))))
        for _ in range(max_tries):
            y0, x0 = int(rng.integers(0, h - dh + 1)), int(rng.integers(0, w - dw + 1))
            if all(y0 >= y2 or y0 + dh <= y1 or x0 >= x2 or x0 + dw <= x1 for y1, x1, y2, x2 in placed):
                break
        else:
            continue
        placed.append((y0, x0, y0 + dh, x0 + dw))
        src = torch.from_numpy(digit_images[idx])[None, None]
        level = F.interpolate(src, size=(dh, dw), mode="bicubic", align_corners=False)[0, 0].numpy()
        alpha = np.clip((level - 0.25) / 0.3, 0.0, 1.0)  # the faint 1-4 of 16 grey levels around a digit: no ink
        ink = alpha >= 0.5
        region = image[y0 : y0 + dh, x0 : x0 + dw]
        lum = float((region.mean(axis=2) * alpha).sum() / max(alpha.sum(), 1e-6))
        grey = rng.uniform(0, max(lum - 90, 0)) if lum >= 128 else rng.uniform(min(lum + 90, 255), 255)
        colour = np.clip(grey + rng.uniform(-20, 20, size=3), 0, 255).astype(np.float32)
        region[...] = region * (1 - alpha[..., None]) + colour * alpha[..., None]
        x1, y1, x2, y2 = (int(v) for v in masks_to_boxes(ink[None])[0][0])
        instances.append((int(digit_values[idx]) + 1, y0 + y1, x0 + x1, ink[y1:y2, x1:x2]))
        digits.append(idx)
    return Composite(np.clip(image + 0.5, 0, 255).astype(np.uint8), instances, digits, (name, top, left, ch, cw))


@functools.lru_cache(maxsize=4)
def _composites(
    split: str,
    num_images: int,
    size: tuple[int, int],
    num_digits: tuple[int, int],
    digit_size: tuple[int, int],
    seed: int,
) -> tuple[Composite, ...]:
    """The composites of a split, generated once per process (a few hundred take about a second)."""
    out = []
    for index in range(num_images):
        key = [0xD161, 1, index] if split == "val" else [0xD161, 0, seed % 2**64, index]
        rng = np.random.default_rng(key)
        out.append(make_composite(split, rng, size=size, num_digits=num_digits, digit_size=digit_size))
    return tuple(out)


class DigitComposites(_DetectionDataset):
    """The embedded default: scikit-learn's handwritten digits pasted on scikit-image's photographs (see
    :func:`make_composite`), 10 classes "0".."9" with COCO category ids 1..10, exact boxes and masks, so detection
    trains and is evaluated with COCO's metrics without any download.

    The split is fixed and held out twice over: val digits come from the ``load_digits`` images of index % 5 == 0
    and train digits from the others (:func:`digit_split`); val backgrounds are cropped from the bottom-right quadrant
    of each photograph, train backgrounds from its top and left halves (:func:`photo_regions`). The val composites
    depend only on their index, so val numbers of different runs (and seeds) are comparable. The train composites are
    drawn from ``seed``: with ``fresh=False`` the same ``num_images`` every epoch (the pipeline's flips, resizes and
    crops still vary); with ``fresh=True`` (the training default) epoch ``e`` draws its own ``num_images``
    composites from (seed, e, index), so training never sees the same composite twice and a resumed epoch sees the
    same ones again. Epoch 0 is the fixed set either way (``composites``, ``coco``).
    """

    classes: tuple[str, ...] = tuple(str(d) for d in range(10))
    cat_ids: tuple[int, ...] = tuple(range(1, 11))
    DEFAULT_NUM_IMAGES = {"train": 400, "val": 100}

    def __init__(
        self,
        split: str = "train",
        *,
        num_images: int | None = None,
        size: tuple[int, int] = (128, 160),
        num_digits: tuple[int, int] = (2, 5),
        digit_size: tuple[int, int] = (16, 40),
        pipeline: Callable | None = None,
        seed: int = 0,
        fresh: bool = False,
    ) -> None:
        if split not in self.DEFAULT_NUM_IMAGES:
            raise DataError(f"digit composites split must be 'train' or 'val', got {split!r}")
        n = self.DEFAULT_NUM_IMAGES[split] if num_images is None else int(num_images)
        if n < 1:
            raise DataError(f"num_images must be positive, got {num_images}")
        if not 16 <= size[0] <= size[1] or not 8 <= digit_size[0] <= digit_size[1] or num_digits[0] < 1:
            raise DataError(f"bad composite sizes: size {size}, digit_size {digit_size}, num_digits {num_digits}")
        if fresh and split != "train":
            raise DataError("fresh composites are for training: the val split is fixed so that runs compare")
        self.split, self.train, self.fresh = split, split == "train", fresh
        self.pipeline, self.seed, self.epoch = pipeline, seed, 0
        self._draw = {"size": tuple(size), "num_digits": tuple(num_digits), "digit_size": tuple(digit_size)}
        gen_seed = seed if split == "train" else 0
        self.composites = _composites(split, n, tuple(size), tuple(num_digits), tuple(digit_size), gen_seed)
        self.coco = _quiet_coco(self.coco_dict())

    def __len__(self) -> int:
        return len(self.composites)

    def composite(self, epoch: int, index: int) -> Composite:
        """Composite ``index`` of ``epoch``: of the fixed set, or (``fresh``, epoch > 0) drawn for this epoch."""
        if not self.fresh or epoch == 0:
            return self.composites[index]
        rng = np.random.default_rng([0xD161, 2, self.seed % 2**64, epoch % 2**64, index])
        return make_composite(self.split, rng, **self._draw)

    def full_masks(self, index: int, composite: Composite | None = None) -> np.ndarray:
        """uint8 ``[N, H, W]`` masks of composite ``index`` (of the fixed set, or ``composite``)."""
        c = self.composites[index] if composite is None else composite
        h, w = c.image.shape[:2]
        masks = np.zeros((len(c.instances), h, w), np.uint8)
        for k, (_, top, left, ink) in enumerate(c.instances):
            masks[k, top : top + ink.shape[0], left : left + ink.shape[1]] = ink
        return masks

    def coco_dict(self) -> dict:
        """The split's ground truth as a COCO instances dict (masks as compressed RLE with str counts)."""
        mask_api = _mask_api()
        images, annotations = [], []
        for index, c in enumerate(self.composites):
            h, w = c.image.shape[:2]
            images.append({"id": index + 1, "file_name": f"{index:06d}.png", "height": h, "width": w})
            masks = self.full_masks(index)
            rles = mask_api.encode(np.asfortranarray(masks.transpose(1, 2, 0))) if len(masks) else []
            for (label, top, left, ink), rle in zip(c.instances, rles):
                annotations.append({
                    "id": len(annotations) + 1,
                    "image_id": index + 1,
                    "category_id": self.cat_ids[label - 1],
                    "bbox": [float(left), float(top), float(ink.shape[1]), float(ink.shape[0])],
                    "area": float(ink.sum()),
                    "iscrowd": 0,
                    "segmentation": {"size": [h, w], "counts": rle["counts"].decode("ascii")},
                })  # fmt: skip
        categories = [
            {"id": cid, "name": name, "supercategory": "digit"} for cid, name in zip(self.cat_ids, self.classes)
        ]
        info = {"description": f"inceptionnext digit composites, {self.split} split (seed {self.seed})"}
        return {"info": info, "images": images, "annotations": annotations, "categories": categories}

    def load(self, index: int) -> tuple[np.ndarray, Target]:
        return self.load_sample(0, index)

    def load_sample(self, epoch: int, index: int) -> tuple[np.ndarray, Target]:
        c = self.composite(epoch, index)
        h, w = c.image.shape[:2]
        boxes = [(left, top, left + ink.shape[1], top + ink.shape[0]) for _, top, left, ink in c.instances]
        target: Target = {
            "boxes": np.array(boxes, np.float32).reshape(-1, 4),
            "labels": np.array([label for label, *_ in c.instances], np.int64),
            "masks": self.full_masks(index, c),
            "image_id": index + 1,
            "orig_size": (h, w),
        }
        return c.image, target


def build_det_dataset(
    data: str | os.PathLike | None,
    split: str,
    pipeline: Callable | None,
    *,
    seed: int = 0,
    log: Callable[[str], None] | None = None,
    fresh: bool = False,
) -> CocoDetectionDataset | DigitComposites:
    """``data=None``: the embedded digit composites (``fresh``: new training composites every epoch); otherwise a
    COCO 2017 folder (``annotations/instances_{split}2017.json`` and ``{split}2017/``). ``split`` is "train" or "val";
    the train split leaves out images without a usable annotation, val keeps them all."""
    if split not in ("train", "val"):
        raise DataError(f"split must be 'train' or 'val', got {split!r}")
    if data is None:
        return DigitComposites(split, pipeline=pipeline, seed=seed, fresh=fresh and split == "train")
    root = Path(data)
    ann_file, image_dir = root / "annotations" / f"instances_{split}2017.json", root / f"{split}2017"
    layout = f"expected {ann_file} and the images in {image_dir}/ (COCO 2017 layout)"
    if not root.is_dir():
        raise DataError(f"detection data folder not found: {root}; {layout}")
    missing = [str(p) for p in (ann_file, image_dir) if not p.exists()]
    if missing:
        raise DataError(f"{root} is not a COCO folder: {', '.join(missing)} missing; {layout}")
    return CocoDetectionDataset(image_dir, ann_file, pipeline, train=split == "train", seed=seed, log=log)


def write_composites_coco(
    out_dir: str | os.PathLike,
    *,
    num_train: int | None = None,
    num_val: int | None = None,
    size: tuple[int, int] = (128, 160),
    seed: int = 0,
) -> Path:
    """Write the embedded composites as a COCO 2017 folder (``annotations/instances_{train,val}2017.json``,
    ``train2017/``, ``val2017/``, PNG images) that :func:`build_det_dataset` reads back. ``out_dir`` must be new or
    empty: nothing is overwritten."""
    from PIL import Image

    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DataError(f"refusing to write the composites into {out}: it is not an empty folder (nothing is "
                        "overwritten; give a new path)")  # fmt: skip
    (out / "annotations").mkdir(parents=True, exist_ok=True)
    for split, n in (("train", num_train), ("val", num_val)):
        ds = DigitComposites(split, num_images=n, size=size, seed=seed)
        folder = out / f"{split}2017"
        folder.mkdir()
        gt = ds.coco.dataset
        for im, c in zip(gt["images"], ds.composites):
            Image.fromarray(c.image).save(folder / im["file_name"])
        with open(out / "annotations" / f"instances_{split}2017.json", "w") as f:
            json.dump(gt, f)
    return out
