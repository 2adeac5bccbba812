"""Segmentation metrics against a hand-computed confusion matrix, the schedule, inference and the engine."""

import math

import pytest
import torch

from inceptionnext.segmentation.config import SegConfig, resolve_seg_config
from inceptionnext.segmentation.metrics import ConfusionMatrix


def test_miou_against_a_hand_computed_confusion_matrix():
    # 3 classes; 255 ignored. target / prediction pairs written out pixel by pixel.
    target = torch.tensor([[0, 0, 1, 1], [1, 2, 2, 255]])
    pred = torch.tensor([[0, 1, 1, 1], [0, 2, 0, 2]])
    cm = ConfusionMatrix(3)
    cm.update(pred, target)
    # rows = truth, cols = prediction
    assert cm.matrix.tolist() == [[1, 1, 0], [1, 2, 0], [1, 0, 1]]
    r = cm.compute()
    iou = [1 / (2 + 3 - 1), 2 / (3 + 3 - 2), 1 / (2 + 1 - 1)]  # tp / (gt + pred - tp)
    acc = [1 / 2, 2 / 3, 1 / 2]
    assert r["IoU"] == pytest.approx([100 * v for v in iou])
    assert r["mIoU"] == pytest.approx(100 * sum(iou) / 3)
    assert r["mAcc"] == pytest.approx(100 * sum(acc) / 3)
    assert r["aAcc"] == pytest.approx(100 * 4 / 7)


def test_absent_classes_are_left_out_of_the_means():
    cm = ConfusionMatrix(4)
    cm.update(torch.tensor([0, 0, 1]), torch.tensor([0, 0, 1]))
    r = cm.compute()
    assert math.isnan(r["IoU"][2]) and math.isnan(r["Acc"][3])
    assert r["mIoU"] == 100.0 and r["mAcc"] == 100.0
    with pytest.raises(ValueError, match="outside 0..3"):
        cm.update(torch.tensor([0]), torch.tensor([7]))


def test_poly_schedule_with_linear_warmup():
    from inceptionnext.segmentation.engine import poly_lr

    cfg = SegConfig(iterations=1000, warmup_iters=100, warmup_ratio=1e-6, poly_power=1.0, min_lr=0.0)
    assert poly_lr(0, cfg, 6e-5) == pytest.approx(6e-5 * 1e-6)
    assert poly_lr(100, cfg, 6e-5) == pytest.approx(6e-5 * 0.9)
    assert poly_lr(500, cfg, 6e-5) == pytest.approx(3e-5)
    cfg = SegConfig(iterations=40000, warmup_iters=0, poly_power=0.9)
    assert poly_lr(20000, cfg, 2e-4) == pytest.approx(2e-4 * 0.5**0.9)


@pytest.mark.parametrize(
    ("recipe", "head", "backbone", "iters", "batch", "lr", "dpr"),
    [
        ("upernet_tiny", "upernet", "inceptionnext_tiny", 160000, 16, 6e-5, 0.2),
        ("upernet_small", "upernet", "inceptionnext_small", 160000, 16, 6e-5, 0.3),
        ("upernet_base", "upernet", "inceptionnext_base", 160000, 16, 6e-5, 0.4),
        ("fpn_tiny", "fpn", "inceptionnext_tiny", 40000, 32, 2e-4, 0.1),
        ("fpn_small", "fpn", "inceptionnext_small", 40000, 32, 2e-4, 0.2),
        ("fpn_base", "fpn", "inceptionnext_base", 40000, 32, 2e-4, 0.2),
    ],
)
def test_segmentation_recipes_hold_the_papers_values(recipe, head, backbone, iters, batch, lr, dpr):
    cfg = resolve_seg_config(recipe)
    assert (cfg.head, cfg.backbone, cfg.iterations, cfg.drop_path) == (head, backbone, iters, dpr)
    assert cfg.effective_batch(8) == batch and cfg.scaled_lr(8) == pytest.approx(lr)
    assert cfg.crop_size == [512, 512] and cfg.scale == [2048, 512] and cfg.ratio_range == [0.5, 2.0]
    assert cfg.cat_max_ratio == 0.75 and cfg.pretrained
    if head == "upernet":
        assert (cfg.weight_decay, cfg.warmup_iters, cfg.poly_power) == (0.01, 1500, 1.0)
    else:
        assert cfg.poly_power == 0.9


# --------------------------------------------------------------------------------------------- end to end
import os  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402


@pytest.fixture(scope="module")
def ade_folder(tmp_path_factory):
    """A tiny ADEChallengeData2016-layout folder of real texture mosaics (labels 1..3, 0 = ignore at the seams)."""
    from inceptionnext.segmentation.data import TextureMosaicDataset

    root = tmp_path_factory.mktemp("ADEChallengeData2016")
    for split, src, n in (("training", "train", 8), ("validation", "val", 4)):
        (root / "images" / split).mkdir(parents=True)
        (root / "annotations" / split).mkdir(parents=True)
        ds = TextureMosaicDataset(src, size=64, length=n)
        for i in range(n):
            img, mask = ds.load(i)
            ann = (mask + 1).astype(np.uint8)
            ann[:, 31:33] = 0  # an ignored seam
            Image.fromarray(img).save(root / "images" / split / f"ADE_{split}_{i:08d}.jpg")
            Image.fromarray(ann).save(root / "annotations" / split / f"ADE_{split}_{i:08d}.png")
    return root


def _args(data, out, *extra):
    return [
        sys.executable, "-m", "inceptionnext", "segment", "train", "--data", str(data), "--output", str(out),
        "--head", "upernet", "--backbone", "inceptionnext_atto", "--no-pretrained", "--head-channels", "16",
        "--crop-size", "64", "64", "--scale", "64", "64", "--ratio-range", "0.75", "1.25", "--iterations", "6",
        "--batch-size", "2", "--lr", "1e-3", "--lr-base-batch", "2", "--warmup-iters", "2", "--eval-interval", "3",
        "--workers", "0", "--drop-path", "0.1", *extra,
    ]  # fmt: skip


def _run(args, **env):
    return subprocess.run(args, capture_output=True, text=True, timeout=600, env={**os.environ, **env})


def test_segment_train_resume_eval_and_predict(ade_folder, tmp_path):
    import csv

    from inceptionnext.engine.run import FAULT_ENV

    full = _run(_args(ade_folder, tmp_path / "full"))
    assert full.returncode == 0, full.stderr[-2000:]
    killed = _run(_args(ade_folder, tmp_path / "cut"), **{FAULT_ENV: "5"})  # checkpoint at step 3, killed at 5
    assert killed.returncode == 137
    # --resume PATH from another folder continues exactly, and the file it names is only read
    source = (tmp_path / "cut" / "last.pth").read_bytes()
    elsewhere = _run(_args(ade_folder, tmp_path / "elsewhere", "--resume", str(tmp_path / "cut" / "last.pth")))
    assert elsewhere.returncode == 0, elsewhere.stderr[-2000:]
    assert (tmp_path / "cut" / "last.pth").read_bytes() == source
    assert "(step 3 done)" in (tmp_path / "elsewhere" / "log.txt").read_text()
    resumed = _run(_args(ade_folder, tmp_path / "cut"))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a = torch.load(tmp_path / "full" / "last.pth", weights_only=True)
    b = torch.load(tmp_path / "cut" / "last.pth", weights_only=True)
    assert a["step"] == b["step"] == 6
    c = torch.load(tmp_path / "elsewhere" / "last.pth", weights_only=True)
    for k in a["model"]:
        torch.testing.assert_close(b["model"][k], a["model"][k], rtol=0, atol=0, msg=k)
        torch.testing.assert_close(c["model"][k], a["model"][k], rtol=0, atol=0, msg=k)
    rows = list(csv.DictReader((tmp_path / "cut" / "metrics.csv").read_text().splitlines()))
    assert [r["step"] for r in rows] == ["3", "6"]
    assert list(rows[0]) == ["step", "train_loss", "lr", "mIoU", "mAcc", "aAcc", "img_per_s"]  # keyed on step only
    assert (tmp_path / "cut" / "curves.png").is_file()

    import json

    summary = json.loads((tmp_path / "full" / "summary.json").read_text())
    ev = _run([sys.executable, "-m", "inceptionnext", "segment", "eval", "--checkpoint",
               str(tmp_path / "full" / "last.pth"), "--output", str(tmp_path / "ev")])  # fmt: skip
    assert ev.returncode == 0, ev.stderr[-2000:]
    result = json.loads((tmp_path / "ev" / "results.json").read_text())
    assert result["mIoU"] == pytest.approx(summary["last"]["mIoU"], abs=1e-6)
    assert len(result["per_class_IoU"]) == 150

    img = next((ade_folder / "images" / "validation").iterdir())
    pr = _run([sys.executable, "-m", "inceptionnext", "segment", "predict", str(img), "--checkpoint",
               str(tmp_path / "full" / "last.pth"), "--output", str(tmp_path / "pred")])  # fmt: skip
    assert pr.returncode == 0, pr.stderr[-2000:]
    mask = np.asarray(Image.open(tmp_path / "pred" / f"{img.stem}_mask.png"))
    assert mask.shape == (64, 64) and mask.max() < 150
    assert Image.open(tmp_path / "pred" / f"{img.stem}_overlay.png").size[0] == 64


def test_slide_and_multiscale_inference_shapes():
    from inceptionnext.segmentation.engine import infer_logits
    from inceptionnext.segmentation.segmentor import create_segmentor

    model = create_segmentor("fpn", "inceptionnext_atto", 4, head_channels=16).eval()
    x = torch.randn(1, 3, 96, 160)
    whole = infer_logits(model, x, (50, 80))
    slide = infer_logits(model, x, (50, 80), mode="slide", crop=(64, 64), stride=(48, 48))
    assert whole.shape == slide.shape == (1, 4, 50, 80)
    torch.testing.assert_close(slide.sum(1), torch.ones(1, 50, 80))


def test_segment_resume_from_a_wrong_file_writes_nothing(tmp_path):
    """A classification checkpoint (or any file that is not a segmentation training checkpoint) given to ``resume``
    is refused before the output folder is created."""
    from inceptionnext import create_model
    from inceptionnext.checkpoint import CheckpointError
    from inceptionnext.segmentation.engine import train_segmentation

    cls_ckpt = tmp_path / "classification.pth"
    model = create_model("inceptionnext_atto", num_classes=4)
    torch.save({"model": model.state_dict(), "optimizer": {}, "scaler": {}, "step": 6, "best": {"top1": 50.0},
                "rng": {}, "epoch": 0, "class_names": ["a", "b", "c", "d"]}, cls_ckpt)  # fmt: skip
    cfg = resolve_seg_config("textures", {"output": str(tmp_path / "run"), "iterations": 2, "workers": 0})
    with pytest.raises(CheckpointError, match="training checkpoint of another task"):
        train_segmentation(cfg, resume=cls_ckpt)
    with pytest.raises(CheckpointError, match="checkpoint file not found"):
        train_segmentation(cfg, resume=tmp_path / "missing.pth")
    assert not (tmp_path / "run").exists()


def test_seg_config_choices_and_errors():
    from inceptionnext.errors import ConfigError
    from inceptionnext.segmentation.config import EVAL_MODES, HEADS

    assert HEADS == ("upernet", "fpn") and EVAL_MODES == ("whole", "slide")
    with pytest.raises(ConfigError, match="head must be upernet or fpn, got 'segformer'"):
        resolve_seg_config(None, {"head": "segformer"})
    with pytest.raises(ConfigError, match="eval_mode must be whole or slide"):
        resolve_seg_config(None, {"eval_mode": "tiles"})
    with pytest.raises(ConfigError, match="iterations must be >= 1"):
        resolve_seg_config(None, {"iterations": 0})
