"""Detection on the engine core: the mmdet schedule, ConvNeXt's layer-wise decay groups, recipes, and end to end
through the command line (train, kill + resume = the same weights, eval reproduces the logged AP, predict draws)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import free_port
from inceptionnext.detection.config import resolve_det_config
from inceptionnext.detection.engine import detection_param_groups, layer_id, step_lr
from inceptionnext.engine.run import FAULT_ENV
from inceptionnext.errors import ConfigError


def test_step_schedule_is_mmdets_linear_warmup_then_steps():
    cfg = resolve_det_config("maskrcnn_tiny_1x")
    lr = 1e-4
    assert step_lr(0, 0, cfg, lr) == pytest.approx(lr * 0.001)  # warm-up starts at warmup_ratio
    # mmcv's linear warm-up: k = (1 - iter / warmup_iters) * (1 - warmup_ratio); lr = regular_lr * (1 - k)
    assert step_lr(250, 0, cfg, lr) == pytest.approx(lr * (1 - 0.5 * 0.999))
    assert step_lr(500, 0, cfg, lr) == pytest.approx(lr)
    assert step_lr(10_000, 7, cfg, lr) == pytest.approx(lr)
    assert step_lr(10_000, 8, cfg, lr) == pytest.approx(lr * 0.1)  # after epoch 8 (0-based epoch 8 = 9th epoch)
    assert step_lr(10_000, 11, cfg, lr) == pytest.approx(lr * 0.01)


def test_layer_ids_follow_convnexts_rule_on_inceptionnext_t_depths():
    """get_num_layer_layer_wise with num_layers 6 on a 3-3-9-3 backbone."""
    n = 6
    assert layer_id("backbone.body.stem.0.weight", n) == 0
    assert layer_id("backbone.body.stages.0.blocks.2.mlp.fc1.weight", n) == 1
    assert layer_id("backbone.body.stages.1.downsample.1.weight", n) == 2
    assert layer_id("backbone.body.stages.1.blocks.0.gamma", n) == 2
    assert layer_id("backbone.body.stages.2.downsample.1.weight", n) == 3
    assert [layer_id(f"backbone.body.stages.2.blocks.{b}.gamma", n) for b in range(9)] == [3, 3, 3, 4, 4, 4, 5, 5, 5]
    assert layer_id("backbone.body.stages.3.downsample.1.weight", n) == 6
    assert layer_id("backbone.body.stages.3.blocks.2.gamma", n) == 6
    assert layer_id("backbone.fpn.inner_blocks.0.0.weight", n) == 7
    assert layer_id("roi_heads.box_head.fc6.weight", n) == 7


def test_parameter_groups_decay_and_scale():
    cfg = resolve_det_config("maskrcnn_tiny_3x")
    model = torch.nn.Module()
    model.backbone = torch.nn.Module()
    model.backbone.body = torch.nn.Module()
    model.backbone.body.stem = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    model.head = torch.nn.Linear(4, 2)
    groups = detection_param_groups(model, cfg, 1e-4)
    by_param = {id(p): g for g in groups for p in g["params"]}
    conv_w, conv_b = model.backbone.body.stem[0].weight, model.backbone.body.stem[0].bias
    assert by_param[id(conv_w)]["weight_decay"] == 0.05 and by_param[id(conv_b)]["weight_decay"] == 0.0  # '1d' rule
    assert by_param[id(model.backbone.body.stem[1].weight)]["weight_decay"] == 0.0
    # ConvNeXt: scale = decay_rate ** (num_layers + 2 - layer_id - 1): stem 0.95^7, heads 0.95^0
    assert by_param[id(conv_w)]["lr"] == pytest.approx(1e-4 * 0.95**7)
    assert by_param[id(model.head.weight)]["lr"] == pytest.approx(1e-4)


def test_sgd_recipe_builds_mmdets_optimizer():
    """retinanet_tiny_1x: SGD with momentum, weight decay on every parameter (mmdet's default constructor)."""
    from inceptionnext.detection.engine import build_det_optimizer

    cfg = resolve_det_config("retinanet_tiny_1x")
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    opt = build_det_optimizer(detection_param_groups(model, cfg, 0.01), cfg, 0.01, model)
    assert isinstance(opt, torch.optim.SGD) and opt.defaults["momentum"] == 0.9
    assert all(g["weight_decay"] == 1e-4 for g in opt.param_groups)
    assert sum(len(g["params"]) for g in opt.param_groups) == 4  # conv weight, bias, BN weight, bias
    adamw = resolve_det_config("fasterrcnn_tiny_1x")
    opt = build_det_optimizer(detection_param_groups(model, adamw, 1e-4), adamw, 1e-4, model)
    assert isinstance(opt, torch.optim.AdamW)
    assert sorted(g["weight_decay"] for g in opt.param_groups) == [0.0, 0.05]  # 'norms': BN without decay


def test_recipes_resolve_and_bad_values_are_config_errors():
    for name in ("maskrcnn_tiny_1x", "maskrcnn_tiny_3x", "digits"):
        cfg = resolve_det_config(name)
        assert cfg.arch == "maskrcnn" and cfg.optimizer == "adamw"
    faster, retina = resolve_det_config("fasterrcnn_tiny_1x"), resolve_det_config("retinanet_tiny_1x")
    assert (faster.arch, faster.optimizer, faster.lr, faster.pipeline) == ("fasterrcnn", "adamw", 1e-4, "single")
    # mmdet configs/swin/retinanet_swin-t-p4-w7_fpn_1x_coco.py: SGD 0.01, momentum 0.9, wd 1e-4, drop path 0.2
    assert (retina.arch, retina.optimizer, retina.lr, retina.momentum) == ("retinanet", "sgd", 0.01, 0.9)
    assert (retina.weight_decay, retina.no_decay, retina.drop_path, retina.lr_steps) == (1e-4, "none", 0.2, [8, 11])
    three = resolve_det_config("maskrcnn_tiny_3x")
    assert (three.epochs, three.lr_steps, three.layer_decay, three.drop_path) == (36, [27, 33], 0.95, 0.4)
    with pytest.raises(ConfigError, match="arch"):
        resolve_det_config(None, {"arch": "yolo"})
    with pytest.raises(ConfigError, match="bn"):
        resolve_det_config(None, {"bn": "group"})


# ------------------------------------------------------------------------------------------ end to end (CLI)
def _tiny_args(data: Path, out: Path, *extra: str) -> list[str]:
    # the digits recipe's detector, narrower and on 16 small composites: 8 steps per epoch
    return [
        "--recipe", "digits", "--data", str(data), "--output", str(out), "--epochs", "2", "--eval-interval", "1",
        "--batch-size", "2", "--lr-base-batch", "2", "--warmup-iters", "2", "--workers", "0", "--log-interval", "2",
        "--head-channels", "32", "--rpn-batch-size", "32", "--roi-batch-size", "32", "--scale", "128", "96",
        "--min-size", "96", "--max-size", "128", *extra,
    ]  # fmt: skip


def _cli(args: list[str], env: dict | None = None, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "inceptionnext", "detect", *args], text=True, capture_output=True,
        env={**os.environ, **(env or {})}, timeout=900, **kw,
    )  # fmt: skip


def test_dry_run_prints_the_resolved_recipe(tmp_path):
    r = _cli(["train", "--recipe", "maskrcnn_tiny_3x", "--output", str(tmp_path / "x"), "--dry-run"])
    assert r.returncode == 0, r.stderr
    assert "layer_decay: 0.95" in r.stdout and "lr_steps:" in r.stdout
    assert not (tmp_path / "x").exists()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One short uninterrupted run and one killed after 3 steps and resumed, on the same settings."""
    from inceptionnext.detection.data import write_composites_coco

    root = tmp_path_factory.mktemp("det")
    data = write_composites_coco(root / "coco", num_train=16, num_val=8)
    full = _cli(["train", *_tiny_args(data, root / "full")])
    assert full.returncode == 0, full.stderr[-3000:]
    # killed in epoch 2 (step 11 of 16): the resume restarts epoch 2 from the checkpoint of epoch 1
    killed = _cli(["train", *_tiny_args(data, root / "cut")], env={FAULT_ENV: "11"})
    assert killed.returncode == 137, killed.stderr[-3000:]
    resumed = _cli(["train", *_tiny_args(data, root / "cut")])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    return root


def test_killed_run_resumes_to_the_same_weights(trained):
    a = torch.load(trained / "full" / "last.pth", weights_only=True)
    b = torch.load(trained / "cut" / "last.pth", weights_only=True)
    assert a["step"] == b["step"] == 16
    for k in a["model"]:
        torch.testing.assert_close(b["model"][k], a["model"][k], rtol=0, atol=0, msg=k)


def test_eval_reproduces_the_logged_ap(trained, tmp_path):
    summary = json.loads((trained / "full" / "summary.json").read_text())
    r = _cli(["eval", "--checkpoint", str(trained / "full" / "last.pth"), "--output", str(tmp_path)])
    # the checkpoint names its data folder (--data), which eval reads again
    assert r.returncode == 0, r.stderr
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["bbox_AP"] == pytest.approx(summary["last"]["bbox_AP"], abs=1e-6)
    assert metrics["segm_AP"] == pytest.approx(summary["last"]["segm_AP"], abs=1e-6)
    results = json.loads((tmp_path / "results.json").read_text())
    assert isinstance(results, list)


def test_predict_draws_and_writes_json(trained, tmp_path):
    import numpy as np
    from PIL import Image

    img = tmp_path / "in.png"
    Image.fromarray((np.random.default_rng(0).random((96, 128, 3)) * 255).astype(np.uint8)).save(img)
    (tmp_path / "broken.png").write_bytes(b"not an image")
    out = tmp_path / "pred"
    r = _cli(["predict", str(img), str(tmp_path / "broken.png"), "--checkpoint", str(trained / "full" / "last.pth"),
              "--output", str(out), "--score-threshold", "0"])  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "skipped" in r.stderr and "broken.png" in r.stderr
    drawn = Image.open(out / "in_detections.png")
    assert drawn.size == (128, 96)
    records = json.loads((out / "detections.json").read_text())
    assert len(records) == 1 and records[0]["image"].endswith("in.png")


def _torchrun_detect(args: list[str], env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
         "-m", "inceptionnext", "detect", "train", *args],
        capture_output=True, text=True, timeout=900, env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
    )  # fmt: skip


def test_two_process_torchrun_trains_splits_data_keeps_frozen_bn_and_resumes(tmp_path):
    """torchrun with 2 CPU processes (gloo): each process takes half of every global batch (16 images, batch 2 per
    process: 4 steps per epoch); the backbone's BatchNorm statistics from a classification checkpoint stay as they
    were under ``--bn frozen`` while its affine parameters train; the evaluation gathers every val image from both
    processes once (``detect eval`` in one process reproduces the logged AP); and a run killed in epoch 2 resumes in
    2 processes to the uninterrupted run's weights, bit for bit."""
    from inceptionnext.detection.data import write_composites_coco
    from inceptionnext.models import create_model

    data = write_composites_coco(tmp_path / "coco", num_train=16, num_val=8)
    cls = create_model("inceptionnext_atto")
    with torch.no_grad():  # statistics no detection batch would give
        for m in cls.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    torch.save({"model": cls.state_dict(), "model_name": "inceptionnext_atto"}, tmp_path / "cls.pth")
    extra = ("--bn", "frozen", "--backbone-checkpoint", str(tmp_path / "cls.pth"))
    full = _torchrun_detect(_tiny_args(data, tmp_path / "full", *extra))
    assert full.returncode == 0, full.stderr[-3000:]
    ckpt = torch.load(tmp_path / "full" / "last.pth", weights_only=True)
    assert ckpt["world_size"] == 2 and ckpt["step"] == 2 * (16 // (2 * 2))
    assert ckpt["config"]["bn"] == "frozen"
    trained, init = ckpt["model"], cls.state_dict()
    bn_keys = [k for k in init if k.endswith(("running_mean", "running_var"))]
    assert bn_keys
    for k in bn_keys:  # frozen: eval-mode BN in every process
        torch.testing.assert_close(trained[f"backbone.body.{k}"], init[k], rtol=0, atol=0, msg=k)
    assert not torch.equal(trained["backbone.body.stem.1.weight"], init["stem.1.weight"])  # affine still trains
    stage_norm = [k for k in trained if k.startswith("backbone.stage_norms.") and k.endswith("running_mean")]
    assert stage_norm and any(trained[k].abs().sum() > 0 for k in stage_norm)  # the fresh stage norms are not frozen

    summary = json.loads((tmp_path / "full" / "summary.json").read_text())
    # one process with the trainers' one thread each: the same convolution numerics as the 2-process evaluation
    ev = _cli(["eval", "--checkpoint", str(tmp_path / "full" / "last.pth"), "--output", str(tmp_path / "ev")],
              env={"OMP_NUM_THREADS": "1"})  # fmt: skip
    assert ev.returncode == 0, ev.stderr
    metrics = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    for k in ("bbox_AP", "bbox_AP50", "segm_AP"):
        assert metrics[k] == pytest.approx(summary["last"][k], abs=1e-6), k

    cut = _tiny_args(data, tmp_path / "cut", *extra)
    killed = _torchrun_detect(cut, env={FAULT_ENV: "6"})  # both processes die in epoch 2
    assert killed.returncode != 0
    assert torch.load(tmp_path / "cut" / "last.pth", weights_only=True)["step"] == 4
    resumed = _torchrun_detect(cut)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    again = torch.load(tmp_path / "cut" / "last.pth", weights_only=True)["model"]
    for k in trained:
        torch.testing.assert_close(again[k], trained[k], rtol=0, atol=0, msg=k)


def test_frozen_bn_needs_a_trained_backbone():
    with pytest.raises(ConfigError, match="--pretrained or --backbone-checkpoint"):
        resolve_det_config("digits", {"bn": "frozen"})
    assert resolve_det_config("digits", {"bn": "frozen", "backbone_checkpoint": "x.pth"}).bn == "frozen"


def test_a_classification_checkpoint_is_refused_by_eval(tmp_path):
    from inceptionnext.models import create_model

    ckpt = tmp_path / "cls.pth"
    torch.save({"model": create_model("inceptionnext_atto").state_dict(), "model_name": "inceptionnext_atto"}, ckpt)
    r = _cli(["eval", "--checkpoint", str(ckpt)])
    assert r.returncode == 2 and "not a detection checkpoint" in r.stderr


def test_digits_recipe_builds_the_narrow_channels_last_detector():
    from inceptionnext.detection.engine import build_detector
    from inceptionnext.detection.models import DetectionBackbone

    cfg = resolve_det_config("digits")
    model = build_detector(cfg, 10)
    backbone = next(m for m in model.modules() if isinstance(m, DetectionBackbone))
    assert backbone.channels_last and backbone.out_channels == 64
    conv = model.backbone.body.stem[0].weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    assert model.roi_heads.box_head.fc7.out_features == 256  # 4 x head_channels
    assert [s[0] for s in model.rpn.anchor_generator.sizes] == [16, 32, 64, 128, 256]
    assert model.roi_heads.fg_bg_sampler.batch_size_per_image == 64
    assert model.rpn.fg_bg_sampler.batch_size_per_image == 128
    assert model.rpn._pre_nms_top_n["training"] == 1000 and model.rpn._post_nms_top_n["training"] == 500
    # channels-last and NCHW compute the same detector
    model.eval()
    x = [torch.rand(3, 96, 128)]
    with torch.no_grad():
        a = model.backbone(torch.stack(x))
        backbone.channels_last = False
        b = model.backbone(torch.stack(x))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-4)


def test_anchor_sizes_are_checked():
    with pytest.raises(ConfigError, match="anchor_sizes"):
        resolve_det_config("digits", {"anchor_sizes": [16, 32]})
    with pytest.raises(ConfigError, match="RetinaNet"):
        resolve_det_config("digits", {"arch": "retinanet"})


def test_task_checkpoints_from_another_version_or_task_are_refused(tmp_path):
    from inceptionnext.checkpoint import CheckpointError
    from inceptionnext.detection.config import DetConfig
    from inceptionnext.engine.checkpointing import read_task_config
    from inceptionnext.segmentation.config import SegConfig

    newer = tmp_path / "newer.pth"
    torch.save({"config": {"arch": "maskrcnn", "future_knob": 1}, "class_names": ["a"], "model": {}}, newer)
    with pytest.raises(CheckpointError, match="future_knob"):
        read_task_config(newer, DetConfig, key="arch", task="detection", command="detect")
    seg = tmp_path / "seg.pth"
    torch.save({"config": {"head": "fpn"}, "class_names": ["a"], "model": {}}, seg)
    with pytest.raises(CheckpointError, match="not a detection checkpoint"):
        read_task_config(seg, DetConfig, key="arch", task="detection", command="detect")
    cfg, _ = read_task_config(seg, SegConfig, key="head", task="segmentation", command="segment")
    assert cfg.head == "fpn" and cfg.pretrained is False
