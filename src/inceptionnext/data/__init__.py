from .datasets import (
    DataError,
    DigitsDataset,
    ImageFolderDataset,
    ReadableBatches,
    SeededTransform,
    UnreadableImage,
    build_dataset,
    collate_readable,
)
from .images import IMAGE_SUFFIXES, ImageError, read_image
from .transforms import build_transform, eval_preprocessing

__all__ = [
    "DataError",
    "DigitsDataset",
    "IMAGE_SUFFIXES",
    "ImageError",
    "ImageFolderDataset",
    "ReadableBatches",
    "SeededTransform",
    "UnreadableImage",
    "build_dataset",
    "build_transform",
    "collate_readable",
    "eval_preprocessing",
    "read_image",
]
