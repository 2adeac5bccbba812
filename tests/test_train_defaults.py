"""Training defaults of issue 12: EMA BatchNorm recalibration, the opt-in fused mixer, logs without a terminal."""

import copy
import dataclasses
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from timm.utils import ModelEmaV3
from torch import nn

from inceptionnext.cli import main
from inceptionnext.engine import resolve_config, train
from inceptionnext.engine.classification import build_model
from inceptionnext.engine.ema import RecalibrationBatches, recalibrate_bn
from inceptionnext.engine.run import FAULT_ENV
from inceptionnext.errors import ConfigError
from inceptionnext.layers import TritonInceptionDWConv2d


def _digits() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    d = load_digits()
    return torch.tensor(d.images, dtype=torch.float32)[:, None] / 16, torch.tensor(d.target)


def _bn_net() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1),
        nn.BatchNorm2d(32), nn.ReLU(), nn.Dropout(0.5), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10),
    )  # fmt: skip


@torch.no_grad()
def _scores(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    model.eval()
    logits = model(x)
    return 100 * (logits.argmax(1) == y).float().mean().item(), nn.functional.cross_entropy(logits, y).item()


def _lagging_ema(steps: int = 20) -> tuple[nn.Module, ModelEmaV3, torch.Tensor, torch.Tensor]:
    """A fast run (high lr, few steps): the EMA's BatchNorm statistics trail its weights."""
    torch.manual_seed(0)
    x, y = _digits()
    model = _bn_net()
    ema = ModelEmaV3(model, decay=0.9)
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    for step in range(steps):
        idx = torch.randint(0, 1400, (64,))
        loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        ema.update(model, step=step + 1)
    return model, ema, x, y


def test_recalibrated_ema_statistics_are_the_batches_cumulative_statistics_and_score_much_better():
    model, ema, x, y = _lagging_ema()
    raw_state = copy.deepcopy(model.state_dict())
    val_x, val_y = x[1400:], y[1400:]
    lagging = _scores(ema.module, val_x, val_y)
    batches = [x[i : i + 64] for i in range(0, 64 * 8, 64)]
    bns = [m for m in ema.module.modules() if isinstance(m, nn.BatchNorm2d)]
    inputs: dict[nn.Module, list[torch.Tensor]] = {m: [] for m in bns}
    hooks = [m.register_forward_pre_hook(lambda m, a: inputs[m].append(a[0].detach())) for m in bns]
    weights = {k: v.clone() for k, v in ema.module.state_dict().items() if "running" not in k}
    rng = (torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate())
    ema.module.eval()

    assert recalibrate_bn(ema.module, batches) == len(batches)

    for h in hooks:
        h.remove()
    for m in bns:  # the cumulative average of each batch's mean and unbiased variance, computed directly
        assert len(inputs[m]) == len(batches)
        mean = torch.stack([t.mean((0, 2, 3)) for t in inputs[m]]).mean(0)
        var = torch.stack([t.transpose(0, 1).flatten(1).var(1, unbiased=True) for t in inputs[m]]).mean(0)
        torch.testing.assert_close(m.running_mean, mean, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(m.running_var, var, rtol=1e-5, atol=1e-6)
        assert m.momentum == 0.1  # restored
    # the statistics only: weights, num_batches_tracked, modes, the raw model and every RNG are as they were
    for k, v in ema.module.state_dict().items():
        if "running" not in k:
            assert torch.equal(v, weights[k]), k
    assert not any(m.training for m in ema.module.modules())
    for k, v in model.state_dict().items():
        assert torch.equal(v, raw_state[k]), k
    assert torch.equal(torch.get_rng_state(), rng[0]) and np.array_equal(np.random.get_state()[1], rng[1])
    assert random.getstate() == rng[2]
    recalibrated = _scores(ema.module, val_x, val_y)
    assert recalibrated[0] > lagging[0] + 30 and recalibrated[1] < lagging[1] - 0.3, (lagging, recalibrated)


def test_recalibration_batches_are_a_fixed_draw_per_epoch_and_leave_the_global_rng_alone():
    x, y = _digits()
    data = list(zip(x[:300], y[:300].tolist()))
    make = dict(num_batches=4, batch_size=16, seed=3)
    first = RecalibrationBatches(data, lambda t: t * 2, **make)
    rng = torch.get_rng_state()
    a = [b.clone() for b in first(0, torch.device("cpu"))]
    assert torch.equal(torch.get_rng_state(), rng)
    assert len(a) == 4 and a[0].shape == (16, 1, 8, 8)
    again = [b.clone() for b in RecalibrationBatches(data, lambda t: t * 2, **make)(0, torch.device("cpu"))]
    assert all(torch.equal(p, q) for p, q in zip(a, again))  # a resumed run draws the same images
    other_epoch = list(first(1, torch.device("cpu")))
    assert not all(torch.equal(p, q) for p, q in zip(a, other_epoch))
    # two processes draw disjoint images; never more than an epoch's batches
    ranks = [RecalibrationBatches(data, lambda t: t, **make, rank=r, world_size=2) for r in (0, 1)]
    idx = [set(iter(r.sampler)) for r in ranks]
    assert len(idx[0]) == len(idx[1]) == 64 and not idx[0] & idx[1]
    assert RecalibrationBatches(data, lambda t: t, num_batches=100, batch_size=16, seed=0).num_batches == 300 // 16


def test_layernorm_model_is_left_alone():
    model = build_model(resolve_config(None, {"model_kwargs": {"norm": "layernorm"}, "img_size": 32}), 4)
    state = copy.deepcopy(model.state_dict())
    assert recalibrate_bn(model, [torch.randn(2, 3, 32, 32)]) == 0
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def _cfg(out: Path, data: Path, **kw):
    base = dict(
        model="inceptionnext_atto", data=str(data), img_size=32, epochs=1, batch_size=16, lr=2e-3, lr_base_batch=16,
        warmup_epochs=0.5, aa=None, color_jitter=0.0, hflip=0.0, reprob=0.0, mixup=0.0, cutmix=0.0, drop_path=0.0,
        workers=0, output=str(out), crop_pct=1.0, log_interval=2, model_ema=True, model_ema_decay=0.9,
    )  # fmt: skip
    base.update(kw)
    return resolve_config(None, base)


def test_recalibration_changes_only_the_ema_statistics_and_is_a_no_op_for_layernorm(tmp_path, digits_folder):
    runs = {}
    for norm in ("batchnorm", "layernorm"):
        for recal in (0, 32):
            out = tmp_path / f"{norm}{recal}"
            # two epochs with drop path and Mixup (global RNG): epoch 2 trains after epoch 1's recalibration
            cfg = _cfg(out, digits_folder, ema_bn_recal=recal, model_kwargs={"norm": norm}, epochs=2)
            train(dataclasses.replace(cfg, drop_path=0.1, mixup=0.2))
            runs[norm, recal] = torch.load(out / "last.pth", weights_only=True)
    for norm in ("batchnorm", "layernorm"):
        off, on = runs[norm, 0], runs[norm, 32]
        for k in off["model"]:  # the raw model and its training (data order, RNG streams) are untouched
            assert torch.equal(off["model"][k], on["model"][k]), k
        changed = {k for k in off["ema"] if not torch.equal(off["ema"][k], on["ema"][k])}
        if norm == "layernorm":
            assert not changed
        else:  # the EMA's running statistics, nothing else
            assert changed and all(k.endswith(("running_mean", "running_var")) for k in changed), changed


def _run_cli(args: list[str], env: dict | None = None, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "inceptionnext", "train", *args], text=True,
                          env={**os.environ, **(env or {})}, timeout=600, **kw)  # fmt: skip


def _cli_args(out: Path, data: Path, *extra: str) -> list[str]:
    return [
        "--data", str(data), "--output", str(out), "--model", "inceptionnext_atto", "--img-size", "32",
        "--epochs", "2", "--batch-size", "16", "--lr", "2e-3", "--lr-base-batch", "16", "--warmup-epochs", "1",
        "--aa", "none", "--hflip", "0.5", "--scale", "0.6", "1.0", "--reprob", "0", "--mixup", "0.2",
        "--cutmix", "0", "--drop-path", "0.1", "--workers", "0", "--crop-pct", "1.0", "--log-interval", "2",
        "--model-ema", "--model-ema-decay", "0.9", "--ema-bn-recal", "3", *extra,
    ]  # fmt: skip


def test_killed_run_with_ema_recalibration_resumes_to_the_same_weights(tmp_path, digits_folder):
    full = _run_cli(_cli_args(tmp_path / "full", digits_folder), capture_output=True)
    assert full.returncode == 0, full.stderr
    killed = _run_cli(_cli_args(tmp_path / "cut", digits_folder), env={FAULT_ENV: "9"}, capture_output=True)
    assert killed.returncode == 137
    resumed = _run_cli(_cli_args(tmp_path / "cut", digits_folder), capture_output=True)
    assert resumed.returncode == 0, resumed.stderr
    a = torch.load(tmp_path / "full" / "last.pth", weights_only=True)
    b = torch.load(tmp_path / "cut" / "last.pth", weights_only=True)
    for part in ("model", "ema"):
        for k in a[part]:
            torch.testing.assert_close(b[part][k], a[part][k], rtol=0, atol=0, msg=f"{part}.{k}")


def test_log_without_a_terminal_has_step_lines_and_no_bar_redraws(tmp_path, digits_folder):
    env = {k: v for k, v in os.environ.items() if k != "INCEPTIONNEXT_NO_PROGRESS"}
    args = _cli_args(tmp_path / "run", digits_folder, "--epochs", "2", "--no-model-ema")
    with open(tmp_path / "stderr.txt", "w") as err, open(tmp_path / "stdout.txt", "w") as out:
        done = subprocess.run([sys.executable, "-m", "inceptionnext", "train", *args], stdout=out, stderr=err,
                              env=env, timeout=600)  # fmt: skip
    log = (tmp_path / "stderr.txt").read_text()
    assert done.returncode == 0, log
    text = log + (tmp_path / "stdout.txt").read_text()
    assert "\r" not in text
    steps = [line for line in log.splitlines() if " step " in line]
    # 6 steps per epoch, a line every 2: steps 2, 4, 6 of each epoch
    assert [s.split(":")[0] for s in steps] == [f"epoch {e}/2 step {n}/6" for e in (1, 2) for n in (2, 4, 6)]
    assert all("loss " in s and "lr " in s for s in steps)
    assert "epoch 2/2: train loss" in (tmp_path / "stdout.txt").read_text()  # and a line per epoch


def test_no_progress_variable_still_silences_the_step_lines(tmp_path, digits_folder, capfd, monkeypatch):
    monkeypatch.setenv("INCEPTIONNEXT_NO_PROGRESS", "1")
    train(_cfg(tmp_path / "quiet", digits_folder, model_ema=False))
    err = capfd.readouterr().err
    assert " step " not in err and "\r" not in err
    monkeypatch.delenv("INCEPTIONNEXT_NO_PROGRESS")  # without it (and without a terminal): the lines, no bars
    train(_cfg(tmp_path / "loud", digits_folder, model_ema=False))
    err = capfd.readouterr().err
    assert "epoch 1/1 step 6/6: loss" in err and "\r" not in err


def test_fused_mixer_flag_reaches_the_model_and_is_refused_without_an_inception_mixer(capsys):
    assert resolve_config(None).fused_mixer is False  # cuDNN's path stays the default
    assert main(["train", "--recipe", "digits", "--fused-mixer", "--dry-run"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["fused_mixer"] is True
    model = build_model(resolve_config(None, {"fused_mixer": True, "img_size": 32}), 4)
    mixers = [m for m in model.modules() if "Inception" in type(m).__name__]
    assert mixers and all(isinstance(m, TritonInceptionDWConv2d) for m in mixers)
    plain = build_model(resolve_config(None, {"img_size": 32}), 4)
    assert not any(isinstance(m, TritonInceptionDWConv2d) for m in plain.modules())
    assert list(model.state_dict()) == list(plain.state_dict())  # same checkpoint keys
    with pytest.raises(ConfigError, match="fused_mixer: convnext_atto has no Inception"):
        build_model(resolve_config(None, {"model": "convnext_atto", "fused_mixer": True, "img_size": 32}), 4)


def test_fused_mixer_reaches_the_segmentation_backbone():
    from inceptionnext.segmentation.config import resolve_seg_config
    from inceptionnext.segmentation.engine import build_segmentor

    cfg = resolve_seg_config(None, {"backbone": "inceptionnext_atto", "fused_mixer": True, "head": "fpn"})
    mixers = [m for m in build_segmentor(cfg, 4).backbone.modules() if "Inception" in type(m).__name__]
    assert mixers and all(isinstance(m, TritonInceptionDWConv2d) for m in mixers)


def test_benchmark_triton_impl_measures_the_swapped_model_and_leaves_the_given_one_alone():
    from inceptionnext import create_model
    from inceptionnext.benchmark import measure

    model = create_model("inceptionnext_atto", num_classes=10)
    for mode in ("infer", "train"):
        m = measure("inceptionnext_atto", impl="triton", mode=mode, device="cpu", batch_size=2, img_size=32, warmup=1,
                    steps=1, model=create_model("inceptionnext_atto", num_classes=10) if mode == "train" else model,
                    protocol="this")  # fmt: skip
        assert m.error is None and m.step_ms_median > 0, m.error
    assert not any(isinstance(x, TritonInceptionDWConv2d) for x in model.modules())  # measured on a copy
    bad = measure("convnext_atto", impl="triton", device="cpu", batch_size=2, img_size=32, warmup=1, steps=1)
    assert "needs one of this package's models" in bad.error


def test_persistent_loader_workers_give_the_run_of_no_workers_and_resume_exactly(tmp_path, digits_folder):
    """Workers live across epochs (persistent) and never see ``set_epoch``: the (epoch, index) keys still seed every
    sample with its epoch. Before the keys, the second epoch of a 2-worker run replayed the first one's crops and
    flips, so its weights differed from the in-process run's; a kill in epoch 2 + resume must also match."""
    common = ("--no-model-ema", "--epochs", "2", "--reprob", "0.5")  # erasing: the main process's python RNG
    inproc = _run_cli(_cli_args(tmp_path / "w0", digits_folder, *common), capture_output=True)
    assert inproc.returncode == 0, inproc.stderr
    two = _run_cli(_cli_args(tmp_path / "w2", digits_folder, *common, "--workers", "2"), capture_output=True)
    assert two.returncode == 0, two.stderr
    killed = _run_cli(
        _cli_args(tmp_path / "cut", digits_folder, *common, "--workers", "2"), env={FAULT_ENV: "9"}, capture_output=True
    )
    assert killed.returncode == 137
    resumed = _run_cli(_cli_args(tmp_path / "cut", digits_folder, *common, "--workers", "2"), capture_output=True)
    assert resumed.returncode == 0, resumed.stderr
    a = torch.load(tmp_path / "w0" / "last.pth", weights_only=True)["model"]
    for run in ("w2", "cut"):
        b = torch.load(tmp_path / run / "last.pth", weights_only=True)["model"]
        for k in a:
            torch.testing.assert_close(b[k], a[k], rtol=0, atol=0, msg=f"{run}: {k}")


def test_seeded_transform_gives_the_same_sample_in_a_worker_and_in_process_and_follows_the_epoch_key():
    from torch.utils.data import DataLoader
    from torchvision import transforms

    from inceptionnext.data import DigitsDataset, EpochIndices, SeededTransform

    tf = transforms.Compose(
        [transforms.RandomResizedCrop(16), transforms.RandomHorizontalFlip(), transforms.ToTensor()]
    )
    ds = SeededTransform(DigitsDataset("val", 32), tf, seed=5)
    sampler = EpochIndices(range(8))
    batches = {}
    for workers in (0, 2):
        loader = DataLoader(ds, 4, sampler=sampler, num_workers=workers, persistent_workers=workers > 0)
        for epoch in (0, 1):
            sampler.set_epoch(epoch)
            batches[workers, epoch] = torch.cat([x for x, _ in loader])
    assert torch.equal(batches[0, 0], batches[2, 0]) and torch.equal(batches[0, 1], batches[2, 1])
    assert not torch.equal(batches[2, 0], batches[2, 1])  # the persistent workers saw epoch 1
    ds.set_epoch(1)
    assert torch.equal(ds[3][0], batches[0, 1][3]) and torch.equal(ds[(0, 3)][0], batches[0, 0][3])


def test_channels_last_and_persistent_workers_are_the_defaults():
    from inceptionnext.engine.runtime import loader_options

    cfg = resolve_config(None)
    assert cfg.channels_last is True
    kw = loader_options(2, torch.device("cpu"), persistent=True)
    assert kw["persistent_workers"] is True and kw["pin_memory"] is False and kw["generator"] is not None
    assert loader_options(2, torch.device("cuda"), persistent=False)["pin_memory"] is True
    assert "persistent_workers" not in loader_options(0, torch.device("cpu"), persistent=True)


def test_data_make_writes_the_embedded_sets_as_image_folders(tmp_path, capsys):
    from PIL import Image

    from inceptionnext.data import DataError, DigitsDataset, ImageFolderDataset
    from inceptionnext.data.embedded import PHOTO_CLASSES, write_image_folder

    assert main(["data", "make", "digits", str(tmp_path / "digits")]) == 0
    assert "1438 train / 359 val" in capsys.readouterr().out
    folder, embedded = ImageFolderDataset(tmp_path / "digits" / "val"), DigitsDataset("val", 32)
    assert len(folder) == len(embedded) == 359
    path, label = folder.samples[7]  # the file holds exactly the embedded set's pixels (PNG is lossless)
    k = int(Path(path).stem)
    assert label == embedded.targets[k]
    assert np.array_equal(np.asarray(Image.open(path).convert("RGB")), np.asarray(embedded.load(k)))

    info = write_image_folder("photos", tmp_path / "photos", image_size=48, per_class=(3, 2))
    assert info["counts"] == {"train": 30, "val": 20} and info["classes"] == list(PHOTO_CLASSES)
    val = ImageFolderDataset(tmp_path / "photos" / "val")
    assert val.classes == sorted(PHOTO_CLASSES) and Image.open(val.samples[0][0]).size == (48, 48)
    with pytest.raises(DataError, match="not an empty folder"):  # nothing is overwritten
        write_image_folder("photos", tmp_path / "photos")
    with pytest.raises(DataError, match="unknown embedded dataset 'cifar'"):
        write_image_folder("cifar", tmp_path / "new")


def test_photo_crops_of_train_and_val_come_from_disjoint_rows():
    from inceptionnext.data import embedded

    for split in ("train", "val"):
        crops = embedded._photo_crops(split, 5, 16, seed=0)
        assert len(crops) == 5 * len(embedded.PHOTO_CLASSES)
        for name, _, (y, x, side), crop in crops:
            img = embedded._photo(name)
            h, w = img.shape[:2]
            cut = round(embedded.PHOTO_SPLIT * h)
            assert (y >= 0 and y + side <= cut) if split == "train" else (cut <= y and y + side <= h), (name, y)
            assert x >= 0 and x + side <= w and side >= 0.1 * min(h, w)
            expected = np.asarray(embedded.Image.fromarray(img[y : y + side, x : x + side]).resize((16, 16), 3))
            assert np.array_equal(np.asarray(crop), expected)


def test_fused_adamw_is_the_default_on_cpu_and_follows_the_per_parameter_update():
    from inceptionnext import create_model
    from inceptionnext.engine.optim import build_optimizer, fused_update_available

    assert resolve_config(None).fused_optimizer is True
    models = [create_model("inceptionnext_atto", num_classes=4) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    start = copy.deepcopy(models[0].state_dict())
    opts = [build_optimizer(m, 1e-2, weight_decay=0.05, fused=f) for m, f in zip(models, (True, False))]
    assert opts[0].defaults["fused"] is True and not opts[1].defaults.get("fused")
    # the same gradients into both (gradients of a real loss would differ by rounding after the first step, and
    # Adam turns a rounding difference of a near-zero gradient into a full-size update)
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        grads = [torch.randn(p.shape, generator=g) for p in models[0].parameters()]
        for m, o in zip(models, opts):
            for p, grad in zip(m.parameters(), grads):
                p.grad = grad.clone()
            o.step()
    moved = 0
    for (k, a), b, init in zip(models[0].state_dict().items(), models[1].state_dict().values(), start.values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=k)  # rounding only
        moved += not torch.equal(a, init)
    assert moved > 100
    assert not build_optimizer(models[0], 1e-2, opt="sgd", fused=True).defaults.get("fused")
    assert not fused_update_available("adamw", create_model("inceptionnext_atto", num_classes=4).to("meta"))


def test_randaugment_posterize_at_the_clipped_magnitude_gives_a_black_image_instead_of_ending_the_run():
    """The tiny recipe's ``rand-m9-mstd0.5-inc1`` clips its noisy magnitude at 10, where the increasing posterize
    keeps 0 bits: Pillow >= 10 raises there (timm's op as installed), Pillow 9, which the official runs used, gave a
    black image. Found by the train-vs-timm benchmark: the photos workload died in a loader worker."""
    from PIL import Image
    from timm.data import create_transform

    from inceptionnext.data import build_transform

    cfg = resolve_config("tiny", {"img_size": 32})
    tf = build_transform(cfg, {"input_size": (3, 32, 32), "crop_pct": 0.875, "interpolation": "bicubic"}, True)
    ops = [op for t in tf.transforms for op in getattr(t, "ops", ()) if "Posterize" in op.name]
    assert ops, "the tiny recipe's RandAugment has a posterize op"
    img = Image.new("RGB", (32, 32), (200, 120, 40))
    for op in ops:
        op.prob, op.magnitude, op.magnitude_std = 1.0, 10.0, 0.0
        assert np.asarray(op(img)).max() == 0
    plain = create_transform(32, is_training=True, auto_augment="rand-m9-mstd0.5-inc1")
    timm_op = next(op for t in plain.transforms for op in getattr(t, "ops", ()) if op.name == "PosterizeIncreasing")
    timm_op.prob, timm_op.magnitude, timm_op.magnitude_std = 1.0, 10.0, 0.0
    with pytest.raises(ValueError, match="bits must be"):
        timm_op(img)  # if this stops raising, timm fixed it and the override can go
    timm_op.magnitude = 5.0  # elsewhere the op is timm's: 2 bits kept
    ours = next(op for op in ops if op.name == "PosterizeIncreasing")
    ours.magnitude = 5.0
    assert np.array_equal(np.asarray(ours(img)), np.asarray(timm_op(img)))


def test_recalibration_reads_at_most_an_eighth_of_an_epoch():
    from inceptionnext.engine.ema import recalibration_batch_count

    assert recalibration_batch_count(8, 22) == 3  # the digits recipe: 3 of 22 batches, not 8
    assert recalibration_batch_count(8, 10_000) == 8  # ImageNet: as asked
    assert recalibration_batch_count(8, 1) == 1  # never none while asked for
    assert recalibration_batch_count(0, 10_000) == 0  # off


def test_raw_and_ema_evaluated_in_one_pass_equal_separate_evaluations():
    """evaluate_models reads each validation batch once for both models; the numbers are those of one model at a
    time."""
    from inceptionnext.engine.classification import evaluate, evaluate_models
    from inceptionnext.models import create_model

    torch.manual_seed(0)
    a, b = create_model("inceptionnext_atto", num_classes=4), create_model("inceptionnext_atto", num_classes=4)
    batches = [(torch.randn(8, 3, 32, 32), torch.randint(0, 4, (8,))) for _ in range(3)]
    reads = []

    class Counting(list):
        def __iter__(self):
            reads.append(1)
            return super().__iter__()

    both = evaluate_models({"a": a, "b": b}, Counting(batches), torch.device("cpu"), progress=False)
    assert len(reads) == 1
    for name, model in (("a", a), ("b", b)):
        assert both[name] == evaluate(model, batches, torch.device("cpu"), progress=False)
    assert both["a"] != both["b"]  # two different models, two different results


_FREED_MEMORY_PROBE = """
import sys, torch
from inceptionnext.engine.runtime import keep_freed_cpu_memory
def rss_mib():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20
applied = keep_freed_cpu_memory() if sys.argv[1] == "keep" else False
x = torch.ones(64 * 2**20 // 4)  # 64 MiB: above glibc's largest mmap threshold (32 MiB)
held = rss_mib()
del x
after_free = rss_mib()
print(applied, held - after_free)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_cpu_training_keeps_freed_activation_memory_for_reuse():
    """A freed 64 MiB tensor goes back to the OS by default (its pages are zero-filled again on the next allocation);
    after keep_freed_cpu_memory it stays in the process for the next one. INCEPTIONNEXT_KEEP_CPU_MEMORY=0 opts out."""

    def probe(mode: str, **env: str) -> tuple[str, float]:
        out = subprocess.run(
            [sys.executable, "-c", _FREED_MEMORY_PROBE, mode],
            capture_output=True,
            text=True,
            check=True,
            env=os.environ | env,
        ).stdout.split()
        return out[0], float(out[1])

    applied, released = probe("keep")
    assert applied == "True" and released < 8, released  # kept: RSS did not drop by the tensor's 64 MiB
    applied, released = probe("default")
    assert applied == "False" and released > 56, released  # glibc's default: unmapped on free
    applied, released = probe("keep", INCEPTIONNEXT_KEEP_CPU_MEMORY="0")
    assert applied == "False" and released > 56, released


def test_random_erasing_is_applied_to_the_mixed_batch_in_the_main_process(tmp_path, digits_folder):
    """The official runs (timm's train.py with its prefetcher) erase after Mixup/CutMix: the per-sample transform has
    no erasing, and the model is given the erased mixed batch."""
    from timm.data.random_erasing import RandomErasing

    from inceptionnext.engine.classification import ClassificationRun
    from inceptionnext.engine.runtime import init_distributed

    cfg = _cfg(tmp_path / "run", digits_folder, reprob=1.0, mixup=0.8, model_ema=False)
    run = ClassificationRun(cfg, init_distributed("cpu"))
    run.build()
    assert not any(isinstance(t, RandomErasing) for t in run.train_set.transform.transforms)
    assert isinstance(run.erasing, RandomErasing) and run.erasing.probability == 1.0 and run.erasing.per_pixel
    calls: list[tuple[str, torch.Tensor]] = []
    mixup, erasing = run.mixup, run.erasing

    def record(name, fn):
        def wrapped(x, *rest):
            out = fn(x.clone(), *rest)
            calls.append((name, (out[0] if isinstance(out, tuple) else out).clone()))
            return out

        return wrapped

    class Stop(Exception):
        pass

    def first_forward(module, args):
        calls.append(("forward", args[0].clone()))
        raise Stop

    run.mixup, run.erasing = record("mixup", mixup), record("erasing", erasing)
    run.model.register_forward_pre_hook(first_forward)
    with pytest.raises(Stop):
        run.train_one_epoch(0)
    assert [name for name, _ in calls] == ["mixup", "erasing", "forward"]
    mixed, erased, given = (x for _, x in calls)
    assert torch.equal(given, erased)
    changed = (erased != mixed).any(dim=1)  # (batch, h, w): the erased pixels of each image
    assert changed.flatten(1).any(dim=1).all()  # probability 1: every image has its region
