"""Detectors on the InceptionNeXt backbone: losses and predictions of every architecture, the label convention, the
evaluation-only resize and its inverse, the BatchNorm policies, backbone loading, configuration errors, and the
params/MACs protocol against torchvision's documented count, hand-computed RoI heads and ConvNeXt-T's published row."""

import math

import pytest
import torch
from torch import nn

import inceptionnext
from inceptionnext.complexity import as_printed
from inceptionnext.detection.models import (
    ARCHS,
    DROP_PATH_DET,
    PUBLISHED_DET,
    convert_sync_batchnorm,
    create_detector,
    create_named_detector,
    detector_complexity,
    list_detectors,
    torchvision_maskrcnn_resnet50,
)
from inceptionnext.errors import ConfigError

ATTO = "inceptionnext_atto"
K = 3  # object categories in the small tests
SIZES = [(96, 150), (120, 100)]  # (H, W) of the two test images
MIN_SIZE, MAX_SIZE = 128, 192
# small RoI budgets keep the R-CNN heads cheap on CPU (full size: 1000 proposals, 512 sampled RoIs, 100 detections)
FAST = {
    "maskrcnn": dict(rpn_pre_nms_top_n_train=200, rpn_post_nms_top_n_train=64, rpn_pre_nms_top_n_test=200,
                     rpn_post_nms_top_n_test=64, box_batch_size_per_image=32, box_detections_per_img=8,
                     box_score_thresh=0.0),
    "retinanet": dict(topk_candidates=100, detections_per_img=8, score_thresh=0.0),
}  # fmt: skip
FAST["fasterrcnn"] = FAST["maskrcnn"]
LOSS_KEYS = {
    "maskrcnn": {"loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg"},
    "fasterrcnn": {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"},
    "retinanet": {"classification", "bbox_regression"},
}


def _build(arch: str, **kwargs) -> nn.Module:
    torch.manual_seed(0)
    kwargs = {**FAST[arch], "min_size": MIN_SIZE, "max_size": MAX_SIZE, "bn": "train", **kwargs}
    return create_detector(arch, ATTO, num_classes=K, **kwargs)


def _batch() -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]:
    g = torch.Generator().manual_seed(0)
    images, targets = [], []
    for i, (h, w) in enumerate(SIZES):
        boxes = torch.tensor([[10.0, 12.0, 60.0, 70.0], [5.0, 30.0, 40.0, 90.0]])
        masks = torch.zeros(2, h, w, dtype=torch.uint8)
        for m, (x0, y0, x1, y1) in zip(masks, boxes.int().tolist()):
            m[y0:y1, x0:x1] = 1
        images.append(torch.rand(3, h, w, generator=g))
        # label K is there on purpose: torchvision's RetinaNet indexes its logits by label and would need K+1 of them
        targets.append(dict(boxes=boxes, labels=torch.tensor([1, K]), masks=masks, image_id=torch.tensor(i)))
    return images, targets


@pytest.mark.parametrize("arch", ARCHS)
def test_training_gives_finite_losses_and_a_gradient_to_every_parameter(arch):
    model = _build(arch).train()
    images, targets = _batch()
    losses = model(images, targets)
    assert set(losses) == LOSS_KEYS[arch]
    assert all(v.ndim == 0 and torch.isfinite(v) for v in losses.values()), losses
    sum(losses.values()).backward()
    # DDP without find_unused_parameters needs every parameter in the graph (RetinaNet skips C2's output, not C2)
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing


@pytest.mark.parametrize("arch", ARCHS)
def test_predictions_are_in_the_original_image_pixels(arch):
    model = _build(arch).eval()
    images, _ = _batch()
    with torch.no_grad():
        out = model(images)
    assert len(out) == len(images)
    for det, (h, w) in zip(out, SIZES):
        n = len(det["boxes"])
        assert 0 < n <= 8, "score threshold 0: the detections_per_img cap is reached"
        assert det["boxes"].shape == (n, 4) and det["scores"].shape == (n,) and det["labels"].dtype == torch.int64
        b = det["boxes"]
        assert (b[:, 0] >= 0).all() and (b[:, 1] >= 0).all() and (b[:, 2] <= w).all() and (b[:, 3] <= h).all()
        assert ((det["labels"] >= 1) & (det["labels"] <= K)).all()
        assert ((det["scores"] >= 0) & (det["scores"] <= 1)).all()
        if arch == "maskrcnn":
            assert det["masks"].shape == (n, 1, h, w)  # pasted into the original image
            assert ((det["masks"] >= 0) & (det["masks"] <= 1)).all()
        else:
            assert "masks" not in det


@pytest.mark.parametrize("arch", ARCHS)
def test_a_classifier_biased_to_the_last_category_predicts_label_k(arch):
    # labels 1..K in and out: bias the classifier to category K and every detection must carry label K
    model = _build(arch).eval()
    with torch.no_grad():
        if arch == "retinanet":
            logits = model.head.classification_head.cls_logits  # channels: anchor a, category k at a * K + k
            assert model.head.classification_head.num_classes == K  # no dead background logit
            logits.weight.zero_()
            logits.bias.fill_(-10.0)
            logits.bias[K - 1 :: K] = 10.0
        else:
            cls = model.roi_heads.box_predictor.cls_score  # K + 1 softmax outputs, 0 = background
            assert cls.out_features == K + 1
            cls.weight.zero_()
            cls.bias.fill_(-10.0)
            cls.bias[K] = 10.0
        out = model(_batch()[0])
    labels = torch.cat([d["labels"] for d in out])
    assert labels.numel() > 0 and (labels == K).all(), labels


def test_the_transform_resizes_in_eval_only_and_maps_boxes_back():
    model = _build("fasterrcnn")
    images, targets = _batch()
    model.transform.train()
    batch, moved = model.transform(images, [dict(t) for t in targets])
    assert batch.image_sizes == SIZES  # the dataset pipeline resized already
    assert batch.tensors.shape[-2:] == (128, 160)  # padded to a multiple of 32
    assert all(torch.equal(a["boxes"], b["boxes"]) for a, b in zip(moved, targets))
    model.transform.eval()
    batch, _ = model.transform(images)
    # short side to 128 unless the long side would pass 192; torchvision floors the scaled size
    scales = [min(MIN_SIZE / min(h, w), MAX_SIZE / max(h, w)) for h, w in SIZES]
    assert batch.image_sizes == [(math.floor(h * s), math.floor(w * s)) for (h, w), s in zip(SIZES, scales)]
    assert batch.image_sizes == [(122, 192), (153, 128)]
    back = model.transform.postprocess(
        [dict(boxes=torch.tensor([[0.0, 0.0, 192.0, 122.0], [32.0, 51.0, 64.0, 102.0]]))], [(122, 192)], [(96, 150)]
    )
    expected = torch.tensor([[0.0, 0.0, 150.0, 96.0], [25.0, 40.131, 50.0, 80.262]])
    torch.testing.assert_close(back[0]["boxes"], expected, atol=1e-3, rtol=0)
    mean = torch.tensor(inceptionnext.create_model(ATTO).pretrained_cfg["mean"])
    assert model.transform.image_mean == pytest.approx(mean.tolist())


def test_feature_pyramids_of_the_rcnn_family_and_retinanet():
    x = torch.rand(1, 3, 128, 128)
    rcnn = _build("maskrcnn").backbone.eval()
    retina = _build("retinanet").backbone.eval()
    with torch.no_grad():
        p2p6, p3p7 = rcnn(x), retina(x)
    # P2-P5 + max-pooled P6 under the names torchvision's RoI pooling reads; P3-P7 for RetinaNet
    assert {k: tuple(v.shape[1:]) for k, v in p2p6.items()} == {
        "0": (256, 32, 32), "1": (256, 16, 16), "2": (256, 8, 8), "3": (256, 4, 4), "pool": (256, 2, 2)
    }  # fmt: skip
    assert [tuple(v.shape[1:]) for v in p3p7.values()] == [(256, s, s) for s in (16, 8, 4, 2, 1)]
    assert rcnn.feature_strides == [4, 8, 16, 32] and retina.feature_strides == [8, 16, 32]
    atto_channels = [40, 80, 160, 320]
    assert [m.num_features for m in rcnn.stage_norms] == atto_channels
    assert [m.num_features for m in retina.stage_norms] == atto_channels[1:]
    assert retina.fpn.extra_blocks.p6.in_channels == 320  # P6 from C5 (mmdet add_extra_convs="on_input")


def _bn_state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items() if "running_" in k or "num_batches" in k}


def _train_step(model: nn.Module) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    images, targets = _batch()
    sum(model(images, targets).values()).backward()
    opt.step()


def test_frozen_bn_keeps_the_backbone_statistics_and_trains_the_affine_parameters():
    model = _build("fasterrcnn", bn="frozen").train()
    body_bns = [m for m in model.backbone.body.modules() if isinstance(m, nn.BatchNorm2d)]
    assert body_bns and not any(m.training for m in body_bns)
    assert model.backbone.stage_norms[0].training and model.roi_heads.training
    stats, norm_stats = _bn_state(model.backbone.body), _bn_state(model.backbone.stage_norms)
    weight = body_bns[0].weight.detach().clone()
    _train_step(model)
    after = _bn_state(model.backbone.body)
    assert all(torch.equal(v, after[k]) for k, v in stats.items())
    assert not torch.equal(weight, body_bns[0].weight)  # affine parameters still train
    # the fresh stage norms have no statistics to keep and train under every policy
    assert not torch.equal(norm_stats["0.running_mean"], model.backbone.stage_norms[0].running_mean)
    model.eval()
    assert not any(m.training for m in model.modules())


def test_train_bn_updates_the_backbone_statistics():
    model = _build("fasterrcnn", bn="train").train()
    stats = _bn_state(model.backbone.body)
    _train_step(model)
    after = _bn_state(model.backbone.body)
    changed = [k for k, v in stats.items() if k.endswith("running_mean") and not torch.equal(v, after[k])]
    assert len(changed) == sum(k.endswith("running_mean") for k in stats)


def test_sync_conversion_follows_the_policy():
    for bn in ("sync", "frozen"):
        model = convert_sync_batchnorm(_build("fasterrcnn", bn=bn))
        syncs = [n for n, m in model.named_modules() if isinstance(m, nn.SyncBatchNorm)]
        assert any(n.startswith("backbone.body.") for n in syncs) and any("stage_norms" in n for n in syncs)
        model.train()
        body = [m for m in model.backbone.body.modules() if isinstance(m, nn.SyncBatchNorm)]
        assert all(m.training == (bn == "sync") for m in body)
    model = convert_sync_batchnorm(_build("fasterrcnn", bn="train"))
    assert not any(isinstance(m, nn.SyncBatchNorm) for m in model.modules())


def test_the_backbone_loads_a_classification_checkpoint(tmp_path, monkeypatch):
    torch.manual_seed(1)
    classifier = inceptionnext.create_model(ATTO)
    src = classifier.state_dict()
    path = tmp_path / "atto.pth"
    torch.save(src, path)

    def assert_loaded(model):
        own = model.backbone.body.state_dict()
        assert own and all(torch.equal(v, src[k]) for k, v in own.items())
        assert not any(k.startswith("head.") for k in own) and any(k.startswith("head.") for k in src)

    assert_loaded(create_detector("maskrcnn", ATTO, num_classes=K, backbone_checkpoint=path))
    # pretrained_backbone goes through the package's release download: serve the same file instead
    monkeypatch.setattr("inceptionnext.models.factory.fetch_pretrained", lambda name, cfg: path)
    assert_loaded(create_detector("retinanet", ATTO, num_classes=K, pretrained_backbone=True))
    with pytest.raises(ConfigError, match="not both"):
        create_detector("maskrcnn", ATTO, pretrained_backbone=True, backbone_checkpoint=path)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(arch="maskrcnnn"), "did you mean 'maskrcnn'"),
        (dict(arch="maskrcnn", backbone="inceptionnext_tinyy"), "inceptionnext_tiny"),
        (dict(arch="maskrcnn", num_classes=0), "num_classes"),
        (dict(arch="maskrcnn", bn="freeze"), "BatchNorm policy"),
        (dict(arch="maskrcnn", stage_norm="groupnorm"), "stage_norm"),
        (dict(arch="maskrcnn", min_size=900, max_size=800), "min_size"),
        (dict(arch="maskrcnn", drop_path_rate=1.5), "drop_path_rate"),
        (dict(arch="maskrcnn", box_detection_per_img=5), "did you mean box_detections_per_img"),
        (dict(arch="retinanet", box_score_thresh=0.1), "box_score_thresh"),  # an R-CNN argument
    ],
)
def test_bad_arguments_raise_config_errors(kwargs, match):
    kwargs.setdefault("backbone", ATTO)
    with pytest.raises(ConfigError, match=match), torch.device("meta"):
        create_detector(**kwargs)


def test_labels_outside_the_categories_raise():
    model = _build("retinanet").train()
    images, targets = _batch()
    targets[1]["labels"] = torch.tensor([0, K])  # 0 is background, never a target
    with pytest.raises(ConfigError, match="outside 1..3"):
        model(images, targets)
    targets[1]["labels"] = torch.tensor([1, K + 1])
    with pytest.raises(ConfigError, match="num_classes"):
        model(images, targets)


def test_registry_names_and_drop_path_defaults():
    for arch in ARCHS:
        for size in ("atto", "tiny", "small", "base"):
            assert f"{arch}_inceptionnext_{size}_fpn" in list_detectors()
    assert list_detectors("retinanet_inceptionnext_*") == [
        f"retinanet_inceptionnext_{s}_fpn" for s in ("atto", "base", "small", "tiny")
    ]
    with pytest.raises(ConfigError, match="did you mean maskrcnn_inceptionnext_tiny_fpn"):
        create_named_detector("maskrcnn_inceptionnext_tiny")
    # ConvNeXt's COCO configs: Mask R-CNN 3x T 0.4; Cascade 3x T/S/B 0.4/0.6/0.7
    assert (DROP_PATH_DET["inceptionnext_tiny"], DROP_PATH_DET["inceptionnext_small"]) == (0.4, 0.6)
    with torch.device("meta"):
        model = create_named_detector("maskrcnn_inceptionnext_base_fpn")
        explicit = create_named_detector("maskrcnn_inceptionnext_base_fpn", drop_path_rate=0.05)
    assert model.backbone.body.stages[-1].blocks[-1].drop_path.drop_prob == pytest.approx(0.7)
    assert explicit.backbone.body.stages[-1].blocks[-1].drop_path.drop_prob == pytest.approx(0.05)
    assert model.num_classes == 80 and model.roi_heads.box_predictor.cls_score.out_features == 81
    assert model.bn_policy == "sync" and model.transform.min_size == (800,) and model.transform.max_size == 1333
    assert model.roi_heads.detections_per_img == 100 and model.rpn._post_nms_top_n["training"] == 1000


def _rcnn_head_macs(num_classes: int, mask: bool) -> int:
    """mmdet's get_flops protocol by hand: two FC layers + predictor on 1000 RoIs of 256x7x7; four 3x3 convs, a 2x2
    stride-2 deconv and a 1x1 predictor on 100 RoIs of 256x14x14 (num_classes counts the background)."""
    box = 1000 * (256 * 7 * 7 * 1024 + 1024 * 1024 + 1024 * num_classes + 1024 * 4 * num_classes)
    masks = 100 * (4 * 9 * 256 * 256 * 14 * 14 + 256 * 256 * 4 * 14 * 14 + 256 * num_classes * 28 * 28)
    return box + (masks if mask else 0)


def test_complexity_protocol_against_torchvision_and_the_published_convnext_row():
    from torchvision.models.detection import MaskRCNN_ResNet50_FPN_Weights

    with torch.device("meta"):
        r50 = torchvision_maskrcnn_resnet50()
        convnext = create_named_detector("maskrcnn_convnext_tiny_fpn")
        ours = create_named_detector("maskrcnn_inceptionnext_tiny_fpn")
    c_r50, c_cnx, c_ours = (detector_complexity(m) for m in (r50, convnext, ours))
    # the parameter counter against torchvision's documented figure (docs and weights meta)
    assert c_r50["params"] == 44_401_393 == MaskRCNN_ResNet50_FPN_Weights.COCO_V1.meta["num_params"]
    # the RoI heads against the hand count of mmdet's protocol
    assert c_r50["box_macs"] + c_r50["mask_macs"] == _rcnn_head_macs(91, mask=True)
    assert c_ours["box_macs"] + c_ours["mask_macs"] == _rcnn_head_macs(81, mask=True)
    # the whole protocol against ConvNeXt-T's published Mask R-CNN row (48M, 262G at 1280x800)
    pub = PUBLISHED_DET["convnext_tiny"]
    row = f"ConvNeXt-T {c_cnx['params'] / 1e6:.2f}M {c_cnx['macs'] / 1e9:.1f}G"
    assert as_printed(c_cnx["params"] / 1e6, pub["params_m"]) == pub["params_m"], row
    assert round(c_cnx["macs"] / 1e9) == int(pub["macs_g"]), row
    table = (
        f"InceptionNeXt-T Mask R-CNN at 1280x800: {c_ours['params']:,} params, {c_ours['macs'] / 1e9:.1f} GMACs "
        f"(dense {c_ours['dense_macs'] / 1e9:.1f}); {row}; R-50 {c_r50['macs'] / 1e9:.1f}G"
    )
    print(table)
    # InceptionNeXt-T's backbone is lighter than ConvNeXt-T's (Table 4: 28M / 4.2G vs 29M / 4.5G), the rest is shared
    assert c_ours["params"] < c_cnx["params"] and c_ours["macs"] < c_cnx["macs"], table
    assert c_ours["box_macs"] == c_cnx["box_macs"] and c_ours["mask_macs"] == c_cnx["mask_macs"], table


def test_complexity_of_a_real_model_equals_its_meta_twin():
    real = _build("retinanet")
    with torch.device("meta"):
        meta = _build("retinanet")
    assert detector_complexity(real, (128, 160)) == detector_complexity(meta, (128, 160))
    assert next(real.parameters()).device.type == "cpu"  # counted on a copy
