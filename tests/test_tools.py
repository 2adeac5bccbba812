"""Grad-CAM, predict, image reading and the hubs (torch.hub on the clone, timm/Hugging Face folder layout)."""

import json
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image

import inceptionnext
from inceptionnext import create_model, list_models
from inceptionnext.cli import main
from inceptionnext.engine import train, validate
from inceptionnext.engine.config import resolve_config
from inceptionnext.inference import LoadedModel, find_images, load_model, read_image
from inceptionnext.tools import hub
from inceptionnext.tools.cam import cam_grid, compute_cam, target_layer
from inceptionnext.tools.predict import predict

ROOT = Path(__file__).resolve().parents[1]
FOUR_STAGE = [n for n in list_models() if not n.endswith("_iso")]
PRE64 = {"input_size": (3, 64, 64), "crop_pct": 1.0, "interpolation": "bicubic",
         "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}  # fmt: skip


@pytest.fixture(scope="module")
def photo(tmp_path_factory) -> Path:
    """A real photograph bundled with scikit-learn, downsized."""
    from sklearn.datasets import load_sample_images

    path = tmp_path_factory.mktemp("photo") / "china.jpg"
    Image.fromarray(load_sample_images().images[0]).resize((120, 90)).save(path)
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory, digits_folder) -> Path:
    out = tmp_path_factory.mktemp("trained")
    cfg = resolve_config("digits", dict(data=str(digits_folder), output=str(out), epochs=2, batch_size=16,
                                        lr_base_batch=16, workers=0, model_ema=False))  # fmt: skip
    train(cfg)
    return out / "last.pth"


@pytest.mark.parametrize("name", FOUR_STAGE)
def test_cam_shape_and_range_for_every_four_stage_variant(name, photo):
    torch.manual_seed(0)
    loaded = LoadedModel(create_model(name, num_classes=5, ls_init_value=1.0).eval(), name, PRE64, None)
    result = compute_cam(loaded, photo)
    assert result.cam.shape == (64, 64) and result.image.shape == (64, 64, 3)
    assert result.cam.min() >= 0 and result.cam.max() <= 1 and np.isfinite(result.cam).all()
    assert 0 <= result.target < 5 and 0 <= result.prob <= 1
    module, _ = target_layer(loaded.model)
    assert module is loaded.model.stages[3]  # the last stage, as Figure 4


def test_cam_for_timm_peers_and_explicit_targets(photo):
    for model in (timm.create_model("resnet18", num_classes=4), timm.create_model("vit_tiny_patch16_224", img_size=64,
                                                                                  num_classes=4)):  # fmt: skip
        loaded = LoadedModel(model.eval(), type(model).__name__, PRE64, ["a", "b", "c", "d"])
        r = compute_cam(loaded, photo, target_class=2, method="gradcam++")
        assert r.cam.shape == (64, 64) and r.target == 2 and r.label == "c"
    with pytest.raises(ValueError, match="out of range"):
        compute_cam(loaded, photo, target_class=9)
    with pytest.raises(ValueError, match="unknown CAM method"):
        compute_cam(loaded, photo, method="magic")


def test_cam_grid_and_cli(tmp_path, photo, trained, digits_folder):
    bad = tmp_path / "bad.jpg"
    bad.write_text("not an image")
    digit = next((digits_folder / "val" / "class_2").iterdir())
    code = main(["cam", str(photo), str(digit), str(bad), "--model", f"={trained}",
                 "--model", "convnext_tiny_k3", "--output", str(tmp_path / "cam")])  # fmt: skip
    assert code == 0
    grid = Image.open(tmp_path / "cam" / "cam_grid.png")
    assert grid.size[0] > grid.size[1]  # 2 rows, 3 columns (input + 2 models)
    assert len(list((tmp_path / "cam").glob("*__*.png"))) == 4
    loaded = load_model(checkpoint=trained)
    _, overlays, problems = cam_grid([photo, bad], [("m", loaded)], tmp_path / "g", progress=False)
    assert len(overlays) == 1 and "bad.jpg" in problems[0]


def test_read_image_converts_modes(tmp_path):
    rgba = Image.new("RGBA", (8, 8), (255, 0, 0, 0))
    rgba.save(tmp_path / "rgba.png")
    assert read_image(tmp_path / "rgba.png").getpixel((0, 0)) == (255, 255, 255)  # transparent -> white
    Image.new("L", (8, 8), 7).save(tmp_path / "gray.png")
    assert read_image(tmp_path / "gray.png").getpixel((0, 0)) == (7, 7, 7)
    ramp = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "deep.png")
    img = read_image(tmp_path / "deep.png")
    assert img.mode == "RGB" and img.getpixel((0, 0)) == (0, 0, 0) and img.getpixel((7, 7)) == (255, 255, 255)
    Image.new("P", (8, 8), 3).save(tmp_path / "pal.gif")
    assert read_image(tmp_path / "pal.gif").mode == "RGB"
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ValueError, match="not a readable image"):
        read_image(tmp_path / "notes.txt")
    files, problems = find_images([tmp_path, tmp_path / "missing"])
    assert {f.name for f in files} == {"rgba.png", "gray.png", "deep.png", "pal.gif"}
    assert "no such file" in problems[0]


def test_predict_agrees_with_validation(trained, digits_folder, tmp_path):
    loaded = load_model(checkpoint=trained)
    report = predict(loaded, [digits_folder / "val"], topk=3, progress=False)
    assert len(report.predictions) == 24 and not report.errors
    hits = [p.topk[0]["label"] == Path(p.path).parent.name for p in report.predictions]
    top1 = validate(checkpoint=str(trained), progress=False)["top1"]
    assert 100 * sum(hits) / len(hits) == pytest.approx(top1)
    first = report.to_dict()["predictions"][0]
    assert set(first) == {"path", "topk"} and len(first["topk"]) == 3
    assert set(first["topk"][0]) == {"index", "label", "prob"}
    assert first["topk"][0]["prob"] >= first["topk"][1]["prob"]


def test_predict_cli_formats_and_reports_unreadable_files(trained, digits_folder, tmp_path, capsys):
    (tmp_path / "junk.png").write_bytes(b"\x89PNG broken")
    one = next((digits_folder / "val" / "class_1").iterdir())
    assert main(["predict", str(one), str(tmp_path / "junk.png"), "--checkpoint", str(trained),
                 "--format", "json", "--output", str(tmp_path / "p.json")]) == 0  # fmt: skip
    data = json.loads(capsys.readouterr().out)
    assert data["model"] == "inceptionnext_atto" and len(data["predictions"]) == 1
    assert "junk.png" in data["errors"][0]
    assert json.loads((tmp_path / "p.json").read_text()) == data
    assert main(["predict", str(one), "--checkpoint", str(trained)]) == 0
    assert "1 images classified, 0 skipped" in capsys.readouterr().out


def test_imagenet_models_get_imagenet_class_names():
    loaded = load_model("inceptionnext_atto")
    assert len(loaded.class_names) == 1000 and loaded.class_names[1].startswith("goldfish")


def test_hub_folder_round_trip_through_timm(trained, tmp_path, photo):
    loaded = load_model(checkpoint=trained)
    folder = hub.export_folder(loaded, tmp_path / "export")
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["architecture"] == "inceptionnext_atto" and cfg["label_names"] == loaded.class_names
    assert (folder / "model.safetensors").is_file()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = loaded.model(x)
        via_timm = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
        torch.testing.assert_close(via_timm(x), expected)
    assert via_timm.pretrained_cfg["label_names"] == loaded.class_names
    assert tuple(via_timm.pretrained_cfg["input_size"]) == (3, 32, 32)
    again = load_model(f"local-dir:{folder}")
    assert again.class_names == loaded.class_names
    assert predict(again, [photo], progress=False).predictions[0].topk[0]["label"] in loaded.class_names


def test_hf_hub_pull_and_push_offline(trained, tmp_path, monkeypatch):
    import huggingface_hub

    folder = hub.export_folder(load_model(checkpoint=trained), tmp_path / "export")
    monkeypatch.setattr(huggingface_hub, "hf_hub_download",
                        lambda repo_id, filename, **kw: str(folder / filename))  # fmt: skip
    monkeypatch.setattr(timm.models._hub, "hf_hub_download", lambda repo_id, filename, **kw: str(folder / filename))
    model = timm.create_model("hf-hub:someone/inceptionnext-digits", pretrained=True)
    state = load_model(checkpoint=trained).model.state_dict()
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())

    uploaded = {}

    class FakeApi:
        def __init__(self, token=None):
            pass

        def create_repo(self, repo_id, private=False, exist_ok=True):
            return type("Repo", (), {"repo_id": repo_id})()

        def upload_folder(self, repo_id, folder_path, commit_message):
            uploaded.update(repo=repo_id, files=sorted(p.name for p in Path(folder_path).iterdir()))

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    url = hub.push_to_hub(folder, "someone/inceptionnext-digits")
    assert url.endswith("someone/inceptionnext-digits")
    assert uploaded["files"] == ["README.md", "config.json", "model.safetensors"]


def test_torch_hub_load_on_the_clone():
    import importlib.util

    spec = importlib.util.spec_from_file_location("hubconf", ROOT / "hubconf.py")
    hubconf = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hubconf)
    assert all(callable(getattr(hubconf, name)) for name in list_models())  # one entry point per model
    model = torch.hub.load(str(ROOT), "inceptionnext_atto", source="local", num_classes=3)
    assert isinstance(model, inceptionnext.MetaNeXt) and model.num_classes == 3


def test_any_model_name_resolves_to_this_package_or_timm():
    from inceptionnext.models import UnknownModelError
    from inceptionnext.models.factory import create_any_model

    assert type(create_any_model("resnet18.a1_in1k")).__name__ == "ResNet"  # timm arch.tag
    assert isinstance(create_any_model("inceptionnext_atto"), inceptionnext.MetaNeXt)
    with pytest.raises(UnknownModelError, match="timm's models are accepted too"):
        create_any_model("inceptionnext_tny")
