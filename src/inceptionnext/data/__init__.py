from .datasets import DataError, DigitsDataset, ImageFolderDataset, SeededTransform, build_dataset
from .transforms import build_transform, eval_preprocessing

__all__ = [
    "DataError",
    "DigitsDataset",
    "ImageFolderDataset",
    "SeededTransform",
    "build_dataset",
    "build_transform",
    "eval_preprocessing",
]
