"""int8 (calibrated QDQ ONNX) and bf16 (TorchScript under autocast) exports: agreement with fp32 on a trained tiny
model, the calibration reader, validate/predict on exported files, and the errors (missing or mismatched calibration
data, an already quantized file, a CPU without the instructions)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from inceptionnext import create_model, fuse
from inceptionnext.cli import main
from inceptionnext.engine import validate
from inceptionnext.export import ExportError, export_onnx
from inceptionnext.inference import eval_transform
from inceptionnext.quantize import (
    AlreadyQuantizedError,
    CalibrationError,
    CalibrationReader,
    calibration_batches,
    export_bf16,
    fp32_nodes,
    is_quantized,
    quantize_onnx,
)
from inceptionnext.serve import OnnxClassifier, TorchScriptClassifier, cpu_supports, load_exported_model

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime.quantization")
pytest.importorskip("onnxscript")

CLASSES = ["blue", "green", "red", "yellow"]
COLOURS = [(30, 60, 230), (40, 210, 50), (230, 40, 30), (230, 220, 30)]
TINY = {"depths": (1, 1, 2, 1), "dims": (16, 32, 64, 96), "ls_init_value": 1.0}  # InceptionNeXt-A's blocks, fewer
SIZE = 32
PRE = {"input_size": [3, SIZE, SIZE], "crop_pct": 1.0, "interpolation": "bilinear",
       "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}  # fmt: skip
# stated tolerances of the int8 file against fp32 on a trained model (measured here: 100% agreement, max |diff| of
# the logits ~5% of their range); they hold on any CPU, since onnxruntime's int8 kernels are exact integer arithmetic
MIN_AGREEMENT = 0.95
MAX_REL_DIFF = 0.15  # max |int8 - fp32| / max |fp32| over the val logits
BF16_REL_DIFF = 0.05  # bf16 keeps 8 bits of mantissa: ~0.4% per op, well under this on 12 blocks


def _pattern(kind: int, rng: np.random.Generator) -> Image.Image:
    """A 32 px image of class ``kind``: a random texture (stripes, checks or a spot) drawn in the class's colour on a
    random grey, with noise."""
    yy, xx = np.mgrid[0:SIZE, 0:SIZE]
    period, phase, texture = rng.integers(4, 9), rng.integers(0, 8), rng.integers(0, 3)
    if texture == 0:
        mask = ((yy + phase) // (period // 2) + (xx + phase) // (period // 2)) % 2
    elif texture == 1:
        mask = ((yy + phase) // (period // 2)) % 2
    else:
        cy, cx = rng.integers(8, 24, size=2)
        mask = ((yy - cy) ** 2 + (xx - cx) ** 2 < rng.integers(40, 120)).astype(int)
    fg = np.array(COLOURS[kind]) * rng.uniform(0.6, 1.0) + rng.integers(0, 40, size=3)
    bg = np.full(3, rng.integers(40, 200))
    img = np.where(mask[..., None] == 1, fg, bg) + rng.normal(0, 12, size=(SIZE, SIZE, 3))
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """An ImageFolder root with train/ (24 per class) and val/ (12 per class) of 32 px PNGs."""
    root = tmp_path_factory.mktemp("colours")
    rng = np.random.default_rng(0)
    for split, n in (("train", 24), ("val", 12)):
        for c, name in enumerate(CLASSES):
            (root / split / name).mkdir(parents=True)
            for i in range(n):
                _pattern(c, rng).save(root / split / name / f"{i:03d}.png")
    return root


def _load_split(root: Path, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    tf = eval_transform(PRE)
    xs, ys = [], []
    for c, name in enumerate(CLASSES):
        for p in sorted((root / split / name).iterdir()):
            xs.append(tf(Image.open(p).convert("RGB")))
            ys.append(c)
    return torch.stack(xs), torch.tensor(ys)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data) -> tuple[Path, torch.nn.Module]:
    """A small InceptionNeXt (one or two blocks a stage) trained for ~2 s on the colours (val top-1 ~98%), saved
    as a training checkpoint of this package."""
    torch.manual_seed(0)
    model = create_model("inceptionnext_atto", num_classes=len(CLASSES), **TINY)
    x, y = _load_split(data, "train")
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny GEMMs: one thread is faster, and far faster on a loaded machine
    try:
        model.train()
        for step in range(60):
            idx = torch.randint(0, len(x), (32,), generator=torch.Generator().manual_seed(step))
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
    model.eval()
    xv, yv = _load_split(data, "val")
    with torch.inference_mode():
        acc = (model(xv).argmax(1) == yv).float().mean().item()
    assert acc >= 0.9, f"the tiny model did not learn the colours (val top-1 {acc:.2f})"
    path = tmp_path_factory.mktemp("ckpt") / "colours.pth"
    config = {"model_kwargs": TINY, "data": str(data)}
    torch.save({"model": model.state_dict(), "epoch": 0, "config": config, "model_name": "inceptionnext_atto",
                "class_names": CLASSES, "eval_preprocessing": PRE}, path)  # fmt: skip
    return path, model


@pytest.fixture(scope="module")
def fp32_file(tmp_path_factory, trained) -> Path:
    _, model = trained
    meta = {"class_names": CLASSES, **{k: v for k, v in PRE.items() if k != "input_size"}}
    path = tmp_path_factory.mktemp("fp32") / "colours.onnx"
    return export_onnx(fuse(model, primitive="conv"), path, image_size=SIZE, metadata=meta, reference=model).path


@pytest.fixture(scope="module")
def int8_file(tmp_path_factory, fp32_file, data) -> Path:
    path = tmp_path_factory.mktemp("int8") / "colours_int8.onnx"
    report = quantize_onnx(fp32_file, path, data, batches=4, batch_size=16)
    assert report.agreement is not None and report.agreement >= 0.9
    return report.path


# ------------------------------------------------------------------------------------------------ calibration data
def test_calibration_batches_from_an_image_folder(data):
    batches, where = calibration_batches(data, PRE, batches=3, batch_size=8)
    assert where == str(data / "train")  # train/ is preferred over val/
    assert [b.shape for b in batches] == [(8, 3, SIZE, SIZE)] * 3
    assert all(b.dtype == np.float32 for b in batches)
    again, _ = calibration_batches(data, PRE, batches=3, batch_size=8)
    assert all(np.array_equal(a, b) for a, b in zip(batches, again))  # seeded
    other, _ = calibration_batches(data, PRE, batches=3, batch_size=8, seed=1)
    assert not np.array_equal(batches[0], other[0])
    # the same pixels as the eval transform gives for one of the files: the model's preprocessing, not another one
    tf = eval_transform(PRE)
    files = sorted((data / "train").rglob("*.png"))
    refs = [tf(Image.open(p).convert("RGB")).numpy() for p in files]
    assert any(np.allclose(batches[0][0], r) for r in refs)


def test_calibration_layouts_and_sizes(data, tmp_path):
    flat, where = calibration_batches(data / "val", PRE, batches=1, batch_size=4)  # root/<class>/<image>
    assert flat[0].shape == (4, 3, SIZE, SIZE) and where == str(data / "val")
    loose = tmp_path / "loose"
    loose.mkdir()
    for p in sorted((data / "val" / "red").iterdir())[:3]:
        (loose / p.name).write_bytes(p.read_bytes())
    few, _ = calibration_batches(loose, PRE, batches=2, batch_size=2)  # 3 images: 2 + 1
    assert [len(b) for b in few] == [2, 1]
    digits, where = calibration_batches("digits", {**PRE, "input_size": [3, 24, 24]}, batches=1, batch_size=5)
    assert digits[0].shape == (5, 3, 24, 24) and "digits" in where
    arr = np.random.default_rng(0).normal(size=(5, 3, SIZE, SIZE)).astype(np.float32)
    np.save(tmp_path / "calib.npy", arr)
    npy, _ = calibration_batches(tmp_path / "calib.npy", PRE, batches=2, batch_size=4)
    assert np.array_equal(np.concatenate(npy), arr)


def test_calibration_errors(data, tmp_path):
    with pytest.raises(CalibrationError, match="not found"):
        calibration_batches(tmp_path / "nowhere", PRE)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CalibrationError, match="no images"):
        calibration_batches(tmp_path / "empty", PRE)
    (tmp_path / "classes" / "a").mkdir(parents=True)
    with pytest.raises(CalibrationError, match="no images"):
        calibration_batches(tmp_path / "classes", PRE)
    np.save(tmp_path / "wrong.npy", np.zeros((4, 3, 16, 16), np.float32))
    with pytest.raises(CalibrationError, match=r"\(4, 3, 16, 16\).*\(N, 3, 32, 32\)"):
        calibration_batches(tmp_path / "wrong.npy", PRE)
    # a one-channel model: RGB images do not fit its input
    with pytest.raises(CalibrationError, match=r"preprocess to \(3, 32, 32\), the model takes \(1, 32, 32\)"):
        calibration_batches(data, {**PRE, "input_size": [1, SIZE, SIZE], "mean": [0.5], "std": [0.25]})
    bad = tmp_path / "broken" / "x"
    bad.mkdir(parents=True)
    (bad / "0.png").write_bytes(b"not a png")
    with pytest.raises(CalibrationError, match="readable"):
        calibration_batches(tmp_path / "broken", PRE)


def test_calibration_reader():
    batches = [np.full((2, 3, 4, 4), i, np.float64) for i in range(3)]
    reader = CalibrationReader(batches, "images")
    got = [reader.get_next() for _ in range(4)]
    assert got[3] is None
    assert [float(g["images"][0, 0, 0, 0]) for g in got[:3]] == [0.0, 1.0, 2.0]
    assert got[0]["images"].dtype == np.float32 and got[0]["images"].flags["C_CONTIGUOUS"]
    reader.rewind()
    assert float(reader.get_next()["images"][0, 0, 0, 0]) == 0.0
    with pytest.raises(CalibrationError):
        CalibrationReader([], "images")


# ----------------------------------------------------------------------------------------------------------- int8
def test_int8_agrees_with_fp32_on_a_trained_model(trained, data, fp32_file, int8_file):
    _, model = trained
    xv, yv = _load_split(data, "val")
    with torch.inference_mode():
        ref = model(xv).numpy()
    fp32 = OnnxClassifier(fp32_file)(xv)
    int8 = OnnxClassifier(int8_file)(xv)
    np.testing.assert_allclose(fp32, ref, atol=1e-4)  # the fp32 export is exact ...
    agree = float((int8.argmax(1) == ref.argmax(1)).mean())
    rel = float(np.abs(int8 - ref).max() / np.abs(ref).max())
    assert agree >= MIN_AGREEMENT, f"int8 top-1 agrees with fp32 on {agree:.1%}"  # ... int8 within the tolerance
    assert 0 < rel <= MAX_REL_DIFF, f"int8 logits differ by {rel:.1%} of their range"  # and it is not fp32
    assert (int8.argmax(1) == yv.numpy()).mean() >= (ref.argmax(1) == yv.numpy()).mean() - 0.05


def test_int8_file_structure_and_metadata(fp32_file, int8_file):
    proto = onnx.load(str(int8_file))
    ops = [n.op_type for n in proto.graph.node]
    assert ops.count("QuantizeLinear") > 10 and ops.count("DequantizeLinear") > 10
    meta = OnnxClassifier(int8_file).metadata
    fp32_meta = OnnxClassifier(fp32_file).metadata
    assert meta["precision"] == "int8" and meta["calibration_method"] == "minmax"
    assert meta["fp32_ops"] == ["stem", "head"]
    for key in ("mean", "std", "crop_pct", "interpolation", "class_names", "input_size", "num_classes"):
        assert meta[key] == fp32_meta[key]  # the preprocessing travels with the file
    # the head (after the global pool) has no quantized weights: its MatMul/Gemm read fp32 initializers
    head = set(fp32_nodes(proto, ["head"])["head"])
    produced_by = {o: n for n in proto.graph.node for o in n.output}
    head_mm = [n for n in proto.graph.node if n.name in head and n.op_type in ("MatMul", "Gemm")]
    assert head_mm
    for n in head_mm:
        assert all(getattr(produced_by.get(i), "op_type", None) != "DequantizeLinear" for i in n.input)
    assert OnnxClassifier(int8_file).preprocessing == OnnxClassifier(fp32_file).preprocessing
    assert int8_file.stat().st_size < 0.5 * fp32_file.stat().st_size


def _activation_scales(path: Path) -> dict[str, float]:
    proto = onnx.load(str(path))
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in proto.graph.initializer}
    return {n.input[1]: float(inits[n.input[1]]) for n in proto.graph.node
            if n.op_type == "QuantizeLinear" and inits.get(n.input[1], np.zeros(2)).size == 1}  # fmt: skip


def test_entropy_calibration_is_not_minmax(fp32_file, data, tmp_path):
    """onnxruntime's quantize_static(calibrate_method=Entropy) with its default 128-bin histograms returns MinMax's
    ranges exactly; ours uses 2048 bins, so the KL search clips the long tails: tighter scales, never wider."""
    common = dict(batches=2, batch_size=16, check=False)
    minmax = _activation_scales(quantize_onnx(fp32_file, tmp_path / "mm.onnx", data, method="minmax", **common).path)
    entropy = _activation_scales(quantize_onnx(fp32_file, tmp_path / "en.onnx", data, method="entropy", **common).path)
    assert minmax.keys() == entropy.keys() and len(minmax) > 10
    ratios = np.array([entropy[k] / minmax[k] for k in minmax])
    assert (ratios <= 1 + 1e-6).all() and (ratios < 0.95).sum() >= len(ratios) // 4, np.round(ratios, 3)


def test_fp32_op_groups(fp32_file):
    proto = onnx.load(str(fp32_file))
    groups = fp32_nodes(proto, ["stem", "head", "dwconv", "add", "none"])
    assert len(groups["stem"]) == 1 and "none" not in groups
    convs = {n.name: n for n in proto.graph.node if n.op_type == "Conv"}
    assert all(n in convs for n in groups["dwconv"]) and len(groups["dwconv"]) == 3 * 5  # 3 branches x 5 blocks
    assert len(groups["add"]) >= 5  # the residuals (biases may add more)
    with pytest.raises(Exception, match="unknown fp32 op group"):
        fp32_nodes(proto, ["everything"])


def test_bad_calibration_is_caught_by_the_check(data, fp32_file, tmp_path):
    """A hand-made failure: ranges calibrated on blank images saturate real activations (measured: top-1 agreement
    0.75, logit error 1.9x their range), and the agreement check on real images refuses the file (it is not written)."""
    blank = [np.zeros((8, 3, SIZE, SIZE), np.float32)]
    real = [_load_split(data, "val")[0].numpy()]
    kept = quantize_onnx(fp32_file, tmp_path / "blank.onnx", blank)  # checked on its own calibration: it passes
    assert kept.agreement == 1.0 and kept.checked_images == 8
    with pytest.raises(ExportError, match="agrees with the fp32 file on only .* of the 48 check images"):
        quantize_onnx(fp32_file, tmp_path / "checked.onnx", blank, check_data=real)
    assert not (tmp_path / "checked.onnx").exists()
    # a file already at the output (an earlier good export) is left as it was, and no staged file remains
    before = (tmp_path / "blank.onnx").read_bytes()
    with pytest.raises(ExportError, match="blank.onnx not written"):
        quantize_onnx(fp32_file, tmp_path / "blank.onnx", blank, check_data=real)
    assert (tmp_path / "blank.onnx").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blank.onnx"]
    unchecked = quantize_onnx(fp32_file, tmp_path / "unchecked.onnx", blank, check=False)
    assert unchecked.agreement is None and unchecked.path.is_file()


def test_already_quantized_and_other_refusals(fp32_file, int8_file, tmp_path, capsys):
    assert is_quantized(fp32_file) is None
    assert "int8" in is_quantized(int8_file)
    with pytest.raises(AlreadyQuantizedError, match="already quantized"):
        quantize_onnx(int8_file, tmp_path / "again.onnx", "digits")
    with pytest.raises(Exception, match="must not overwrite"):
        quantize_onnx(fp32_file, fp32_file, "digits")
    with pytest.raises(CalibrationError, match=r"shape \(2, 3, 8, 8\)"):
        quantize_onnx(fp32_file, tmp_path / "x.onnx", [np.zeros((2, 3, 8, 8), np.float32)])
    assert not (tmp_path / "x.onnx").exists()
    assert main(["export", "--from-onnx", str(int8_file), "--precision", "int8", "--calibration", "digits",
                 "--output", str(tmp_path)]) == 2  # fmt: skip
    assert "already quantized" in capsys.readouterr().err


def test_int8_without_vnni_reduces_range(fp32_file, data, tmp_path, monkeypatch):
    monkeypatch.setenv("INCEPTIONNEXT_CPU_FLAGS", "sse2 avx avx2 avx512f")
    assert cpu_supports("int8") == (False, "x86 CPU without avx512_vnni / avx_vnni / amx_int8 / asimddp / i8mm")
    with pytest.warns(UserWarning, match="reduce_range"):
        report = quantize_onnx(fp32_file, tmp_path / "rr.onnx", data, batches=2, batch_size=8, min_agreement=0.0)
    assert report.reduce_range and OnnxClassifier(report.path).metadata["reduce_range"] is True
    monkeypatch.setenv("INCEPTIONNEXT_CPU_FLAGS", "sse2 avx512_vnni avx512_bf16")
    assert cpu_supports("int8")[0] and cpu_supports("bf16")[0]


# ------------------------------------------------------------------------------------------------- validate/predict
def test_validate_and_predict_on_exported_files(trained, data, fp32_file, int8_file, capsys, tmp_path):
    ckpt, _ = trained
    ref = validate(checkpoint=str(ckpt), data=str(data), workers=0, progress=False, amp="fp32")
    f32 = validate(loaded=load_exported_model(fp32_file), data=str(data), workers=0, progress=False)
    i8 = validate(loaded=load_exported_model(int8_file), data=str(data), workers=0, progress=False)
    assert f32["top1"] == ref["top1"] and f32["count"] == ref["count"] == 48
    assert abs(f32["loss"] - ref["loss"]) < 1e-4
    assert i8["precision"] == "int8" and abs(i8["top1"] - ref["top1"]) <= 100 * (1 - MIN_AGREEMENT)
    assert "(onnxruntime, int8)" in i8["weights"]
    assert main(["validate", "--exported", str(int8_file), "--data", str(data), "--workers", "0"]) == 0
    out = capsys.readouterr().out
    assert "precision int8" in out and f"top-1 {i8['top1']:.2f}%" in out
    with pytest.raises(Exception, match="not both"):
        validate(checkpoint=str(ckpt), loaded=load_exported_model(int8_file))
    assert main(["validate", "--exported", str(int8_file), "--checkpoint", str(ckpt)]) == 2
    report = tmp_path / "pred.json"
    assert main(["predict", str(data / "val" / "red"), "--exported", str(int8_file), "--output", str(report)]) == 0
    preds = json.loads(report.read_text())["predictions"]
    assert len(preds) == 12 and sum(p["topk"][0]["label"] == "red" for p in preds) >= 11


# ----------------------------------------------------------------------------------------------------------- bf16
def test_bf16_export_serves_and_validates(trained, data, tmp_path, monkeypatch):
    ckpt, model = trained
    fused = fuse(model, primitive="conv")
    meta = {"class_names": CLASSES, **{k: v for k, v in PRE.items() if k != "input_size"}}
    report = export_bf16(fused, tmp_path / "t_bf16.pt", image_size=SIZE, metadata=meta, reference=model,
                         calibration=data, batches=2, calibration_batch_size=8)  # fmt: skip
    assert any("bf16 (autocast) vs fp32" in n for n in report.notes)
    xv, _ = _load_split(data, "val")
    with torch.inference_mode():
        ref = model(xv).numpy()
    clf = TorchScriptClassifier(report.path, precision="bf16")
    low = clf(xv)
    assert low.dtype == np.float32 and clf.metadata["precision"] == "bf16"
    rel = float(np.abs(low - ref).max() / np.abs(ref).max())
    assert 0 < rel <= BF16_REL_DIFF, rel  # bf16 really ran, and stayed close
    assert (low.argmax(1) == ref.argmax(1)).mean() >= MIN_AGREEMENT
    np.testing.assert_allclose(TorchScriptClassifier(report.path, precision="fp32")(xv), ref, atol=1e-4)
    # a CPU without bf16 instructions: the file runs in fp32, with a message
    monkeypatch.setenv("INCEPTIONNEXT_CPU_FLAGS", "sse2 avx2 avx512f")
    with pytest.warns(UserWarning, match="running it in fp32"):
        fallback = TorchScriptClassifier(report.path)
    assert fallback.precision == "fp32"
    np.testing.assert_allclose(fallback(xv), ref, atol=1e-4)
    monkeypatch.delenv("INCEPTIONNEXT_CPU_FLAGS")
    res = validate(loaded=load_exported_model(report.path), data=str(data), workers=0, progress=False)
    assert res["precision"] == "bf16" and res["top1"] >= 90


def test_cli_export_precisions_and_errors(trained, data, tmp_path, capsys):
    ckpt, _ = trained
    out = tmp_path / "out"
    assert main(["export", "--checkpoint", str(ckpt), "--precision", "bf16", "--output", str(out)]) == 0
    assert (out / "inceptionnext_atto_bf16.pt").is_file()
    assert TorchScriptClassifier(out / "inceptionnext_atto_bf16.pt").metadata["precision"] == "bf16"
    capsys.readouterr()
    cases = [
        (["--precision", "int8"], "needs --calibration"),
        (["--precision", "bf16", "--format", "onnx"], "no bf16 kernels"),
        (["--precision", "int8", "--format", "torchscript", "--calibration", "digits"], "int8 files are ONNX"),
        (["--calibration", str(data)], "goes with --precision int8"),
        (["--precision", "int8", "--calibration", str(tmp_path / "nowhere")], "calibration data not found"),
    ]
    for extra, message in cases:
        assert main(["export", "--checkpoint", str(ckpt), "--output", str(out), *extra]) == 2, extra
        assert message in capsys.readouterr().err, extra
