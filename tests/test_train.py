"""Training engine: recipes, data, checkpoints, resume, distributed equivalence, failure handling."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from conftest import free_port
from inceptionnext import create_model
from inceptionnext.checkpoint import CheckpointError
from inceptionnext.cli import main
from inceptionnext.data import DataError, DigitsDataset, ImageFolderDataset, SeededTransform, build_dataset
from inceptionnext.engine import NonFiniteLossError, TrainConfig, list_recipes, resolve_config, train, validate
from inceptionnext.engine import classification as classification_mod
from inceptionnext.engine.checkpointing import atomic_save
from inceptionnext.engine.config import AMP_MODES, SCHEDULES, load_recipe
from inceptionnext.engine.optim import build_optimizer
from inceptionnext.engine.run import FAULT_ENV
from inceptionnext.errors import ConfigError

# Table 9 of the paper, written out: (epochs, global batch, lr, warmup epochs, RandAugment, mixup, reprob,
# drop path, head dropout, LayerScale init, EMA decay, resolution)
TABLE9 = {
    "atto": (450, 1280, 1e-3, 5, "rand-m5-mstd101-inc1", 0.2, 0.1, 0.1, 0.0, 1e-6, None, 224),
    "tiny": (300, 4096, 4e-3, 20, "rand-m9-mstd0.5-inc1", 0.8, 0.25, 0.1, 0.0, 1e-6, None, 224),
    "small": (300, 4096, 4e-3, 20, "rand-m9-mstd0.5-inc1", 0.8, 0.25, 0.3, 0.0, 1e-6, None, 224),
    "base": (300, 4096, 4e-3, 20, "rand-m9-mstd0.5-inc1", 0.8, 0.25, 0.4, 0.0, 1e-6, None, 224),
    "base_384": (30, 1024, 5e-5, 0, "rand-m9-mstd0.5-inc1", 0.8, 0.25, 0.7, 0.5, None, 0.9999, 384),
}
GPUS = {"atto": 4, "tiny": 8, "small": 8, "base": 8, "base_384": 8}


@pytest.mark.parametrize("name", sorted(TABLE9))
def test_recipes_hold_table9(name):
    epochs, batch, lr, warmup, aa, mixup, reprob, dpr, drop, ls, ema, res = TABLE9[name]
    cfg = resolve_config(name)
    assert cfg.epochs == epochs and cfg.img_size == res
    assert cfg.lr_base_batch == batch and cfg.effective_batch(GPUS[name]) == batch  # the documented launch
    assert cfg.scaled_lr(GPUS[name]) == pytest.approx(lr)
    assert cfg.warmup_epochs == warmup and cfg.sched == "cosine"
    assert cfg.opt == "adamw" and cfg.opt_eps == 1e-8 and cfg.opt_betas == [0.9, 0.999]
    assert cfg.weight_decay == 0.05 and cfg.clip_grad is None
    assert cfg.aa == aa and cfg.mixup == mixup and cfg.cutmix == 1.0 and cfg.mixup_switch_prob == 0.5
    assert cfg.reprob == reprob and cfg.smoothing == 0.1
    assert cfg.drop_path == dpr and cfg.drop == drop and cfg.ls_init_value == ls
    assert cfg.model_ema == (ema is not None) and (ema is None or cfg.model_ema_decay == ema)
    assert cfg.model.startswith("inceptionnext_")


def test_recipe_notes_record_departures_from_the_scripts():
    assert "600" in load_recipe("atto")["notes"]
    assert "--mixup 0" in load_recipe("base_384")["notes"]


def test_every_recipe_resolves():
    assert set(TABLE9) | {"digits", "table1", "table5", "table8"} == set(list_recipes())  # + Tables 1, 5, 8 (issue 11)
    for name in list_recipes():
        assert isinstance(resolve_config(name), TrainConfig)


def test_flags_override_recipe_and_dry_run_prints_the_scaled_lr(capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["train", "--recipe", "tiny", "--batch-size", "64", "--lr", "1e-3", "--dry-run"]) == 0
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert cfg["batch_size"] == 64 and cfg["grad_accum_steps"] == 4 and cfg["drop_path"] == 0.1
    assert cfg["effective_batch"] == 2 * 64 * 4
    assert cfg["scaled_lr"] == pytest.approx(1e-3 * 512 / 4096)


def test_bad_recipes_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown recipe 'tinny'"):
        resolve_config("tinny")
    bad = tmp_path / "r.yaml"
    bad.write_text("lr: 1.0\nlearning_rate: 2.0\n")
    with pytest.raises(ValueError, match=r"unknown config keys \['learning_rate'\]"):
        resolve_config(str(bad))
    with pytest.raises(ValueError, match="amp must be"):
        resolve_config(None, {"amp": "fp8"})
    with pytest.raises(ConfigError, match="amp must be auto, bf16, fp16 or fp32, got 'fp8'"):
        resolve_config(None, {"amp": "fp8"})
    with pytest.raises(ConfigError, match="sched must be cosine or none"):
        resolve_config(None, {"sched": "step"})
    with pytest.raises(ConfigError, match="epochs must be >= 1"):
        resolve_config(None, {"epochs": 0})
    with pytest.raises(ConfigError, match="config file not found"):
        resolve_config(str(tmp_path / "missing.yaml"))


def test_flag_choices_come_from_the_same_constants_as_validation(capsys):
    import argparse

    from inceptionnext.engine.config import add_config_arguments

    parser = argparse.ArgumentParser()
    add_config_arguments(parser, TrainConfig)
    actions = {a.dest: a for a in parser._actions}
    assert actions["amp"].choices == AMP_MODES and actions["sched"].choices == SCHEDULES
    assert actions["amp"].help.startswith("auto | bf16 | fp16 | fp32")
    assert parser.parse_args(["--amp", "bf16", "--clip-grad", "none", "--epochs", "3"]) == argparse.Namespace(
        amp="bf16", clip_grad=None, epochs=3
    )
    with pytest.raises(SystemExit):
        parser.parse_args(["--amp", "fp8"])
    assert "invalid choice: 'fp8'" in capsys.readouterr().err


def test_digits_split_is_fixed_stratified_and_real():
    from sklearn.datasets import load_digits

    train_set, val_set = DigitsDataset("train", 32), DigitsDataset("val", 32)
    assert (len(train_set), len(val_set)) == (1438, 359)
    assert np.bincount(val_set.targets).min() >= 35  # every class held out
    assert DigitsDataset("val", 32).targets == val_set.targets
    all_images = {img.tobytes() for img in (load_digits().images * 255 / 16).round().astype(np.uint8)}
    assert all(img.tobytes() in all_images for img in val_set.images)
    img, label = train_set[0]
    assert img.size == (32, 32) and img.mode == "RGB" and 0 <= label < 10


def test_data_errors(tmp_path, digits_folder):
    with pytest.raises(DataError, match="data directory not found"):
        build_dataset(str(tmp_path / "nope"), "train", 32)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no train/ folder"):
        build_dataset(str(tmp_path / "empty"), "train", 32)
    (tmp_path / "empty" / "train").mkdir()
    with pytest.raises(DataError, match="no class folders"):
        build_dataset(str(tmp_path / "empty"), "train", 32)
    (tmp_path / "empty" / "train" / "cat").mkdir()
    (tmp_path / "empty" / "train" / "cat" / "notes.txt").write_text("x")
    with pytest.raises(DataError, match="class folder.*with no images.*cat"):
        build_dataset(str(tmp_path / "empty"), "train", 32)


def test_corrupt_images_are_skipped_and_counted(tmp_path, digits_folder):
    import shutil

    root = tmp_path / "data"
    shutil.copytree(digits_folder / "train", root)
    bad = root / "class_1" / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    log = tmp_path / "skipped.txt"
    ds = ImageFolderDataset(root, skip_log=log)
    i = [p for p, _ in ds.samples].index(str(bad))
    img, target = ds[i]
    assert img.size == (32, 32)
    assert target == ds.samples[i + 1][1]  # the label of the image actually read
    assert str(bad) in log.read_text()


def test_seeded_transform_is_deterministic_and_leaves_global_rng_alone():
    from torchvision import transforms

    tf = transforms.Compose([transforms.RandomResizedCrop(16), transforms.ToTensor()])
    ds = SeededTransform(DigitsDataset("val", 32), tf, seed=3)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a = ds[5][0]
    assert torch.equal(torch.get_rng_state(), before)
    assert torch.equal(ds[5][0], a)
    ds.set_epoch(1)
    assert not torch.equal(ds[5][0], a)


def test_optimizer_has_no_decay_on_norms_biases_and_layerscale():
    model = create_model("inceptionnext_atto", num_classes=10)
    opt = build_optimizer(model, 1e-3, weight_decay=0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay = {names[id(p)] for g in opt.param_groups if g["weight_decay"] == 0 for p in g["params"]}
    decay = {names[id(p)] for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    assert {n for n in names.values() if n.endswith((".bias", ".gamma")) or ".norm." in n} <= no_decay
    assert "stem.1.weight" in no_decay and "stages.0.blocks.0.mlp.fc1.weight" in decay
    assert all(n.endswith("weight") and not n.endswith("gamma") for n in decay)
    assert type(opt).__name__ == "AdamW"


def _cfg(out: Path, data: Path, **kw) -> TrainConfig:
    base = dict(
        model="inceptionnext_atto", data=str(data), img_size=32, epochs=2, batch_size=16, lr=2e-3, lr_base_batch=16,
        warmup_epochs=0.5, aa=None, color_jitter=0.0, hflip=0.0, reprob=0.0, mixup=0.0, cutmix=0.0, drop_path=0.0,
        workers=0, output=str(out), crop_pct=1.0, log_interval=2,
    )  # fmt: skip
    base.update(kw)
    return resolve_config(None, base)


def test_train_writes_everything_and_validate_reproduces(tmp_path, digits_folder):
    out = tmp_path / "run"
    train(_cfg(out, digits_folder, model_ema=True, model_ema_decay=0.9))
    for f in ("last.pth", "best.pth", "metrics.csv", "curves.png", "config.yaml", "summary.json", "log.txt"):
        assert (out / f).is_file(), f
    rows = list(csv.DictReader((out / "metrics.csv").read_text().splitlines()))
    assert [r["epoch"] for r in rows] == ["1", "2"]
    assert {"train_loss", "lr", "img_per_s", "val_top1", "val_top5", "ema_top1"} <= set(rows[0])
    resolved = yaml.safe_load((out / "config.yaml").read_text())
    assert resolved["git"] and resolved["scaled_lr"] == pytest.approx(2e-3) and resolved["num_classes"] == 4
    ckpt = torch.load(out / "last.pth", weights_only=True)
    assert {"model", "ema", "optimizer", "scheduler", "scaler", "epoch", "step", "rng", "config"} <= set(ckpt)
    assert ckpt["epoch"] == 1 and ckpt["step"] == 2 * (96 // 16) and ckpt["class_names"][0] == "class_0"
    assert json.loads((out / "summary.json").read_text())["best"]["top1"] >= 0
    # the standalone validation reproduces the run's numbers from the checkpoint, raw and EMA
    result = validate(checkpoint=str(out / "last.pth"), output=str(tmp_path / "val"), progress=False)
    assert result["top1"] == pytest.approx(float(rows[-1]["val_top1"]), abs=1e-3)
    assert result["count"] == 24
    ema = validate(checkpoint=str(out / "last.pth"), use_ema=True, progress=False)
    assert ema["top1"] == pytest.approx(float(rows[-1]["ema_top1"]), abs=1e-3)
    assert json.loads((tmp_path / "val" / "results.json").read_text())["top1"] == result["top1"]


def _state(path: Path) -> dict:
    return torch.load(path, weights_only=True)["model"]


def _run_cli(args: list[str], env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "inceptionnext", "train", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=600)  # fmt: skip


def _cli_args(out: Path, data: Path, *extra: str) -> list[str]:
    return [
        "--data", str(data), "--output", str(out), "--model", "inceptionnext_atto", "--img-size", "32",
        "--epochs", "3", "--batch-size", "16", "--lr", "2e-3", "--lr-base-batch", "16", "--warmup-epochs", "1",
        "--aa", "none", "--hflip", "0.5", "--scale", "0.6", "1.0", "--reprob", "0", "--mixup", "0.2",
        "--cutmix", "0", "--drop-path", "0.1", "--workers", "0", "--crop-pct", "1.0", "--log-interval", "2",
        *extra,
    ]  # fmt: skip


def test_killed_run_resumes_to_the_same_weights(tmp_path, digits_folder):
    # Mixup, drop path and random crops on: every RNG stream must be restored for the weights to match.
    full = _run_cli(_cli_args(tmp_path / "full", digits_folder))
    assert full.returncode == 0, full.stderr
    # hard exit (no clean-up) at step 9: inside epoch 2 (6 steps per epoch), epoch 1 checkpointed
    killed = _run_cli(_cli_args(tmp_path / "cut", digits_folder), env={FAULT_ENV: "9"})
    assert killed.returncode == 137
    assert torch.load(tmp_path / "cut" / "last.pth", weights_only=True)["epoch"] == 0
    # --resume PATH from another folder continues exactly, and the file it names is only read
    source = (tmp_path / "cut" / "last.pth").read_bytes()
    elsewhere = _run_cli(
        _cli_args(tmp_path / "elsewhere", digits_folder, "--resume", str(tmp_path / "cut" / "last.pth"))
    )
    assert elsewhere.returncode == 0, elsewhere.stderr
    assert (tmp_path / "cut" / "last.pth").read_bytes() == source
    assert (
        f"resumed from {tmp_path / 'cut' / 'last.pth'} (epoch 0 done"
        in (tmp_path / "elsewhere" / "log.txt").read_text()
    )
    a, b = _state(tmp_path / "full" / "last.pth"), _state(tmp_path / "elsewhere" / "last.pth")
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=0, msg=k)
    resumed = _run_cli(_cli_args(tmp_path / "cut", digits_folder))
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in (tmp_path / "cut" / "log.txt").read_text()
    a, b = _state(tmp_path / "full" / "last.pth"), _state(tmp_path / "cut" / "last.pth")
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=0, msg=k)
    rows = list(csv.DictReader((tmp_path / "cut" / "metrics.csv").read_text().splitlines()))
    assert [r["epoch"] for r in rows] == ["1", "2", "3"]


def test_two_process_torchrun_equals_one_process_with_the_same_global_batch(tmp_path, digits_folder):
    # LayerNorm model (BatchNorm statistics are per process by design), no Mixup/drop path; random crops stay on
    common = ["--epochs", "1", "--mixup", "0", "--drop-path", "0", "--config", str(tmp_path / "ln.yaml")]
    (tmp_path / "ln.yaml").write_text("model_kwargs: {norm: layernorm}\n")
    one = _run_cli(_cli_args(tmp_path / "one", digits_folder, *common, "--batch-size", "16"))
    assert one.returncode == 0, one.stderr
    two = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
         "-m", "inceptionnext", "train",
         *_cli_args(tmp_path / "two", digits_folder, *common, "--batch-size", "4", "--grad-accum-steps", "2")],
        capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert two.returncode == 0, two.stderr[-3000:]
    cfg_two = yaml.safe_load((tmp_path / "two" / "config.yaml").read_text())
    assert cfg_two["world_size"] == 2 and cfg_two["effective_batch"] == 16
    a, b = _state(tmp_path / "one" / "last.pth"), _state(tmp_path / "two" / "last.pth")
    assert torch.load(tmp_path / "two" / "last.pth", weights_only=True)["step"] == 96 // 16
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=2e-6, msg=k)
    init = create_model("inceptionnext_atto", num_classes=4, norm="layernorm").state_dict()
    assert any(not torch.equal(a[k], init[k]) for k in a)  # training moved the weights


def test_nan_loss_stops_with_the_last_good_checkpoint(tmp_path, digits_folder, monkeypatch):
    build = classification_mod.build_model
    calls = {"n": 0}

    def poisoned(cfg, num_classes):
        model = build(cfg, num_classes)

        def hook(module, inputs, output):
            if module.training:
                calls["n"] += 1
                if calls["n"] > 8:  # epoch 1 has 6 steps: NaN in epoch 2
                    return output * float("nan")
            return output

        model.register_forward_hook(hook)
        return model

    monkeypatch.setattr(classification_mod, "build_model", poisoned)
    out = tmp_path / "nan"
    with pytest.raises(
        NonFiniteLossError, match=r"NaN/inf in epoch 2.*last good checkpoint is .*last\.pth \(epoch 0\)"
    ):
        train(_cfg(out, digits_folder, epochs=3))
    ckpt = torch.load(out / "last.pth", weights_only=True)
    assert ckpt["epoch"] == 0
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())


def test_interrupted_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "last.pth"
    atomic_save({"epoch": 1, "w": torch.ones(3)}, path)

    def broken_save(obj, f, *a, **k):
        f.write(b"partial")
        raise OSError("No space left on device")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="No space"):
        atomic_save({"epoch": 2, "w": torch.zeros(3)}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=True)["epoch"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pth"]


def test_fine_tune_from_a_checkpoint_with_other_classes_and_resolution(tmp_path, digits_folder):
    src = create_model("inceptionnext_atto", num_classes=10)
    torch.save(src.state_dict(), tmp_path / "ten.pth")
    with pytest.warns(UserWarning, match="re-initialised"):
        summary = train(_cfg(tmp_path / "ft", digits_folder, epochs=1, img_size=64,
                             initial_checkpoint=str(tmp_path / "ten.pth")))  # fmt: skip
    assert summary["last"]["epoch"] == 1
    ckpt = torch.load(tmp_path / "ft" / "last.pth", weights_only=True)
    assert ckpt["model"]["head.fc2.weight"].shape == (4, 960)


def test_cli_reports_bad_data_clearly(tmp_path, capsys):
    assert main(["train", "--data", str(tmp_path / "missing"), "--output", str(tmp_path / "o")]) == 2
    assert "data directory not found" in capsys.readouterr().err


def _write_wrong_checkpoint(kind: str, path: Path) -> None:
    model = create_model("inceptionnext_atto", num_classes=10 if kind == "other-model" else 4)
    fake = {"model": model.state_dict(), "optimizer": {}, "scaler": {}, "step": 6, "best": {"top1": 50.0},
            "rng": {}, "epoch": 0, "class_names": [f"class_{c}" for c in range(4)]}  # fmt: skip
    if kind == "garbage":
        path.write_bytes(b"not a checkpoint")
    elif kind == "weights-only":
        torch.save(model.state_dict(), path)
    elif kind == "other-task":
        torch.save(fake | {"best": {"mIoU": 1.0, "step": 3}}, path)
    elif kind == "other-classes":
        torch.save(fake | {"class_names": ["a", "b", "c", "d"]}, path)
    elif kind == "other-model":
        torch.save(fake, path)


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("missing", "checkpoint file not found"),
        ("garbage", r"wrong\.pth is not a checkpoint file"),
        ("weights-only", "holds weights only .*, not a classification training checkpoint"),
        ("other-model", r"does not fit this run's MetaNeXt:\n  shape mismatch: head\.fc2\.weight \(10, 960\) vs \(4,"),
        ("other-task", "a training checkpoint of another task"),
        ("other-classes", "trained on the classes"),
    ],
)  # fmt: skip
def test_resume_from_a_wrong_file_is_refused_before_anything_is_written(tmp_path, digits_folder, kind, message):
    """``resume=PATH`` is read and checked before the output folder is touched: a wrong file neither replaces the
    run's own ``last.pth`` nor leaves config, logs or metrics behind."""
    wrong = tmp_path / "wrong.pth"
    _write_wrong_checkpoint(kind, wrong)
    out = tmp_path / "run"
    out.mkdir()
    (out / "last.pth").write_bytes(b"the user's checkpoint")
    with pytest.raises(CheckpointError, match=message):
        train(_cfg(out, digits_folder, epochs=1), resume=wrong)
    assert sorted(p.name for p in out.iterdir()) == ["last.pth"]
    assert (out / "last.pth").read_bytes() == b"the user's checkpoint"
    fresh = tmp_path / "fresh"
    with pytest.raises(CheckpointError, match=message):
        train(_cfg(fresh, digits_folder, epochs=1), resume=wrong)
    assert not fresh.exists()


def test_cli_reports_a_wrong_resume_file_as_a_usage_error(tmp_path, digits_folder, capsys):
    (tmp_path / "wrong.pth").write_bytes(b"not a checkpoint")
    args = ["train", "--data", str(digits_folder), "--output", str(tmp_path / "o"), "--img-size", "32",
            "--batch-size", "16", "--workers", "0"]  # fmt: skip
    assert main([*args, "--resume", str(tmp_path / "wrong.pth")]) == 2
    assert "wrong.pth" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
