"""Bad input to inference, data and tools ends in a clear error or a correct result (issue 11, the probe).

Each test reproduces one case of the probe: a checkpoint of another class count, unreadable val images, 16-bit and
transparent images, a class of unreadable images, checkpoints that are not what they claim, output names that
collide, flags out of range, files written unasked.
"""

import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from inceptionnext import create_model
from inceptionnext.checkpoint import CheckpointError, read_checkpoint
from inceptionnext.cli import main
from inceptionnext.data import DataError, ImageFolderDataset
from inceptionnext.engine import train, validate
from inceptionnext.engine.config import resolve_config
from inceptionnext.errors import ConfigError, UserError
from inceptionnext.inference import LoadedModel, load_model, read_image
from inceptionnext.tools.predict import predict

PRE32 = {"input_size": (3, 32, 32), "crop_pct": 1.0, "interpolation": "bicubic",
         "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}  # fmt: skip


@pytest.fixture(scope="module")
def trained(tmp_path_factory, digits_folder) -> Path:
    """A training checkpoint of this package (4 digit classes, 32 px), one short epoch."""
    out = tmp_path_factory.mktemp("trained")
    cfg = resolve_config("digits", dict(data=str(digits_folder), output=str(out), epochs=1, warmup_epochs=0,
                                        batch_size=16, lr_base_batch=16, workers=0, model_ema=False))  # fmt: skip
    train(cfg)
    return out / "last.pth"


@pytest.fixture
def val_copy(tmp_path, digits_folder) -> Path:
    """A writable copy of the digits ImageFolder (train/ and val/)."""
    root = tmp_path / "data"
    shutil.copytree(digits_folder, root)
    return root


def _image(digits_folder: Path) -> Path:
    return next((digits_folder / "val" / "class_1").iterdir())


def _last_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err  # one line, no traceback
    return lines[0]


# ------------------------------------------------------------------------------- checkpoint of another num_classes


def test_inference_refuses_a_checkpoint_of_another_class_count(tmp_path, digits_folder, capsys):
    path = tmp_path / "ten.pth"
    torch.save(create_model("inceptionnext_atto", num_classes=10).state_dict(), path)
    with pytest.raises(CheckpointError, match=r"10-class classifier.*built for 1000 classes") as err:
        load_model("inceptionnext_atto", path)
    assert "--num-classes 10" in str(err.value) and "class names" in str(err.value)
    img = str(_image(digits_folder))
    source = ["--model", "inceptionnext_atto", "--checkpoint", str(path)]
    for argv in (["predict", img, *source], ["hub", "export", *source, str(tmp_path / "hub")],
                 ["export", *source, "--output", str(tmp_path)]):  # fmt: skip
        assert main(argv) == 2
        assert "10-class classifier" in _last_line(capsys.readouterr().err)
    assert not (tmp_path / "hub").exists() and not list(tmp_path.glob("*.onnx"))
    # the fix the message names: the checkpoint's class count, predictions as class indices
    loaded = load_model("inceptionnext_atto", path, num_classes=10)
    assert loaded.model.num_classes == 10 and loaded.class_names is None
    assert main(["predict", img, *source, "--num-classes", "10"]) == 0


def test_inference_refuses_a_timm_checkpoint_of_another_class_count(tmp_path):
    path = tmp_path / "r18.pth"
    torch.save(timm.create_model("resnet18", num_classes=3).state_dict(), path)
    with pytest.raises(CheckpointError, match=r"3-class classifier \(fc.weight"):
        load_model("resnet18", path)
    assert load_model("resnet18", path, num_classes=3).model.num_classes == 3


def test_fine_tuning_still_reinitialises_the_head(tmp_path):
    path = tmp_path / "in1k.pth"
    torch.save(create_model("inceptionnext_atto").state_dict(), path)
    with pytest.warns(UserWarning, match="re-initialised for fine-tuning"):
        assert create_model("inceptionnext_atto", num_classes=4, checkpoint_path=path).num_classes == 4


# ------------------------------------------------------------------------------------------------- EMA


def test_use_ema_without_ema_weights_is_refused(tmp_path, digits_folder, capsys):
    path = tmp_path / "plain.pth"
    torch.save(create_model("inceptionnext_atto").state_dict(), path)
    with pytest.raises(CheckpointError, match="no EMA weights.*plain state dict"):
        load_model("inceptionnext_atto", path, use_ema=True)
    with pytest.raises(CheckpointError, match="no EMA weights"):
        create_model("inceptionnext_atto", checkpoint_path=path, use_ema=True)
    argv = ["predict", str(_image(digits_folder)), "--model", "inceptionnext_atto", "--checkpoint", str(path)]
    assert main([*argv, "--use-ema"]) == 2
    assert "no EMA weights" in _last_line(capsys.readouterr().err)
    with pytest.raises(ConfigError, match="needs a checkpoint"):
        load_model("inceptionnext_atto", pretrained=False, use_ema=True)


# ----------------------------------------------------------------------------------------- validate


def test_validate_leaves_unreadable_images_out_instead_of_counting_duplicates(trained, val_copy, tmp_path, capsys):
    val = val_copy / "val"
    broken = sorted((val / "class_2").iterdir())[:2]
    for f in broken:
        f.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    res = validate(checkpoint=str(trained), data=str(val_copy), workers=0, output=str(tmp_path / "res"))
    assert res["count"] == 22 and res["skipped"] == 2
    assert res["skipped_images"] == sorted(str(f) for f in broken)
    assert (tmp_path / "res" / "skipped_images.txt").read_text().split() == res["skipped_images"]
    # the same accuracy and loss as on the readable images alone
    for f in broken:
        f.unlink()
    clean = validate(checkpoint=str(trained), data=str(val_copy), workers=0)
    assert clean["count"] == 22 and clean["skipped"] == 0
    assert (res["top1"], res["top5"]) == (clean["top1"], clean["top5"])
    assert res["loss"] == pytest.approx(clean["loss"])


def test_validate_cli_reports_skipped_images_and_refuses_when_none_is_readable(trained, val_copy, capsys):
    bad = sorted((val_copy / "val" / "class_0").iterdir())[0]
    bad.write_bytes(b"not an image")
    assert main(["validate", "--checkpoint", str(trained), "--data", str(val_copy), "--workers", "1"]) == 0
    captured = capsys.readouterr()
    assert "(23 images" in captured.out
    assert "1 unreadable image(s) left out" in captured.err and str(bad) in captured.err
    for f in (val_copy / "val").rglob("*.png"):
        f.write_bytes(b"not an image")
    with pytest.raises(DataError, match="none of the 24 images"):
        validate(checkpoint=str(trained), data=str(val_copy), workers=0)


def test_no_progress_variable_silences_validate(trained, capsys, monkeypatch):
    monkeypatch.setenv("INCEPTIONNEXT_NO_PROGRESS", "1")
    validate(checkpoint=str(trained), workers=0)  # progress left at its default
    assert "validate" not in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- one reader


def test_datasets_read_images_as_predict_does(tmp_path):
    root = tmp_path / "folder"
    (root / "deep").mkdir(parents=True)
    (root / "alpha").mkdir()
    ramp = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000).astype(np.uint16)  # 0 .. 63000 of 65535
    Image.fromarray(ramp).save(root / "deep" / "ramp.png")
    Image.new("RGBA", (8, 8), (255, 0, 0, 0)).save(root / "alpha" / "clear.png")  # fully transparent red
    ds = ImageFolderDataset(root)
    for i, (path, _) in enumerate(ds.samples):
        assert np.array_equal(np.asarray(ds[i][0]), np.asarray(read_image(path)))
    deep = np.asarray(ds[ds.samples.index((str(root / "deep" / "ramp.png"), 1))][0])
    assert (deep == 255).mean() < 0.05 and deep.min() == 0  # not clipped to white
    clear = np.asarray(ds[ds.samples.index((str(root / "alpha" / "clear.png"), 0))][0])
    assert (clear == 255).all()  # composited on white, as predict shows it


def test_segmentation_dataset_reads_16_bit_images_as_predict_does(tmp_path):
    from inceptionnext.segmentation.data import ADE20KDataset

    root = tmp_path / "ADEChallengeData2016"
    for sub in ("images", "annotations"):
        (root / sub / "validation").mkdir(parents=True)
    ramp = (np.arange(48 * 64, dtype=np.uint32).reshape(48, 64) * 20).astype(np.uint16)
    Image.fromarray(ramp).save(root / "images" / "validation" / "a.png")
    Image.fromarray(np.ones((48, 64), np.uint8), mode="L").save(root / "annotations" / "validation" / "a.png")
    img, _ = ADE20KDataset(root, "validation").load(0)
    assert np.array_equal(img, np.asarray(read_image(root / "images" / "validation" / "a.png")))
    assert (img == 255).mean() < 0.05


# ---------------------------------------------------------------------------------------- unreadable class


def _count_opens(monkeypatch) -> list[int]:
    calls = [0]
    real = Image.open

    def counting(*args, **kwargs):
        calls[0] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(Image, "open", counting)
    return calls


def test_a_class_of_unreadable_images_is_an_error_naming_it(val_copy):
    root = val_copy / "train"
    for f in (root / "class_1").iterdir():
        f.write_bytes(b"garbage")
    ds = ImageFolderDataset(root)
    first_of_class_1 = ds.targets.index(1)
    with pytest.raises(DataError, match="no image of class 'class_1' is readable"):
        ds[first_of_class_1 + 5]
    with pytest.raises(DataError, match="class_1"):
        ImageFolderDataset(root)[first_of_class_1]


def test_replacing_unreadable_images_reads_each_file_a_bounded_number_of_times(val_copy, monkeypatch):
    root = val_copy / "train"
    files = sorted((root / "class_1").iterdir())
    for f in files[4:]:  # 20 of 24 unreadable, at the end of the class: every replacement walks into class_2
        f.write_bytes(b"garbage")
    ds = ImageFolderDataset(root)
    calls = _count_opens(monkeypatch)
    labels = [ds[i][1] for i in range(len(ds))]
    assert labels.count(1) == 4 and labels.count(2) == 24 + 20  # the label follows the image read
    assert calls[0] <= 2 * len(ds)  # linear: the walk past 20 bad files used to cost 230 reads on its own


def test_worker_errors_print_as_their_own_message():
    from torch.utils.data import DataLoader, Dataset

    from inceptionnext.cli import user_message

    class Broken(Dataset):
        def __len__(self):
            return 2

        def __getitem__(self, i):
            raise DataError("no image of class 'cat' is readable")

    with pytest.raises(DataError) as err:
        next(iter(DataLoader(Broken(), num_workers=1)))
    assert "Traceback" in str(err.value)  # what torch makes of it
    assert user_message(err.value) == "no image of class 'cat' is readable"


# ---------------------------------------------------------------------------------------- checkpoints


def test_random_bytes_are_not_called_pickled_objects(tmp_path):
    path = tmp_path / "noise.pth"
    path.write_bytes(bytes(range(7, 256)) * 8)  # not a zip, not a pickle
    with pytest.raises(CheckpointError, match="not a checkpoint file") as err:
        read_checkpoint(path)
    assert "pickled" not in str(err.value)


class _Payload:
    def __reduce__(self):
        return (print, ("this must never run",))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_resume_of_a_pickle_payload_is_a_checkpoint_error(tmp_path, digits_folder, capsys):
    raw = tmp_path / "raw.pkl.pth"
    raw.write_bytes(pickle.dumps({"model": _Payload()}, protocol=4))  # a plain pickle, not torch.save's zip
    zipped = tmp_path / "zipped.pth"
    torch.save({"model": _Payload()}, zipped)
    for path in (raw, zipped):
        with pytest.raises(CheckpointError, match="could execute code") as err:
            read_checkpoint(path)
        assert "weights_only` set to `False`" not in str(err.value)  # no advice to load it unsafely
        out = tmp_path / f"run_{path.stem}"
        argv = ["train", "--data", str(digits_folder), "--output", str(out), "--epochs", "1", "--workers", "0",
                "--warmup-epochs", "0", "--batch-size", "16"]  # fmt: skip
        assert main([*argv, "--resume", str(path)]) == 2
        assert "could execute code" in _last_line(capsys.readouterr().err)
        assert not (out / "last.pth").exists()
    assert "this must never run" not in capsys.readouterr().out


def test_segment_eval_on_a_classification_checkpoint_is_a_clear_error(trained, capsys):
    assert main(["segment", "eval", "--checkpoint", str(trained)]) == 2
    line = _last_line(capsys.readouterr().err)
    assert "classification checkpoint (inceptionnext_atto)" in line and "segment train" in line


def test_classification_tools_on_a_segmentation_checkpoint_are_a_clear_error(tmp_path):
    from inceptionnext.segmentation.config import SegConfig

    path = tmp_path / "seg.pth"
    torch.save({"config": SegConfig().to_dict(), "class_names": ["a", "b"], "model": {}}, path)
    with pytest.raises(CheckpointError, match="segmentation checkpoint"):
        load_model(checkpoint=path)


# -------------------------------------------------------------------------------------------- hub push


def test_hub_push_offline_is_a_user_error_naming_the_network(trained, monkeypatch, capsys):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.setenv("HF_TOKEN", "hf_not_a_real_token")
    assert main(["hub", "push", "--checkpoint", str(trained), "someone/inceptionnext-digits"]) == 2
    line = _last_line(capsys.readouterr().err)
    assert "could not reach the Hugging Face Hub at http://127.0.0.1:9" in line and "network" in line


# ---------------------------------------------------------------------------------------------- flags


@pytest.mark.parametrize("topk", ["0", "-3"])
def test_topk_below_one_is_refused(trained, digits_folder, topk, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["predict", str(_image(digits_folder)), "--checkpoint", str(trained), "--topk", topk])
    assert exit_.value.code == 2 and "must be >= 1" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="topk"):
        predict(load_model(checkpoint=trained), [_image(digits_folder)], topk=int(topk), progress=False)


def test_complexity_writes_no_file_unless_asked(tmp_path, monkeypatch, capsys):
    from inceptionnext import complexity as cx

    real = cx.complexity_table
    monkeypatch.setattr(cx, "complexity_table", lambda pattern=None, progress=False: real("inceptionnext_atto"))
    monkeypatch.chdir(tmp_path)
    assert main(["complexity"]) == 0
    assert list(tmp_path.iterdir()) == []
    assert main(["complexity", "--model", "inceptionnext_atto", "--figure", "fig3.png"]) == 0
    assert [p.name for p in tmp_path.iterdir()] == ["fig3.png"]


# ------------------------------------------------------------------------------------------ output names


def test_unique_names_keep_sub_paths_and_number_the_rest(tmp_path):
    from inceptionnext.inference import unique_names

    a, b = tmp_path / "a" / "x.jpg", tmp_path / "b" / "x.jpg"
    assert unique_names([a, b, tmp_path / "y.png"]) == ["a__x", "b__x", "y"]
    assert unique_names([tmp_path / "x.jpg", tmp_path / "x.png", tmp_path / "X.jpeg"]) == ["x", "x-2", "X-3"]


def _same_stem_images(root: Path) -> list[Path]:
    rng = np.random.default_rng(0)
    paths = []
    for sub in ("a", "b"):
        (root / sub).mkdir(parents=True)
        paths.append(root / sub / "img.png")
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(paths[-1])
    return paths


def test_cam_names_every_overlay_apart(tmp_path, capsys):
    pytest.importorskip("pytorch_grad_cam")
    from inceptionnext.tools.cam import cam_grid

    images = _same_stem_images(tmp_path / "in")
    torch.manual_seed(0)
    models = [("inceptionnext_atto", LoadedModel(create_model("inceptionnext_atto", num_classes=3).eval(),
                                                 "inceptionnext_atto", PRE32, None)) for _ in range(2)]  # fmt: skip
    _, overlays, _ = cam_grid(images, models, tmp_path / "out", progress=False)
    assert len(overlays) == len(set(overlays)) == 4
    assert len(list((tmp_path / "out").glob("*__*.png"))) == 4
    # two checkpoints of one architecture on the command line: both columns, both overlays
    ckpts = []
    for i in range(2):
        run = tmp_path / f"run{i}"
        run.mkdir()
        torch.save(create_model("inceptionnext_atto").state_dict(), run / "best.pth")
        ckpts.append(run / "best.pth")
    argv = ["cam", *map(str, images), "--output", str(tmp_path / "cli")]
    for c in ckpts:
        argv += ["--model", f"inceptionnext_atto={c}"]
    assert main(argv) == 0
    assert "4 overlays" in capsys.readouterr().out
    assert len(list((tmp_path / "cli").glob("*__*.png"))) == 4


def test_segment_predict_names_every_mask_apart(tmp_path, capsys):
    from inceptionnext.segmentation.config import SegConfig
    from inceptionnext.segmentation.engine import build_segmentor

    cfg = SegConfig(backbone="inceptionnext_atto", head="fpn", scale=[64, 48])
    path = tmp_path / "seg.pth"
    torch.save({"config": cfg.to_dict(), "class_names": ["a", "b", "c"],
                "model": build_segmentor(cfg, 3).state_dict()}, path)  # fmt: skip
    images = _same_stem_images(tmp_path / "in")
    out = tmp_path / "masks"
    assert main(["segment", "predict", *map(str, images), "--checkpoint", str(path), "--output", str(out)]) == 0
    assert "2 images segmented" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["a__img_mask.png", "a__img_overlay.png", "b__img_mask.png",
                                                     "b__img_overlay.png"]  # fmt: skip


def test_every_error_added_here_is_a_user_error():
    from inceptionnext.data import ImageError
    from inceptionnext.segmentation.data import SegDataError
    from inceptionnext.tools.hub import HubError

    for cls in (CheckpointError, DataError, ImageError, HubError, SegDataError, ConfigError):
        assert issubclass(cls, UserError)


def test_training_validation_leaves_unreadable_images_out(tmp_path, digits_folder):
    """The per-epoch validation of a training run counts each readable val image once: an unreadable one is left
    out (and logged), not replaced by the next image of the folder."""
    from inceptionnext.engine.classification import ClassificationRun
    from inceptionnext.engine.runtime import DistInfo

    root = tmp_path / "data"
    shutil.copytree(digits_folder, root)
    bad = root / "val" / "class_2" / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    cfg = resolve_config("digits", {"data": str(root), "output": str(tmp_path / "out"), "workers": 0})
    run = ClassificationRun(cfg, DistInfo())
    run.build()
    run.out.mkdir()  # the run creates it after build(); the skip log goes there
    seen = sum(len(y) for _, y in run.val_loader)
    assert len(run.val_set) == 25 and seen == 24
    assert run.val_loader.all_skipped() == [str(bad)]
    assert str(bad) in (run.out / "skipped_images.txt").read_text()
