"""ONNX / TorchScript export, parity (checked with onnxruntime directly), metadata, serving, ``predict --onnx``."""

import json
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from torch import nn

from inceptionnext import create_model
from inceptionnext.cli import main
from inceptionnext.export import ExportError, MissingDependencyError, export_onnx, export_torchscript
from inceptionnext.inference import load_model
from inceptionnext.serve import OnnxClassifier, read_onnx_metadata, read_torchscript_metadata

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

CLASSES = ["zero", "one", "two", "three"]
PRE64 = {"input_size": [3, 64, 64], "crop_pct": 1.0, "interpolation": "bicubic",
         "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}  # fmt: skip


def _ort_logits(path: Path, x: torch.Tensor) -> np.ndarray:
    """onnxruntime directly, not through the package's OnnxClassifier."""
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]


@torch.inference_mode()
def _eager(model: nn.Module, x: torch.Tensor) -> np.ndarray:
    return model.eval()(x).numpy()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A checkpoint in this package's training layout: atto with 4 classes, 64 px preprocessing, class names."""
    torch.manual_seed(0)
    model = create_model("inceptionnext_atto", num_classes=4, ls_init_value=1.0)  # LayerScale 1: blocks matter
    for m in model.modules():  # non-trivial BatchNorm statistics, so folding them is exercised
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    path = tmp_path_factory.mktemp("ckpt") / "atto4.pth"
    ckpt = {"model": model.state_dict(), "epoch": 0, "config": {"model_kwargs": {"ls_init_value": 1.0}},
            "model_name": "inceptionnext_atto", "class_names": CLASSES, "eval_preprocessing": PRE64}  # fmt: skip
    torch.save(ckpt, path)
    return path


@pytest.fixture(scope="module")
def exported(tmp_path_factory, checkpoint) -> Path:
    """``inceptionnext export --format both`` of the checkpoint (fused by default), into a folder."""
    out = tmp_path_factory.mktemp("exported")
    assert main(["export", "--checkpoint", str(checkpoint), "--format", "both", "--output", str(out)]) == 0
    return out


def test_cli_export_onnx_parity_checked_independently(exported, checkpoint):
    path = exported / "inceptionnext_atto.onnx"
    assert path.is_file() and not list(exported.glob("*.data"))  # weights embedded, no sidecar
    onnx.checker.check_model(str(path), full_check=True)
    graph = onnx.load(str(path)).graph
    assert [i.name for i in graph.input] == ["images"] and [o.name for o in graph.output] == ["logits"]
    dims = graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param and [d.dim_value for d in dims[1:]] == [3, 64, 64]  # dynamic batch, fixed 64x64
    model = load_model(checkpoint=checkpoint).model  # the unfused eager model
    for batch in (1, 3):  # the export used batch 2
        x = torch.randn(batch, 3, 64, 64, generator=torch.Generator().manual_seed(batch))
        got, ref = _ort_logits(path, x), _eager(model, x)
        assert got.shape == (batch, 4)
        assert np.abs(got - ref).max() <= 1e-4


def test_cli_export_torchscript_roundtrip(exported, checkpoint):
    path = exported / "inceptionnext_atto.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.load is deprecated in torch 2.14
        ts = torch.jit.load(str(path))
    model = load_model(checkpoint=checkpoint).model
    x = torch.randn(5, 3, 64, 64)
    with torch.inference_mode():
        assert (ts(x) - model(x)).abs().max() <= 1e-4
    meta = read_torchscript_metadata(path)
    assert meta["class_names"] == CLASSES and meta["input_size"] == [3, 64, 64] and meta["fused"] is True


def test_onnx_metadata_roundtrip(exported):
    path = exported / "inceptionnext_atto.onnx"
    meta = read_onnx_metadata(path)
    assert meta["model_name"] == "inceptionnext_atto" and meta["class_names"] == CLASSES
    assert meta["input_size"] == [3, 64, 64] and meta["crop_pct"] == 1.0 and meta["interpolation"] == "bicubic"
    assert meta["mean"] == PRE64["mean"] and meta["std"] == PRE64["std"] and meta["exporter"] == "dynamo"
    props = {p.key: p.value for p in onnx.load(str(path)).metadata_props}  # plain JSON strings for other readers
    assert json.loads(props["class_names"]) == CLASSES
    clf = OnnxClassifier(path, intra_op_threads=1)
    assert clf.preprocessing == {k: tuple(v) if isinstance(v, list) else v for k, v in PRE64.items()}
    assert clf.class_names == CLASSES and clf.model_name == "inceptionnext_atto"
    assert clf(torch.zeros(2, 3, 64, 64)).shape == (2, 4)
    with pytest.raises(ValueError, match="takes input of shape"):
        clf(np.zeros((1, 3, 32, 32), np.float32))


def test_predict_onnx_matches_torch(exported, checkpoint, digits_folder, tmp_path):
    val = digits_folder / "val"
    torch_json, onnx_json = tmp_path / "torch.json", tmp_path / "onnx.json"
    assert main(["predict", str(val), "--checkpoint", str(checkpoint), "--output", str(torch_json)]) == 0
    onnx_file = str(exported / "inceptionnext_atto.onnx")
    assert main(["predict", str(val), "--onnx", onnx_file, "--output", str(onnx_json)]) == 0
    ref, got = json.loads(torch_json.read_text()), json.loads(onnx_json.read_text())
    assert len(got["predictions"]) == len(ref["predictions"]) == 24
    for r, g in zip(ref["predictions"], got["predictions"]):
        assert g["path"] == r["path"]
        assert g["topk"][0]["label"] == r["topk"][0]["label"] and g["topk"][0]["label"] in CLASSES
        assert abs(g["topk"][0]["prob"] - r["topk"][0]["prob"]) < 1e-4
    assert "onnxruntime" in got["weights"]


def test_timm_model_export_and_mode_restored(tmp_path):
    torch.manual_seed(0)
    model = timm.create_model("test_convnext", num_classes=10).train()
    report = export_onnx(model, tmp_path / "tc.onnx", image_size=64)
    assert model.training and all(m.training for m in model.modules())  # train mode given back
    assert report.exporter == "dynamo" and report.max_abs_diff <= 1e-4 and 2 not in report.checked_batch_sizes
    x = torch.randn(3, 3, 64, 64)
    assert np.abs(_ort_logits(tmp_path / "tc.onnx", x) - _eager(model, x)).max() <= 1e-4
    assert read_onnx_metadata(tmp_path / "tc.onnx")["model_name"] == "test_convnext"


class _Toy(nn.Module):
    """A tiny classifier whose exported graph can be made to differ from eager."""

    def __init__(self, cheat: bool = False) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 5)
        self.cheat = cheat

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fc(x.mean((2, 3)))
        if self.cheat and (torch.compiler.is_exporting() or torch.jit.is_tracing()):
            y = y + 1.0
        return y


def test_parity_failure_legacy_exporter_and_fallback(tmp_path, monkeypatch):
    with pytest.raises(ExportError, match="disagrees with the eager model"):
        export_onnx(_Toy(cheat=True), tmp_path / "bad.onnx", image_size=8)
    with pytest.raises(ExportError, match="disagrees with the eager model"):
        export_torchscript(_Toy(cheat=True), tmp_path / "bad.pt", image_size=8)
    assert not (tmp_path / "bad.onnx").exists() and not (tmp_path / "bad.pt").exists()  # failed files are removed
    report = export_onnx(_Toy(), tmp_path / "legacy.onnx", image_size=8, opset=17)  # < 18: TorchScript exporter
    assert report.exporter == "torchscript" and report.opset == 17 and report.max_abs_diff <= 1e-4

    import inceptionnext.export as ex

    def broken(*args, **kwargs):
        raise RuntimeError("simulated torch.export failure")

    monkeypatch.setattr(ex, "_export_dynamo", broken)
    with pytest.warns(UserWarning, match="simulated torch.export failure"):
        report = export_onnx(_Toy(), tmp_path / "fallback.onnx", image_size=8)
    assert report.exporter == "torchscript" and report.max_abs_diff <= 1e-4
    with pytest.raises(ExportError, match="dynamo=True"):
        export_onnx(_Toy(), tmp_path / "strict.onnx", image_size=8, exporter="dynamo")


def test_error_cases(tmp_path, capsys, monkeypatch, digits_folder):
    with pytest.raises(ExportError, match="features_only"):
        export_onnx(create_model("inceptionnext_atto", features_only=True), tmp_path / "f.onnx", image_size=64)
    with pytest.raises(ExportError, match="features_only"):
        export_torchscript(timm.create_model("test_convnext", features_only=True), tmp_path / "f.pt", image_size=64)
    with pytest.raises(SystemExit) as e:  # argparse: invalid --format choice
        main(["export", "--model", "inceptionnext_atto", "--format", "tflite"])
    assert e.value.code == 2
    assert main(["export", "--checkpoint", str(tmp_path / "missing.pth"), "--output", str(tmp_path)]) == 2
    assert main(["export", "--model", "inceptionnext_atto", "--output", str(tmp_path / "x.pt")]) == 2  # onnx -> .pt
    assert main(["export", "--model", "no_such_model_xyz"]) == 2
    image = next((digits_folder / "val" / "class_0").iterdir())
    assert main(["predict", str(image), "--onnx", str(tmp_path / "missing.onnx")]) == 2
    assert main(["predict", str(image), "--onnx", "m.onnx", "--model", "inceptionnext_atto"]) == 2
    (tmp_path / "junk.onnx").write_bytes(b"not a model")
    assert main(["predict", str(image), "--onnx", str(tmp_path / "junk.onnx")]) == 2
    err = capsys.readouterr().err
    for text in ("missing.pth", "--output", "no_such_model_xyz", "no such ONNX file", "--onnx replaces", "junk.onnx"):
        assert text in err

    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # as if not installed
    with pytest.raises(MissingDependencyError, match=r"pip install 'inceptionnext\[onnx\]'"):
        export_onnx(_Toy(), tmp_path / "t.onnx", image_size=8)
    with pytest.raises(MissingDependencyError, match="onnxruntime"):
        OnnxClassifier(tmp_path / "junk.onnx")


def test_serving_names_moved_to_serve_with_a_deprecation_path(exported):
    import inceptionnext.export as ex
    from inceptionnext import serve

    for name in ("OnnxClassifier", "OnnxModule", "load_onnx_model", "physical_cores", "read_onnx_metadata",
                 "read_torchscript_metadata"):  # fmt: skip
        with pytest.warns(DeprecationWarning, match=f"inceptionnext.serve.{name}"):
            assert getattr(ex, name) is getattr(serve, name)
    with pytest.warns(DeprecationWarning):
        from inceptionnext.export import load_onnx_model
    loaded = load_onnx_model(exported / "inceptionnext_atto.onnx")
    assert loaded.class_names == CLASSES and loaded.preprocessing["input_size"] == (3, 64, 64)
    assert ex.MissingDependencyError is serve.MissingDependencyError  # raised by both: not deprecated
    with pytest.raises(AttributeError):
        ex.no_such_name  # noqa: B018
