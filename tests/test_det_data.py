"""Detection data and metrics: COCO metrics against hand-computed AP (pycocotools' COCOeval as the engine), COCO
folder checks, the training pipelines, and the embedded digit composites."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pycocotools.mask as mask_api
import pytest
import torch
from PIL import Image
from pycocotools.coco import COCO
from torch.utils.data import DataLoader

from inceptionnext.data import DataError
from inceptionnext.detection.data import (
    COCO_MS_SHORT_SIDES,
    CocoDetectionDataset,
    DigitComposites,
    EvalPipeline,
    TrainPipeline,
    build_det_dataset,
    collate_detection,
    crop_sample,
    digit_split,
    hflip_sample,
    photo_regions,
    resize_sample,
    write_composites_coco,
)
from inceptionnext.detection.metrics import coco_evaluate, gather_results, to_coco_results, write_results
from inceptionnext.errors import ConfigError, UserError

# ------------------------------------------------------------------------------------------------ helpers


def coco_from(dataset: dict) -> COCO:
    """An independent in-memory pycocotools COCO (the test's own, not the library's)."""
    coco = COCO()
    coco.dataset = copy.deepcopy(dataset)
    coco.createIndex()
    return coco


def rle(mask: np.ndarray) -> dict:
    r = mask_api.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": r["size"], "counts": r["counts"].decode("ascii")}


def tight_box(mask: np.ndarray) -> list[float]:
    """xyxy pixel-edge box of a non-empty 2-D mask, computed with np.nonzero (independent of masks_to_boxes)."""
    ys, xs = np.nonzero(mask)
    return [float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)]


# A 320x240 image with two large objects (areas > 96^2, so "large" in COCO's ranges):
#   object 1: an octagon in the box [20, 20, 140, 140] (corners cut by 20 px; polygon area 120^2 - 4 * 200 = 13600)
#   object 2: a rectangle, x 180..280, y 60..180 (a polygon with integer corners covers exactly those pixels)
OCTAGON = [40, 20, 120, 20, 140, 40, 140, 120, 120, 140, 40, 140, 20, 120, 20, 40]
RECT = [180, 60, 280, 60, 280, 180, 180, 180]
GT_TWO = {
    "images": [{"id": 1, "width": 320, "height": 240, "file_name": "a.png"}],
    "categories": [{"id": 5, "name": "thing"}],
    "annotations": [
        {"id": 1, "image_id": 1, "category_id": 5, "bbox": [20, 20, 120, 120], "area": 13600.0, "iscrowd": 0,
         "segmentation": [OCTAGON]},
        {"id": 2, "image_id": 1, "category_id": 5, "bbox": [180, 60, 100, 120], "area": 12000.0, "iscrowd": 0,
         "segmentation": [RECT]},
    ],
}  # fmt: skip


def rect_mask(x1: int, y1: int, x2: int, y2: int, h: int = 240, w: int = 320) -> np.ndarray:
    m = np.zeros((h, w), np.uint8)
    m[y1:y2, x1:x2] = 1
    return m


# ------------------------------------------------------------------------------------------------ metrics


def test_perfect_predictions_give_100():
    gt = coco_from(GT_TWO)
    results = [
        {
            "image_id": 1,
            "category_id": 5,
            "bbox": a["bbox"],
            "score": 0.9 - 0.1 * i,
            "segmentation": rle(gt.annToMask(a)),
        }
        for i, a in enumerate(GT_TWO["annotations"])
    ]
    m = coco_evaluate(gt, results)
    for t in ("bbox", "segm"):
        assert m[f"{t}_AP"] == pytest.approx(100.0)
        assert m[f"{t}_AP50"] == m[f"{t}_AP75"] == m[f"{t}_APl"] == pytest.approx(100.0)
        assert m[f"{t}_APs"] == m[f"{t}_APm"] == -1.0  # no small or medium ground truth: COCO's "undefined"


def test_known_ap_one_perfect_one_at_iou_061():
    """Detection A (score 0.9) is object 1 exactly; detection B (score 0.8) is object 2 shifted right by 24 px, so
    IoU = (100 - 24) * 120 / ((100 + 24) * 120) = 76 / 124 = 0.613 for the box and for the mask alike.

    COCOeval matches at IoU >= t for t in 0.50, 0.55, ..., 0.95, then takes the precision at 101 recall points
    0, 0.01, ..., 1 (each point gets the best precision at that recall or beyond, 0 where the recall is never
    reached):
      t <= 0.60 (3 thresholds): A and B are both true positives: precision 1 up to recall 1 -> AP = 1.
      t >= 0.65 (7 thresholds): A is a TP (recall 0.5, precision 1), B a FP (recall 0.5, precision 0.5); the
        points 0, 0.01, ..., 0.50 (51 of them) get precision 1, the 50 above 0.5 get 0 -> AP = 51 / 101.
    AP50 = 100, AP75 = 100 * 51 / 101 = 50.50, AP = 100 * (3 + 7 * 51 / 101) / 10 = 65.35.
    """
    iou = 76 / 124
    assert 0.60 < iou < 0.65
    gt = coco_from(GT_TWO)
    a = {"image_id": 1, "category_id": 5, "bbox": [20, 20, 120, 120], "score": 0.9,
         "segmentation": rle(gt.annToMask(gt.anns[1]))}  # fmt: skip
    b = {"image_id": 1, "category_id": 5, "bbox": [204, 60, 100, 120], "score": 0.8,
         "segmentation": rle(rect_mask(204, 60, 304, 180))}  # fmt: skip
    # the reference mask of object 2 is the rectangle's pixels, so the mask IoU is the box IoU
    assert np.array_equal(gt.annToMask(gt.anns[2]), rect_mask(180, 60, 280, 180))
    results = [a, b]
    before = copy.deepcopy(results)
    m = coco_evaluate(gt, results)
    assert results == before  # loadRes adds keys to what it gets: the caller's dicts must be untouched
    ap75 = 100 * 51 / 101
    ap = 100 * (3 + 7 * 51 / 101) / 10
    for t in ("bbox", "segm"):
        assert m[f"{t}_AP50"] == pytest.approx(100.0)
        assert m[f"{t}_AP75"] == pytest.approx(ap75)
        assert m[f"{t}_AP"] == pytest.approx(ap)
        assert m[f"{t}_APl"] == pytest.approx(ap)


def test_wrong_category_and_empty_results():
    gt = coco_from({**GT_TWO, "categories": [{"id": 5, "name": "thing"}, {"id": 9, "name": "other"}]})
    results = [{"image_id": 1, "category_id": 9, "bbox": a["bbox"], "score": 0.9} for a in GT_TWO["annotations"]]
    m = coco_evaluate(gt, results, iou_types=("bbox",))
    assert set(m) == {f"bbox_{s}" for s in ("AP", "AP50", "AP75", "APs", "APm", "APl")}
    assert m["bbox_AP"] == 0.0 and m["bbox_AP50"] == 0.0
    assert coco_evaluate(gt, []) == {f"{t}_{s}": 0.0 for t in ("bbox", "segm")
                                     for s in ("AP", "AP50", "AP75", "APs", "APm", "APl")}  # fmt: skip
    with pytest.raises(ValueError, match="not in the ground truth"):
        coco_evaluate(gt, [{"image_id": 99, "category_id": 5, "bbox": [0, 0, 5, 5], "score": 0.5}])
    with pytest.raises(ValueError, match="segmentation"):
        coco_evaluate(gt, results, iou_types=("segm",))


def test_to_coco_results_maps_labels_boxes_and_masks():
    cat_ids = (3, 7, 11)
    probs = torch.zeros(2, 1, 240, 320)
    probs[0, 0, 20:140, 20:140] = 0.7
    probs[0, 0, 20:30, 20:30] = 0.4  # below the threshold: not in the mask
    probs[1, 0, 60:180, 180:280] = 0.95
    outputs = [{"boxes": torch.tensor([[20.0, 20.0, 140.0, 140.0], [180.5, 60.0, 280.0, 180.25]]),
                "labels": torch.tensor([3, 1]), "scores": torch.tensor([0.9, 0.6]), "masks": probs}]  # fmt: skip
    results = to_coco_results(outputs, [{"image_id": torch.tensor(1)}], cat_ids)
    json.dumps(results)  # JSON-ready: counts are str
    assert [r["category_id"] for r in results] == [11, 3]
    assert results[0]["bbox"] == pytest.approx([20, 20, 120, 120])
    assert results[1]["bbox"] == pytest.approx([180.5, 60, 99.5, 120.25])
    assert [r["score"] for r in results] == pytest.approx([0.9, 0.6])
    expected0 = rect_mask(20, 20, 140, 140)
    expected0[20:30, 20:30] = 0
    assert np.array_equal(mask_api.decode(results[0]["segmentation"]), expected0)
    assert np.array_equal(mask_api.decode(results[1]["segmentation"]), rect_mask(180, 60, 280, 180))
    with pytest.raises(ValueError, match="labels"):
        to_coco_results([{**outputs[0], "labels": torch.tensor([0, 4])}], [{"image_id": 1}], cat_ids)
    box_only = to_coco_results([{k: v for k, v in outputs[0].items() if k != "masks"}], [{"image_id": 1}], cat_ids)
    assert all("segmentation" not in r for r in box_only)


def test_write_results_atomic_and_gather_identity(tmp_path):
    results = [{"image_id": 1, "category_id": 5, "bbox": [1.0, 2.0, 3.0, 4.0], "score": 0.5}]
    path = tmp_path / "out" / "predictions.json"
    path.parent.mkdir()
    path.write_text("old")
    write_results(path, results)
    assert json.loads(path.read_text()) == results
    assert sorted(p.name for p in path.parent.iterdir()) == ["predictions.json"]  # no temporary left
    with pytest.raises(TypeError):
        write_results(path, [{"x": object()}])
    assert json.loads(path.read_text()) == results  # a failed write leaves the earlier file
    assert sorted(p.name for p in path.parent.iterdir()) == ["predictions.json"]
    assert gather_results(results) == results  # one process: its own results (DDP: test_det_engine torchrun)


# ------------------------------------------------------------------------------------------------ COCO folders

CATS = [{"id": 3, "name": "cat"}, {"id": 7, "name": "dog"}]
H, W = 48, 64


def blob_mask() -> np.ndarray:
    m = np.zeros((H, W), np.uint8)
    m[30:40, 40:50] = 1
    m[35:44, 50:56] = 1  # an L shape: tight box x 40..56, y 30..44
    return m


def base_annotations() -> dict:
    # a crowd region as an uncompressed RLE (column-major runs of 0s and 1s): rows 0..19 of columns 0..29
    counts = [0] + [20, H - 20] * 29 + [20, H - 20 + H * (W - 30)]
    return {
        "images": [{"id": 10, "file_name": "a.png", "width": W, "height": H},
                   {"id": 11, "file_name": "b.png", "width": W, "height": H},
                   {"id": 12, "file_name": "c.png", "width": W, "height": H}],
        "categories": CATS,
        "annotations": [
            {"id": 1, "image_id": 10, "category_id": 3, "bbox": [4, 4, 20, 16], "area": 320.0, "iscrowd": 0,
             "segmentation": [[4, 4, 24, 4, 24, 20, 4, 20]]},
            {"id": 2, "image_id": 10, "category_id": 7, "bbox": [40, 30, 16, 14], "area": float(blob_mask().sum()),
             "iscrowd": 0, "segmentation": rle(blob_mask())},
            {"id": 3, "image_id": 11, "category_id": 3, "bbox": [0, 0, 30, 20], "area": 600.0, "iscrowd": 1,
             "segmentation": {"size": [H, W], "counts": counts}},
            {"id": 4, "image_id": 11, "category_id": 7, "bbox": [30, 10, 30, 30], "area": 450.0, "iscrowd": 0,
             "segmentation": [[30, 10, 60, 40, 30, 40]]},
        ],
    }  # fmt: skip


def write_coco(root: Path, data: dict, split: str = "train") -> tuple[Path, Path]:
    """A COCO 2017 folder with real image content (crops of scikit-image's astronaut)."""
    import skimage.data

    photo = skimage.data.astronaut()
    image_dir, ann_dir = root / f"{split}2017", root / "annotations"
    image_dir.mkdir(parents=True, exist_ok=True)
    ann_dir.mkdir(parents=True, exist_ok=True)
    for k, im in enumerate(data["images"]):
        Image.fromarray(photo[k * 50 : k * 50 + im["height"], : im["width"]]).save(image_dir / im["file_name"])
    ann_file = ann_dir / f"instances_{split}2017.json"
    ann_file.write_text(json.dumps(data))
    return image_dir, ann_file


def test_coco_folder_gives_torchvision_targets(tmp_path):
    data = base_annotations()
    write_coco(tmp_path, data)
    notes: list[str] = []
    ds = build_det_dataset(tmp_path, "train", EvalPipeline(), log=notes.append)
    assert isinstance(ds, CocoDetectionDataset)
    assert ds.classes == ("cat", "dog") and ds.cat_ids == (3, 7) and ds.has_masks
    assert len(ds) == 2 and ds.ids == [10, 11]  # image 12 has no annotation: skipped in training, and counted
    assert ds.counts["images_without_annotations"] == 1 and ds.counts["crowd"] == 1
    assert any("1 training images without any usable annotation" in n for n in notes)
    img, t = ds[0]
    assert img.dtype == torch.float32 and img.shape == (3, H, W) and img.min() >= 0 and img.max() <= 1
    assert t["boxes"].dtype == torch.float32 and t["labels"].dtype == torch.int64 and t["masks"].dtype == torch.uint8
    assert t["image_id"].dtype == torch.int64 and t["image_id"].dim() == 0 and int(t["image_id"]) == 10
    assert t["orig_size"].tolist() == [H, W]
    assert t["boxes"].tolist() == [[4, 4, 24, 20], [40, 30, 56, 44]]  # xywh -> xyxy
    assert t["labels"].tolist() == [1, 2]  # category 3 -> label 1, 7 -> 2
    assert np.array_equal(t["masks"][0].numpy(), rect_mask(4, 4, 24, 20, H, W))  # the polygon's pixels
    assert np.array_equal(t["masks"][1].numpy(), blob_mask())  # the RLE
    expected_pixels = np.asarray(Image.open(tmp_path / "train2017" / "a.png"), np.float32) / 255
    assert np.allclose(img.permute(1, 2, 0).numpy(), expected_pixels)
    _, t = ds[1]  # image 11: the crowd region is not a training target
    assert t["labels"].tolist() == [2] and t["masks"].shape == (1, H, W)
    reference = COCO(str(tmp_path / "annotations" / "instances_train2017.json"))
    assert np.array_equal(t["masks"][0].numpy(), reference.annToMask(reference.anns[4]))
    # evaluation keeps every image, and the ground truth keeps the crowd region
    ev = CocoDetectionDataset(tmp_path / "train2017", tmp_path / "annotations" / "instances_train2017.json",
                              EvalPipeline(), train=False, log=notes.append)  # fmt: skip
    assert len(ev) == 3 and ev.coco.anns[3]["iscrowd"] == 1
    _, t = ev[2]
    assert t["boxes"].shape == (0, 4) and t["masks"].shape == (0, H, W) and int(t["image_id"]) == 12
    images, targets = next(iter(DataLoader(ev, batch_size=3, collate_fn=collate_detection)))
    assert isinstance(images, list) and len(images) == 3 and [int(x["image_id"]) for x in targets] == [10, 11, 12]


def test_crowd_region_is_ignored_by_the_evaluation(tmp_path):
    """A confident detection on the crowd region is neither a true nor a false positive: AP stays 100. Without the
    crowd region in the ground truth the same detection is a false positive ranked first in its category (by hand
    below)."""
    data = base_annotations()
    write_coco(tmp_path, data)
    ds = build_det_dataset(tmp_path, "train", None, log=lambda _: None)
    crowd = {"image_id": 11, "category_id": 3, "bbox": [0, 0, 30, 20], "score": 0.95}
    found = {"image_id": 11, "category_id": 7, "bbox": [30, 10, 30, 30], "score": 0.9}
    rest = [{"image_id": 10, "category_id": a["category_id"], "bbox": a["bbox"], "score": 0.9}
            for a in data["annotations"][:2]]  # fmt: skip
    assert coco_evaluate(ds.coco, [crowd, found, *rest], ("bbox",))["bbox_AP"] == pytest.approx(100.0)
    no_crowd = {**data, "annotations": [a for a in data["annotations"] if not a["iscrowd"]]}
    m = coco_evaluate(coco_from(no_crowd), [crowd, found, *rest], ("bbox",))
    # category 3 (cat): 1 object (ann 1) found at score 0.9 after the FP at 0.95 -> AP 0.5; category 7: AP 1
    assert m["bbox_AP50"] == pytest.approx(100 * (0.5 + 1.0) / 2)


def _set(ann_id: int, **changes):
    def edit(data: dict) -> None:
        ann = next(a for a in data["annotations"] if a["id"] == ann_id)
        ann.update(changes)

    return edit


BROKEN = {
    "unknown category": (_set(1, category_id=99), ["unknown category ids", "ann 1", "category_id 99"]),
    "unknown image": (_set(2, image_id=77), ["unknown image ids", "ann 2 (image 77)"]),
    "box outside": (_set(1, bbox=[50, 4, 20, 16]), ["outside the image", "ann 1", "64x48"]),
    "negative box": (_set(1, bbox=[4, 4, -3, 16]), ["valid bbox", "ann 1"]),
    "empty polygon list": (_set(1, segmentation=[]), ["empty mask", "ann 1"]),
    "empty rle": (_set(2, segmentation=rle(np.zeros((H, W)))), ["empty mask", "ann 2"]),
    "two-point polygon": (_set(1, segmentation=[[4, 4, 24, 20]]), ["degenerate polygon", "ann 1"]),
    "collinear polygon": (_set(1, segmentation=[[4, 4, 14, 12, 24, 20]]), ["degenerate polygon", "ann 1"]),
    "rle of another size": (_set(2, segmentation=rle(np.ones((10, 10)))), ["size is not the image", "ann 2"]),
    "unknown segmentation": (_set(4, segmentation="polygon"), ["neither polygon lists nor RLE", "ann 4"]),
    "segmentation missing": (lambda d: d["annotations"][3].pop("segmentation"), ["without 'segmentation'"]),
}


@pytest.mark.parametrize("kind", sorted(BROKEN))
def test_broken_annotations_are_data_errors(tmp_path, kind):
    edit, expected = BROKEN[kind]
    data = base_annotations()
    edit(data)
    image_dir, ann_file = write_coco(tmp_path, data)
    with pytest.raises(DataError) as info:
        CocoDetectionDataset(image_dir, ann_file, train=True, log=lambda _: None)
    assert isinstance(info.value, UserError)
    msg = str(info.value)
    assert str(ann_file) in msg
    for part in expected:
        assert part in msg


def test_missing_files_and_layout_errors(tmp_path):
    image_dir, ann_file = write_coco(tmp_path, base_annotations())
    (image_dir / "b.png").unlink()
    with pytest.raises(DataError, match=r"1 image file\(s\) .* missing from .*: b\.png"):
        CocoDetectionDataset(image_dir, ann_file, train=True)
    with pytest.raises(DataError, match="annotation file not found"):
        CocoDetectionDataset(image_dir, tmp_path / "nope.json", train=True)
    ann_file.write_text("{not json")
    with pytest.raises(DataError, match="not valid JSON"):
        CocoDetectionDataset(image_dir, ann_file, train=True)
    with pytest.raises(DataError, match="instances_val2017.json"):
        build_det_dataset(tmp_path, "val", None)  # only the train split was written
    with pytest.raises(DataError, match="not found"):
        build_det_dataset(tmp_path / "absent", "train", None)
    with pytest.raises(DataError, match="'train' or 'val'"):
        build_det_dataset(None, "test", None)


def test_left_out_not_silently(tmp_path):
    """Degenerate boxes (w or h < 1) leave training with a count; a box 0.8 px past the border is within the
    tolerance; degenerate polygon parts are dropped from a mask that has a valid part; strict=False turns an
    outside box into a counted omission."""
    data = base_annotations()
    data["annotations"].append({"id": 5, "image_id": 10, "category_id": 3, "bbox": [10, 10, 0.5, 8], "area": 2.0,
                                "iscrowd": 0, "segmentation": [[10, 10, 10.5, 10, 10.5, 18]]})  # fmt: skip
    _set(4, bbox=[30, 10, 34.8, 30])(data)  # x + w = 64.8 in a 64-wide image
    _set(1, segmentation=[[4, 4, 24, 4, 24, 20, 4, 20], [1, 1, 2, 2]])(data)
    image_dir, ann_file = write_coco(tmp_path, data)
    notes: list[str] = []
    ds = CocoDetectionDataset(image_dir, ann_file, train=True, log=notes.append)
    assert ds.counts["degenerate_boxes"] == 1 and ds.counts["polygon_parts_left_out"] == 1
    assert any("1 box(es) narrower or lower than 1 pixel left out" in n for n in notes)
    _, t = ds[0]
    assert t["labels"].tolist() == [1, 2]  # ann 5 is not a target
    assert np.array_equal(t["masks"][0].numpy(), rect_mask(4, 4, 24, 20, H, W))
    _, t = ds[1]
    assert t["boxes"][0].tolist() == pytest.approx([30, 10, 64, 40])  # clipped to the image
    _set(2, bbox=[40, 30, 40, 14])(data)
    ann_file.write_text(json.dumps(data))
    with pytest.raises(DataError, match="strict=False"):
        CocoDetectionDataset(image_dir, ann_file, train=True, log=notes.append)
    ds = CocoDetectionDataset(image_dir, ann_file, train=True, strict=False, log=notes.append)
    assert ds.counts["outside"] == 1
    assert ds[0][1]["labels"].tolist() == [1]


# ------------------------------------------------------------------------------------------------ pipelines


def test_pipeline_defaults_are_the_reference_configs():
    p = TrainPipeline(policy="mstrain")
    assert p.ms_short_sides == COCO_MS_SHORT_SIDES == (480, 512, 544, 576, 608, 640, 672, 704, 736, 768, 800)
    assert p.crop_short_sides == (400, 500, 600) and p.crop_size == (384, 600)
    assert p.scale == (1333, 800) and p.flip == 0.5
    assert TrainPipeline().policy == "single"
    with pytest.raises(ConfigError):
        TrainPipeline(policy="3x")
    small = p.scaled(0.32)
    assert small.scale == (427, 256) and small.ms_short_sides[0] == 154 and small.ms_short_sides[-1] == 256


def test_single_scale_resize_by_hand():
    """480x640 -> short side 800 (factor 800/480 < 1333/640): 800 x int(640 * 5/3 + 0.5) = 800 x 1067; the box
    scales by (1067/640, 800/480)."""
    image = np.zeros((480, 640, 3), np.uint8)
    masks = rect_mask(64, 48, 128, 96, 480, 640)[None]
    target = {"boxes": np.array([[64, 48, 128, 96]], np.float32), "labels": np.array([1]), "masks": masks,
              "image_id": 1, "orig_size": (480, 640)}  # fmt: skip
    img, t = TrainPipeline(flip=0.0)(image, target, np.random.default_rng(0))
    assert img.shape == (3, 800, 1067)
    sx, sy = 1067 / 640, 800 / 480
    assert t["boxes"][0].tolist() == pytest.approx([64 * sx, 48 * sy, 128 * sx, 96 * sy], abs=1e-3)
    assert tight_box(t["masks"][0].numpy()) == pytest.approx(t["boxes"][0].tolist(), abs=1.0)
    img, t = TrainPipeline(flip=0.0)(np.zeros((1000, 500, 3), np.uint8), {**target, "masks": None},
                                     np.random.default_rng(0))  # fmt: skip
    assert img.shape == (3, 1333, 667)  # long side capped: factor 1333/1000 < 800/500


def test_mstrain_sizes_follow_the_policies():
    """Every output has its short side in 480..800 (step 32) unless the 1333 cap on the long side binds."""
    image = np.zeros((60, 80, 3), np.uint8)
    target = {"boxes": np.array([[10, 10, 50, 40]], np.float32), "labels": np.array([1]), "image_id": 1,
              "orig_size": (60, 80)}  # fmt: skip
    p = TrainPipeline(policy="mstrain")
    shorts = set()
    for seed in range(12):
        img, _ = p(image, dict(target), np.random.default_rng(seed))
        h, w = img.shape[1:]
        assert min(h, w) in COCO_MS_SHORT_SIDES and max(h, w) <= 1333
        shorts.add(min(h, w))
    assert len(shorts) > 3


def test_flip_and_crop_by_hand():
    image = np.arange(4 * 10 * 3, dtype=np.uint8).reshape(4, 10, 3)
    masks = np.zeros((1, 4, 10), np.uint8)
    masks[0, 1:3, 1:4] = 1
    target = {"boxes": np.array([[1, 1, 4, 3]], np.float32), "labels": np.array([2]), "masks": masks}
    img, t = hflip_sample(image, target)
    assert t["boxes"].tolist() == [[6, 1, 9, 3]]  # x1' = 10 - 4, x2' = 10 - 1
    assert np.array_equal(img[:, 0], image[:, 9]) and tight_box(t["masks"][0]) == [6, 1, 9, 3]
    # an L-shaped mask: a crop keeps only its foot, whose tight box is much smaller than the clipped box
    masks = np.zeros((2, 20, 20), np.uint8)
    masks[0, 2:18, 2:5] = 1
    masks[0, 15:18, 2:15] = 1
    masks[1, 0:4, 16:20] = 1
    target = {"boxes": np.array([[2, 2, 15, 18], [16, 0, 20, 4]], np.float32), "labels": np.array([1, 2]),
              "masks": masks}  # fmt: skip
    image = np.zeros((20, 20, 3), np.uint8)
    img, t = crop_sample(image, target, top=10, left=6, height=10, width=10)
    assert img.shape == (10, 10, 3)
    assert t["labels"].tolist() == [1]  # object 2 lies outside the crop: dropped
    assert t["boxes"].tolist() == [[0, 5, 9, 8]]  # the foot: x 6..15 -> 0..9, y 15..18 -> 5..8
    _, t = crop_sample(image, target, top=10, left=6, height=10, width=10, recompute_boxes=False)
    assert t["boxes"].tolist() == [[0, 0, 9, 8]]  # mmdet's default: the clipped box
    _, t = crop_sample(image, target, top=0, left=0, height=2, width=2)
    assert t["boxes"].shape == (0, 4) and t["masks"].shape == (0, 2, 2)  # a crop without objects is allowed
    _, t = resize_sample(image, target, (20, 20))
    assert t is target  # same size: untouched


@pytest.fixture(scope="module")
def small_train():
    return DigitComposites("train", num_images=6, size=(96, 128), digit_size=(16, 40), seed=3)


def test_transformed_boxes_match_masks(small_train):
    """Flip, every resize and the crop keep each mask's tight box within a pixel of its box (many draws of the
    mstrain pipeline, scaled to these small images); the crop path ran (some draws lost objects)."""
    p = TrainPipeline(policy="mstrain").scaled(0.15)
    lost = 0
    for i in range(len(small_train)):
        image, target = small_train.load(i)
        for seed in range(8):
            img, t = p(image, target, np.random.default_rng([seed, i]))
            assert t["masks"].shape[1:] == img.shape[1:] and len(t["masks"]) == len(t["boxes"]) == len(t["labels"])
            for box, mask in zip(t["boxes"].tolist(), t["masks"].numpy()):
                assert box[2] > box[0] and box[3] > box[1]
                assert tight_box(mask) == pytest.approx(box, abs=1.0)
            lost += len(t["labels"]) < len(target["labels"])
    assert lost > 0


def test_train_pipeline_is_deterministic_per_seed_epoch_index(small_train):
    ds = DigitComposites("train", num_images=6, size=(96, 128), digit_size=(16, 40), seed=3,
                         pipeline=TrainPipeline(policy="mstrain").scaled(0.15))  # fmt: skip

    def draw(d, key):
        img, t = d[key]
        return img, t["boxes"], t["masks"]

    def same(a, b):
        return all(x.shape == y.shape and torch.equal(x, y) for x, y in zip(a, b))

    first = [draw(ds, i) for i in range(6)]
    again = DigitComposites("train", num_images=6, size=(96, 128), digit_size=(16, 40), seed=3, pipeline=ds.pipeline)
    assert all(same(a, draw(again, i)) for i, a in enumerate(first))  # a fresh dataset: a resumed run
    ds.set_epoch(1)
    second = [draw(ds, i) for i in range(6)]
    assert not all(same(a, b) for a, b in zip(first, second))
    assert all(same(b, draw(again, (1, i))) for i, b in enumerate(second))  # (epoch, index) keys, as EpochIndices
    other_seed = DigitComposites("train", num_images=6, size=(96, 128), digit_size=(16, 40), seed=4)
    assert not all(np.array_equal(a.image, b.image) for a, b in zip(other_seed.composites, small_train.composites))


# ------------------------------------------------------------------------------------------------ composites


def test_composites_boxes_masks_and_ground_truth(small_train):
    val = DigitComposites("val", num_images=4, size=(96, 128), digit_size=(16, 40))
    for ds in (small_train, val):
        assert ds.classes == tuple("0123456789") and ds.cat_ids == tuple(range(1, 11))
        outputs, targets = [], []
        for i in range(len(ds)):
            img, t = ds[i]
            assert img.shape[1:] == tuple(t["orig_size"].tolist())
            assert 96 <= img.shape[1] <= 128 and 96 <= img.shape[2] <= 128
            assert len(t["labels"]) >= 1 and t["labels"].min() >= 1 and t["labels"].max() <= 10
            for box, mask in zip(t["boxes"].tolist(), t["masks"].numpy()):
                assert tight_box(mask) == box  # exact: boxes are tight around the ink
            masks = t["masks"].numpy()
            assert masks.sum(axis=0).max() <= 1  # no overlap
            outputs.append({"boxes": t["boxes"], "labels": t["labels"], "scores": torch.ones(len(t["labels"])),
                            "masks": t["masks"][:, None].float()})  # fmt: skip
            targets.append(t)
            gt_anns = ds.coco.loadAnns(ds.coco.getAnnIds(imgIds=int(t["image_id"])))
            assert len(gt_anns) == len(t["labels"])
            for a, mask in zip(gt_anns, masks):
                assert np.array_equal(ds.coco.annToMask(a), mask)
        m = coco_evaluate(ds.coco, to_coco_results(outputs, targets, ds.cat_ids))
        assert m["bbox_AP"] == pytest.approx(100.0) and m["segm_AP"] == pytest.approx(100.0)


def test_composite_splits_are_disjoint(small_train):
    val = DigitComposites("val", num_images=20, size=(96, 128), digit_size=(16, 40))
    train_digits = {d for c in small_train.composites for d in c.digits}
    val_digits = {d for c in val.composites for d in c.digits}
    assert train_digits and val_digits and not train_digits & val_digits
    assert not set(digit_split("train").tolist()) & set(digit_split("val").tolist())
    assert len(digit_split("train")) + len(digit_split("val")) == 1797
    from inceptionnext.detection.data import _photo_bank

    for ds, split in ((small_train, "train"), (val, "val")):
        for c in ds.composites:
            name, top, left, h, w = c.background
            ph, pw = _photo_bank()[name].shape[:2]
            in_val = top >= ph // 2 and left >= pw // 2  # val owns the bottom-right quadrant
            touches_val = top + h > ph // 2 and left + w > pw // 2
            assert in_val if split == "val" else not touches_val
            assert any(top >= rt and left >= rl and top + h <= rt + rh and left + w <= rl + rw
                       for rt, rl, rh, rw in photo_regions(split, ph, pw))  # fmt: skip
    # val composites do not depend on the seed
    assert all(
        np.array_equal(a.image, b.image)
        for a, b in zip(
            DigitComposites("val", num_images=3, size=(96, 128), digit_size=(16, 40), seed=9).composites, val.composites
        )
    )


def test_fresh_composites_per_epoch(small_train):
    """fresh=True: epoch 0 is the fixed set, every later epoch its own composites (train digits and regions only,
    exact boxes), the same again for a resumed run and for (epoch, index) keys; the val split cannot be fresh."""
    kw = dict(num_images=6, size=(96, 128), digit_size=(16, 40), seed=3)
    fresh = DigitComposites("train", fresh=True, **kw)
    assert all(np.array_equal(fresh.composite(0, i).image, c.image) for i, c in enumerate(small_train.composites))
    epoch1 = [fresh.composite(1, i) for i in range(6)]
    epoch2 = [fresh.composite(2, i) for i in range(6)]
    for a, b, c in zip(small_train.composites, epoch1, epoch2):
        assert not np.array_equal(a.image, b.image) and not np.array_equal(b.image, c.image)
    again = DigitComposites("train", fresh=True, **kw)
    assert all(np.array_equal(a.image, again.composite(1, i).image) for i, a in enumerate(epoch1))
    train_pool = set(digit_split("train").tolist())
    assert all(set(c.digits) <= train_pool for c in epoch1 + epoch2)
    fresh.set_epoch(1)
    for i, c in enumerate(epoch1):
        img, t = fresh[i]
        assert torch.equal(img, again[(1, i)][0])
        assert t["labels"].tolist() == [label for label, *_ in c.instances]
        for box, mask in zip(t["boxes"].tolist(), t["masks"].numpy()):
            assert tight_box(mask) == box
    assert not np.array_equal(small_train[0][0].numpy(), fresh[0][0].numpy())  # the fixed set repeats epoch 0
    with pytest.raises(DataError, match="fresh composites are for training"):
        DigitComposites("val", num_images=2, fresh=True)
    assert build_det_dataset(None, "val", None, fresh=True).fresh is False  # the engine's flag leaves val fixed


def test_write_composites_coco_round_trip(tmp_path):
    out = write_composites_coco(tmp_path / "coco", num_train=6, num_val=2, size=(96, 128), seed=3)
    with pytest.raises(DataError, match="not an empty folder"):
        write_composites_coco(out, num_train=1, num_val=1)
    assert sorted(p.name for p in (out / "annotations").iterdir()) == [
        "instances_train2017.json", "instances_val2017.json"]  # fmt: skip
    ds = build_det_dataset(out, "train", EvalPipeline(), log=lambda _: None)
    ref = DigitComposites("train", num_images=6, size=(96, 128), seed=3)  # same generation as write_composites_coco
    assert ds.classes == ref.classes and ds.cat_ids == ref.cat_ids and len(ds) == len(ref) == 6
    for i in range(len(ds)):
        (img_a, a), (img_b, b) = ds[i], ref[i]
        assert torch.equal(img_a, img_b)  # PNG is lossless
        for k in ("boxes", "labels", "masks", "image_id", "orig_size"):
            assert torch.equal(a[k], b[k]), k
    assert len(build_det_dataset(out, "val", None, log=lambda _: None)) == 2
