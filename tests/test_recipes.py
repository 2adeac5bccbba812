"""Issue 11, reproduction of the training recipe: the schedule (its end, the official per-epoch shape), precision,
recipe values that must not change a model, the Table 1/5/8 recipes, the official small settings, the eval crop,
fine-tunes without weights, and config values refused with a message."""

import math
import re
from importlib import resources
from pathlib import Path

import pytest
import torch
import yaml
from timm.scheduler import CosineLRScheduler

from inceptionnext import create_model, get_entry, list_models
from inceptionnext.cli import main
from inceptionnext.data import build_transform
from inceptionnext.engine import list_recipes, resolve_config, train, validate
from inceptionnext.engine.classification import ClassificationRun, build_model
from inceptionnext.engine.config import dry_run_text, load_recipe
from inceptionnext.engine.optim import build_optimizer, build_scheduler
from inceptionnext.errors import ConfigError
from inceptionnext.segmentation.config import resolve_seg_config

PAPER = ("atto", "tiny", "small", "base", "base_384")
NEW = ("table1", "table5", "table8")


def _cfg(out: Path, data: Path, **kw):
    base = dict(
        model="inceptionnext_atto", data=str(data), img_size=32, epochs=3, batch_size=16, lr=2e-3, lr_base_batch=16,
        warmup_epochs=1, aa=None, color_jitter=0.0, hflip=0.0, reprob=0.0, mixup=0.0, cutmix=0.0, drop_path=0.0,
        workers=0, output=str(out), crop_pct=1.0, log_interval=2, min_lr=1e-5, warmup_lr=1e-6,
    )  # fmt: skip
    base.update(kw)
    return resolve_config(None, base)


def _lrs_per_update(monkeypatch) -> list[float]:
    """The learning rate each optimizer update of a run used (read just before the update)."""
    seen: list[float] = []
    step = ClassificationRun.optimizer_step

    def spy(self):
        seen.append(self.current_lr())
        step(self)

    monkeypatch.setattr(ClassificationRun, "optimizer_step", spy)
    return seen


# ------------------------------------------------------------------------------------------------ 1. schedule
def test_step_schedule_reaches_the_floor_at_the_last_update(tmp_path, digits_folder, monkeypatch):
    lrs = _lrs_per_update(monkeypatch)
    train(_cfg(tmp_path / "run", digits_folder))  # 96 images / 16 = 6 updates per epoch, 1 warm-up epoch
    assert len(lrs) == 18
    assert lrs[0] == pytest.approx(1e-6)  # warm-up starts at warmup_lr
    # after the warm-up, timm's cosine measured from update 0 (warmup_prefix=False, as timm's train.py), over 17
    assert lrs[6] == pytest.approx(1e-5 + 0.5 * (2e-3 - 1e-5) * (1 + math.cos(math.pi * 6 / 17)))
    assert lrs[-1] == 1e-5  # the last update runs at the floor, not above it
    assert all(a >= b for a, b in zip(lrs[6:], lrs[7:]))  # decays monotonically after the warm-up


def test_epoch_schedule_with_cooldown_matches_the_official_loop(tmp_path, digits_folder, monkeypatch):
    lrs = _lrs_per_update(monkeypatch)
    summary = train(_cfg(tmp_path / "run", digits_folder, epochs=3, cooldown_epochs=1, sched_on="epoch"))
    assert summary["last"]["epoch"] == 4  # epochs + cooldown_epochs trained
    per_epoch = [lrs[i * 6 : (i + 1) * 6] for i in range(4)]
    assert all(len(set(e)) == 1 for e in per_epoch)  # constant within an epoch
    official = _official_lrs(epochs=3, warmup=1, cooldown=1, lr=2e-3, min_lr=1e-5, warmup_lr=1e-6)
    assert [e[0] for e in per_epoch] == pytest.approx(official, rel=1e-12)
    assert per_epoch[-1][0] == 1e-5


def _official_lrs(*, epochs, warmup, cooldown, lr, min_lr, warmup_lr) -> list[float]:
    """The lr of each epoch under the official train.py: timm 0.6.11's create_scheduler (cosine, t_in_epochs, no
    warm-up prefix, one cycle), ``num_epochs = cycle length + cooldown``, ``step(epoch + 1)`` after each epoch."""
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=lr)
    sched = CosineLRScheduler(
        opt, t_initial=epochs, lr_min=min_lr, warmup_lr_init=warmup_lr, warmup_t=warmup, cycle_limit=1,
        cycle_mul=1.0, cycle_decay=0.5, k_decay=1.0,
    )  # fmt: skip
    num_epochs = sched.get_cycle_length() + cooldown
    out = []
    for epoch in range(num_epochs):
        out.append(opt.param_groups[0]["lr"])
        sched.step(epoch + 1)
    return out


@pytest.mark.parametrize("name", ["tiny", "atto", "table1"])
def test_paper_recipes_follow_the_official_schedule_epoch_by_epoch(name):
    cfg = resolve_config(name)
    gpus = 4 if name == "atto" else 8
    lr = cfg.scaled_lr(gpus)
    official = _official_lrs(
        epochs=cfg.epochs, warmup=cfg.warmup_epochs, cooldown=10, lr=lr, min_lr=cfg.min_lr, warmup_lr=cfg.warmup_lr
    )
    assert cfg.sched_on == "epoch" and cfg.total_epochs() == len(official) == cfg.epochs + 10
    opt = torch.optim.AdamW([torch.zeros(1, requires_grad=True)], lr=lr)
    sched = build_scheduler(
        opt, sched=cfg.sched, sched_on=cfg.sched_on, epochs=cfg.epochs, warmup_epochs=cfg.warmup_epochs,
        updates_per_epoch=312, min_lr=cfg.min_lr, warmup_lr=cfg.warmup_lr,
    )  # fmt: skip
    ours = []
    for epoch in range(cfg.total_epochs()):
        sched.step(epoch)  # what ClassificationRun does before each epoch
        for update in range(3):
            sched.step_update(epoch * 312 + update + 1)  # and after each update: no effect per epoch
        ours.append(opt.param_groups[0]["lr"])
    assert ours == pytest.approx(official, rel=1e-12)
    for epoch in (0, 10, int(cfg.warmup_epochs), 150, cfg.epochs - 1, cfg.epochs, cfg.total_epochs() - 1):
        assert ours[epoch] == pytest.approx(official[epoch], rel=1e-12), epoch
    assert ours[-1] == cfg.min_lr


def test_step_scheduler_ends_at_the_floor_for_any_length():
    for epochs, updates, warmup in ((1, 2, 0), (2, 5, 0.5), (30, 22, 2), (300, 312, 20)):
        opt = torch.optim.AdamW([torch.zeros(1, requires_grad=True)], lr=1e-3)
        sched = build_scheduler(
            opt, sched="cosine", sched_on="step", epochs=epochs, warmup_epochs=warmup, updates_per_epoch=updates,
            min_lr=1e-6, warmup_lr=1e-7,
        )  # fmt: skip
        sched.step_update(epochs * updates - 1)  # the lr the last update uses
        assert opt.param_groups[0]["lr"] == 1e-6, (epochs, updates)


# ------------------------------------------------------------------------------------------------ 2. precision
def test_paper_recipes_train_in_fp32_with_tf32_and_digits_stays_as_it_was():
    for name in (*PAPER, *NEW):
        cfg = resolve_config(name)
        assert (cfg.amp, cfg.tf32) == ("fp32", True), name
    digits = resolve_config("digits")
    assert (digits.amp, digits.tf32, digits.sched_on, digits.train_interpolation) == ("auto", False, "step", "bicubic")
    assert (digits.model, digits.epochs, digits.cooldown_epochs, digits.ls_init_value) == (
        "inceptionnext_atto",
        30,
        0,
        1e-6,
    )
    assert "precision: fp32, TF32 allowed on CUDA" in dry_run_text(resolve_config("tiny"))
    assert resolve_config("tiny", {"amp": "bf16"}).amp == "bf16"  # still a flag


# ------------------------------------------------------------------------------------------------ 3. model options
def _build(cfg, num_classes=10):
    with torch.device("meta"):
        return build_model(cfg, num_classes)


def test_layerscale_is_not_added_to_a_model_without_it():
    with pytest.raises(ConfigError, match=r"^ls_init_value: convnext_small_iso has no LayerScale"):
        _build(resolve_config(None, {"model": "convnext_small_iso", "ls_init_value": 1e-6}))
    plain = _build(resolve_config(None, {"model": "convnext_small_iso"}))
    assert not any(n.endswith("gamma") for n, _ in plain.named_parameters())
    tiny = _build(resolve_config(None, {"model": "inceptionnext_tiny", "ls_init_value": 1e-5}))
    assert any(n.endswith("gamma") for n, _ in tiny.named_parameters())


def test_options_a_model_does_not_define_are_refused_by_name():
    with pytest.raises(ConfigError, match=r"model_kwargs \['layer_scale'\]"):
        _build(resolve_config(None, {"model": "inceptionnext_atto", "model_kwargs": {"layer_scale": 1e-6}}))
    with pytest.raises(ConfigError, match="^ls_init_value: the model resnet18 has no 'ls_init_value' argument"):
        _build(resolve_config(None, {"model": "resnet18", "ls_init_value": 1e-6, "drop_path": 0.0}))
    assert _build(resolve_config(None, {"model": "resnet18", "drop_path": 0.0})).num_classes == 10


@pytest.mark.parametrize(
    "recipe, tag", [("table1", "table1"), ("table5", "table5"), ("table8", "table8"), ("tiny", "table3")]
)
def test_table_recipes_build_every_model_of_their_table(recipe, tag):
    for name in list_models(tag=tag):
        if recipe == "tiny" and name != "inceptionnext_tiny":
            continue
        cfg = resolve_config(recipe, {"model": name})
        model = _build(cfg, 1000)
        has_ls = any(n.endswith("gamma") for n, _ in model.named_parameters())
        assert has_ls == (name != "convnext_small_iso"), name


def test_new_recipes_state_a_source_for_every_value():
    for name in (*PAPER, *NEW):
        text = resources.files("inceptionnext.recipes").joinpath(f"{name}.yaml").read_text()
        for line in text.splitlines():
            key = re.match(r"^(\w+):", line)
            if key and key.group(1) not in ("model", "notes", "grad_accum_steps"):
                assert "#" in line, f"{name}: {line}"
    table1 = resolve_config("table1")
    assert (table1.model_ema, table1.model_ema_decay, table1.drop_path, table1.lr) == (True, 0.9999, 0.1, 4e-3)
    table5 = resolve_config("table5")
    assert (table5.warmup_epochs, table5.ls_init_value, table5.model_ema) == (50, None, True)
    assert resolve_config("table8").to_dict() | {"model": "inceptionnext_tiny", "recipe": "tiny", "notes": ""} == (
        resolve_config("tiny").to_dict() | {"notes": ""}
    )


# ------------------------------------------------------------------------------------------------ 4. small settings
def test_official_min_lr_interpolation_and_colour_jitter(capsys):
    for name in ("tiny", "small", "base", "base_384", *NEW):
        cfg = resolve_config(name)
        assert (cfg.min_lr, cfg.warmup_lr, cfg.train_interpolation) == (1e-5, 1e-6, "random"), name
    assert resolve_config(None).min_lr == 1e-5 and resolve_config(None).train_interpolation == "random"
    cfg = resolve_config("tiny")
    transform = build_transform(cfg, create_model("inceptionnext_atto").pretrained_cfg, True)
    crop = transform.transforms[0]
    assert type(crop).__name__ == "RandomResizedCropAndInterpolation" and len(crop.interpolation) == 2  # random
    # timm leaves colour jitter out when RandAugment is on; the dry run says so
    assert not any(type(t).__name__ == "ColorJitter" for t in transform.transforms)
    assert main(["train", "--recipe", "tiny", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "# note: color_jitter 0.4 is not applied" in out and yaml.safe_load(out)["color_jitter"] == 0.4
    assert "# note: trains 310 epochs" in out


def test_segmentation_weight_decay_groups_follow_the_official_configs():
    assert {resolve_seg_config(f"upernet_{s}").no_decay for s in ("tiny", "small", "base")} == {"norms"}
    assert {resolve_seg_config(f"fpn_{s}").no_decay for s in ("tiny", "small", "base")} == {"none"}
    model = create_model("inceptionnext_atto", num_classes=10)
    names = {id(p): n for n, p in model.named_parameters()}

    def groups(rule):
        opt = build_optimizer(model, 1e-4, weight_decay=0.01, no_decay=rule)
        return {names[id(p)]: g["weight_decay"] for g in opt.param_groups for p in g["params"]}

    norms = groups("norms")
    assert norms["stem.1.weight"] == norms["stages.0.blocks.0.norm.bias"] == 0.0  # BatchNorms, by type
    assert norms["stages.0.blocks.0.gamma"] == norms["stem.0.bias"] == 0.01  # LayerScale and biases decay
    assert set(groups("none").values()) == {0.01}
    assert groups("timm")["stem.0.bias"] == 0.0


# ------------------------------------------------------------------------------------------------ 5. eval crop
def test_base_evaluates_at_the_official_crop_and_timms_is_an_option(tmp_path, digits_folder):
    assert get_entry("inceptionnext_base").cfg.crop_pct == 0.875
    ckpt = tmp_path / "atto.pth"
    torch.save(create_model("inceptionnext_atto", num_classes=4).state_dict(), ckpt)
    kw = dict(
        model_name="inceptionnext_atto", checkpoint=str(ckpt), data=str(digits_folder), progress=False, num_classes=4
    )
    assert validate(**kw)["crop_pct"] == 0.875
    assert validate(**kw, crop_pct=0.95)["crop_pct"] == 0.95
    with pytest.raises(ConfigError, match=r"crop_pct must be in \(0, 1\]"):
        validate(**kw, crop_pct=0.0)


# ------------------------------------------------------------------------------------------------ 8. fine-tune
def test_fine_tune_without_starting_weights_is_refused(tmp_path, digits_folder, capsys):
    out = tmp_path / "ft"
    cfg = resolve_config("base_384", {"data": str(digits_folder), "output": str(out), "workers": 0})
    with pytest.raises(ConfigError, match="--initial-checkpoint FILE"):
        train(cfg)
    assert not out.exists()
    assert main(["train", "--recipe", "base_384", "--data", str(digits_folder), "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: recipe base_384 fine-tunes a trained model") and "--pretrained" in err
    assert len(err.strip().splitlines()) == 1 and not out.exists()
    assert "refuse to start without" in dry_run_text(cfg)


# ------------------------------------------------------------------------------------------------ config values
def test_yaml_numbers_written_without_a_dot_are_numbers_and_bad_yaml_is_a_message(tmp_path):
    good = tmp_path / "r.yaml"
    good.write_text("lr: 1e-3\nmin_lr: 1e-6\nepochs: 3\n")
    cfg = resolve_config(str(good))
    assert cfg.lr == 1e-3 and isinstance(cfg.lr, float) and cfg.min_lr == 1e-6
    bad = tmp_path / "bad.yaml"
    bad.write_text("lr: fast\n")
    with pytest.raises(ConfigError, match="lr must be a number, got 'fast'"):
        resolve_config(str(bad))
    broken = tmp_path / "broken.yaml"
    broken.write_text("lr: [1e-3\nepochs: 3\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        resolve_config(str(broken))
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text("epochs: many\n")
    with pytest.raises(ConfigError, match="epochs must be an integer"):
        resolve_config(str(wrong))


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--log-interval", "0"], "log_interval must be >= 1"),
        (["--smoothing", "1.5"], r"smoothing must be in \[0, 1\)"),
        (["--lr", "0"], r"lr must be in \(0, inf\)"),
        (["--lr", "-1"], r"lr must be in \(0, inf\)"),
        (["--warmup-epochs", "-5"], r"warmup_epochs must be in \[0, inf\)"),
        (["--crop-pct", "0"], r"crop_pct must be in \(0, 1\]"),
        (["--sched-on", "epoch", "--cooldown-epochs", "-1"], r"cooldown_epochs must be in \[0, inf\)"),
    ],
)
def test_bad_flag_values_are_one_line_errors(flags, message, capsys):
    assert main(["train", "--recipe", "tiny", *flags, "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert re.match(f"error: {message}", err) and len(err.strip().splitlines()) == 1, err


def test_a_recipe_name_is_not_shadowed_by_a_file_or_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny").mkdir()
    (tmp_path / "small").write_text("epochs: 1\n")
    assert resolve_config("tiny").recipe == "tiny" and resolve_config("tiny").model == "inceptionnext_tiny"
    assert resolve_config("small").epochs == 300  # the packaged recipe, not ./small
    assert resolve_config("./small").epochs == 1  # a path is a path
    assert load_recipe(Path("small")) == {"epochs": 1}  # --config passes a Path
    with pytest.raises(ConfigError, match="unknown recipe 'mine'.*give its path"):
        (tmp_path / "mine").write_text("epochs: 1\n")
        resolve_config("mine")
    assert set(PAPER) | set(NEW) | {"digits"} == set(list_recipes())


def test_config_file_flag_reads_a_file_without_suffix(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny").write_text("epochs: 7\nwarmup_epochs: 1\n")
    assert main(["train", "--config", "tiny", "--dry-run"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["epochs"] == 7
