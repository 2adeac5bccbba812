from .datasets import (
    DataError,
    DigitsDataset,
    EpochIndices,
    ImageFolderDataset,
    ReadableBatches,
    SeededTransform,
    UnreadableImage,
    collate_readable,
)
from .images import IMAGE_SUFFIXES, ImageError, read_image
from .streams import HFImageDataset, ShardStream, build_dataset, pack_image_folder
from .transforms import batch_erasing, build_transform, eval_preprocessing

__all__ = [
    "DataError",
    "DigitsDataset",
    "EpochIndices",
    "HFImageDataset",
    "IMAGE_SUFFIXES",
    "ImageError",
    "ImageFolderDataset",
    "ReadableBatches",
    "SeededTransform",
    "ShardStream",
    "UnreadableImage",
    "build_dataset",
    "batch_erasing",
    "build_transform",
    "collate_readable",
    "eval_preprocessing",
    "pack_image_folder",
    "read_image",
]
