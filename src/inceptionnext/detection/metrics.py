"""COCO detection and instance segmentation metrics through pycocotools' COCOeval, the reference implementation
behind every published COCO number: box and mask AP (mean over IoU 0.50:0.05:0.95), AP50, AP75 and AP for small,
medium and large objects, as percentages.

Predictions become COCO result dicts (the format of the official evaluation server and of ``--predictions`` JSON
files), so an evaluation can be rerun from the written file by any COCO tool.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..engine.runtime import gather_objects

__all__ = ["COCO_STATS", "coco_evaluate", "gather_results", "to_coco_results", "write_results"]

#: the first six numbers of ``COCOeval.stats`` (all with maxDets=100), in their order
COCO_STATS: tuple[str, ...] = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def to_coco_results(
    outputs: Sequence[Mapping[str, torch.Tensor]],
    targets: Sequence[Mapping[str, Any]],
    cat_ids: Sequence[int],
    *,
    mask_threshold: float = 0.5,
) -> list[dict]:
    """torchvision detector outputs -> COCO result dicts, one per detection.

    ``outputs[i]`` holds ``boxes`` (xyxy in the original image's pixels, as torchvision's postprocess gives them),
    ``labels`` (1..K), ``scores`` and, for mask models, ``masks`` (``[N, 1, H, W]`` probabilities); ``targets[i]``
    gives the COCO ``image_id``. A result has ``image_id``, ``category_id`` (label ``k`` -> ``cat_ids[k - 1]``),
    ``bbox`` [x, y, w, h], ``score`` and, with masks, ``segmentation``: the mask thresholded at ``mask_threshold``
    (torchvision's COCO reference uses 0.5) as compressed RLE with ``counts`` as str, so the list is JSON-ready.
    """
    if len(outputs) != len(targets):
        raise ValueError(f"{len(outputs)} outputs for {len(targets)} targets")
    results: list[dict] = []
    for out, tgt in zip(outputs, targets):
        image_id = int(tgt["image_id"])
        boxes = out["boxes"].detach().float().cpu().numpy().reshape(-1, 4)
        labels = out["labels"].detach().cpu().numpy().astype(np.int64).reshape(-1)
        scores = out["scores"].detach().float().cpu().numpy().reshape(-1)
        if len(labels) and (labels.min() < 1 or labels.max() > len(cat_ids)):
            raise ValueError(f"labels must be in 1..{len(cat_ids)} (0 is background), got {sorted(set(labels))}")
        rles = None
        if out.get("masks") is not None and len(labels):
            import pycocotools.mask as mask_api

            masks = out["masks"].detach()
            masks = (masks[:, 0] if masks.dim() == 4 else masks) > mask_threshold
            binary = np.asfortranarray(masks.cpu().numpy().astype(np.uint8).transpose(1, 2, 0))
            rles = mask_api.encode(binary)
        for k in range(len(labels)):
            x1, y1, x2, y2 = (float(v) for v in boxes[k])
            r = {
                "image_id": image_id,
                "category_id": int(cat_ids[labels[k] - 1]),
                "bbox": [x1, y1, x2 - x1, y2 - y1],
                "score": float(scores[k]),
            }
            if rles is not None:
                r["segmentation"] = {"size": list(rles[k]["size"]), "counts": rles[k]["counts"].decode("ascii")}
            results.append(r)
    return results


def coco_evaluate(coco_gt: Any, results: Sequence[dict], iou_types: Iterable[str] = ("bbox", "segm")) -> dict:
    """Run COCOeval (evaluate, accumulate, summarize, with its prints captured) for each IoU type and return
    ``{type}_{AP, AP50, AP75, APs, APm, APl}`` in percent.

    As COCOeval prints them, a value is -1.0 where it is undefined (no ground truth in that area range); it stays
    -1.0, not NaN, so a metrics row stays finite. No results at all give 0.0 everywhere (COCOeval would fail on
    them). For "segm" the results' boxes are left out, so a detection's area is its mask's (detectron2 does the
    same: with a bbox present, pycocotools sizes the instance by its box). The caller's dicts are not modified
    (``loadRes`` adds keys to the dicts it gets).
    """
    from pycocotools.cocoeval import COCOeval

    iou_types = tuple(iou_types)
    for t in iou_types:
        if t not in ("bbox", "segm"):
            raise ValueError(f"iou_types must be 'bbox' and/or 'segm', got {t!r}")
    metrics: dict[str, float] = {}
    if not results:
        return {f"{t}_{s}": 0.0 for t in iou_types for s in COCO_STATS}
    gt_ids = set(coco_gt.getImgIds())
    unknown = sorted({r["image_id"] for r in results} - gt_ids)
    if unknown:
        raise ValueError(f"results for image ids that are not in the ground truth: {unknown[:10]}")
    for t in iou_types:
        if t == "segm":
            if any("segmentation" not in r for r in results):
                raise ValueError("'segm' evaluation needs a 'segmentation' in every result (a mask model's output)")
            dets = [{k: v for k, v in r.items() if k != "bbox"} for r in results]
        else:
            dets = [{k: v for k, v in r.items() if k != "segmentation"} for r in results]
        with contextlib.redirect_stdout(io.StringIO()):
            coco_dt = coco_gt.loadRes(dets)
            ev = COCOeval(coco_gt, coco_dt, iouType=t)
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
        for name, value in zip(COCO_STATS, ev.stats[: len(COCO_STATS)]):
            metrics[f"{t}_{name}"] = float(value) * 100.0 if value >= 0 else -1.0
    return metrics


def gather_results(results: list[dict]) -> list[dict]:
    """All processes' results, in rank order, on every process; the list itself with one process."""
    return [r for part in gather_objects(results) for r in part]


def write_results(path: str | os.PathLike, results: Sequence[dict]) -> Path:
    """Write ``results`` as a COCO results JSON atomically (a temporary file in the same folder, then
    ``os.replace``), so a reader never sees half a file and an earlier file survives a failed write."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(list(results), f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would make the results private to this user
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path
