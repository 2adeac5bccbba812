"""Semantic segmentation metrics from a confusion matrix: aAcc, mIoU, mAcc and per-class IoU/Acc (in %).

Conventions of the ADE20K benchmark as mmseg reports it: pixels labelled ``ignore_index`` do not count; a class
absent from both the ground truth and the predictions has an undefined IoU and is left out of the mean (nan-mean);
a class absent from the ground truth has an undefined accuracy.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["ConfusionMatrix"]


class ConfusionMatrix:
    """``matrix[t, p]`` counts pixels of true class ``t`` predicted as ``p``."""

    def __init__(self, num_classes: int, ignore_index: int = 255, device: torch.device | str = "cpu") -> None:
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.matrix = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        if pred.shape != target.shape:
            raise ValueError(f"prediction {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape")
        keep = target != self.ignore_index
        t, p = target[keep].long(), pred[keep].long()
        if t.numel() and (t.min() < 0 or t.max() >= self.num_classes):
            raise ValueError(f"target labels outside 0..{self.num_classes - 1} (and ignore {self.ignore_index})")
        idx = t * self.num_classes + p
        self.matrix += torch.bincount(idx, minlength=self.num_classes**2).reshape(self.num_classes, self.num_classes)

    def all_reduce(self) -> None:
        if torch.distributed.is_initialized():
            torch.distributed.all_reduce(self.matrix)

    def compute(self) -> dict[str, Any]:
        m = self.matrix.double()
        tp = m.diag()
        gt = m.sum(1)
        pred = m.sum(0)
        union = gt + pred - tp
        iou = torch.where(union > 0, tp / union.clamp(min=1), torch.full_like(tp, float("nan")))
        acc = torch.where(gt > 0, tp / gt.clamp(min=1), torch.full_like(tp, float("nan")))
        total = gt.sum()
        return {
            "aAcc": 100.0 * float(tp.sum() / total) if total > 0 else float("nan"),
            "mIoU": 100.0 * float(iou.nanmean()),
            "mAcc": 100.0 * float(acc.nanmean()),
            "IoU": [100.0 * float(v) for v in iou],
            "Acc": [100.0 * float(v) for v in acc],
        }
