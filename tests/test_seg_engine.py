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
