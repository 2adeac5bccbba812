"""Reduced-precision CPU deployment: int8 ONNX files (onnxruntime static QDQ quantization, calibrated on the user's
images) and bf16 TorchScript files (run under ``torch.autocast``), with their accuracy cost measured against fp32.

>>> from inceptionnext.quantize import quantize_onnx
>>> report = quantize_onnx("model.onnx", "model.int8.onnx", calibration="data/imagenet")  # fp32 file in, int8 out
>>> OnnxClassifier("model.int8.onnx")(images)  # served like any other export; predict/validate --exported too

**int8.** Weights are quantized per output channel (int8, symmetric), activations per tensor (uint8, asymmetric),
in the QDQ format (``QuantizeLinear``/``DequantizeLinear`` pairs around the quantized ops, which onnxruntime fuses
into integer kernels; on a CPU with AVX-512 VNNI/AVX-VNNI/AMX those are ``vpdpbusd`` GEMMs). The activation ranges
come from a few batches of the user's images through the model's own eval preprocessing (the metadata stored in
the file). The defaults were chosen by measured top-1 (docs/export.md, "int8: what was measured"): MinMax
calibration, and the stem and the classifier head kept in fp32.

**bf16.** onnxruntime 1.32's CPU provider has no bf16 kernels (MatMul, Gemm and Add fail with NOT_IMPLEMENTED, and
ONNX ``Conv`` does not admit bf16 at all), so the bf16 path is torch: the fused model traced to TorchScript with fp32
weights, run under ``torch.autocast("cpu", torch.bfloat16)`` in channels-last by :mod:`inceptionnext.serve`. The
file records ``precision: bf16``; a server without native bf16 instructions runs it in fp32 and says so.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import random
import tempfile
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .data import DataError, DigitsDataset, ImageError, ImageFolderDataset
from .errors import ConfigError, UserError
from .export import ExportError, ExportReport, export_torchscript
from .inference import eval_transform, find_images, read_image
from .models.pretrained import resolve_data_config
from .serve import PRECISION_KEY, OnnxClassifier, TorchScriptClassifier, cpu_supports, read_onnx_metadata

__all__ = [
    "CALIBRATION_METHODS",
    "DEFAULT_FP32_OPS",
    "DEFAULT_METHOD",
    "FP32_OP_GROUPS",
    "AlreadyQuantizedError",
    "CalibrationError",
    "CalibrationReader",
    "QuantizationError",
    "QuantizeReport",
    "calibration_batches",
    "check_calibration_source",
    "export_bf16",
    "fp32_nodes",
    "is_quantized",
    "quantize_onnx",
]

CALIBRATION_METHODS = ("minmax", "entropy", "percentile")
DEFAULT_METHOD = "minmax"  # best or tied-best top-1 on both trained models (docs/export.md)
#: node groups that can be kept in fp32; see :func:`fp32_nodes`
FP32_OP_GROUPS = ("none", "stem", "head", "dwconv", "add")
DEFAULT_FP32_OPS = ("stem", "head")  # docs/export.md: the fewest groups in fp32 that kept every model within 0.5
_QUANT_OPS = {"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "QLinearConv", "QLinearMatMul",
              "ConvInteger", "MatMulInteger", "QLinearAdd", "QGemm"}  # fmt: skip


class QuantizationError(UserError, ValueError):
    """Bad input for quantization (the file, the data, the settings). A quantized file that fails its check raises
    :class:`~inceptionnext.export.ExportError`, as any export that fails its check."""


class CalibrationError(QuantizationError):
    """Calibration data that does not exist, is empty, or does not fit the model's input."""


class AlreadyQuantizedError(QuantizationError):
    """The input file is already quantized (or bf16): quantize the fp32 export instead."""


# ----------------------------------------------------------------------------------------------- calibration data
def _input_chw(meta: Mapping[str, Any], input_shape: Sequence[int | None]) -> tuple[int, int, int]:
    size = meta.get("input_size")
    if size:
        return tuple(int(s) for s in size)  # type: ignore[return-value]
    if len(input_shape) == 4 and None not in input_shape[1:]:
        return tuple(int(s) for s in input_shape[1:])  # type: ignore[return-value]
    raise CalibrationError("the model's input size is unknown (no input_size metadata, dynamic H/W in the graph)")


def _image_source(data: str | os.PathLike) -> tuple[Any, str]:
    """``(image files, description)`` of a folder given as calibration data (checked by
    :func:`check_calibration_source`)."""
    root = Path(data)
    for split in ("train", "val"):  # an ImageFolder root: the training images, else the validation ones
        if (root / split).is_dir():
            return _folder(root / split), f"{root / split}"
    if any(d.is_dir() and not d.name.startswith(".") for d in root.iterdir()):
        return _folder(root), str(root)  # root/<class>/<image>
    images, _ = find_images([root])  # loose images
    if not images:
        raise CalibrationError(f"{root} holds no images (and no train/, val/ or class folders)")
    return list(images), str(root)


def check_calibration_source(data: str | os.PathLike) -> None:
    """Fail early (before an export that takes seconds) when the calibration data does not exist."""
    if str(data) == "digits":
        return
    path = Path(data)
    if not path.exists():
        raise CalibrationError(f"calibration data not found: {path} (an ImageFolder root, a folder of images, "
                               "a .npy array of preprocessed (N, C, H, W) images, or 'digits')")  # fmt: skip
    if path.is_file() and path.suffix.lower() != ".npy":
        raise CalibrationError(f"{path}: calibration data must be a folder of images, a .npy file or 'digits'")


def _folder(root: Path) -> Any:
    try:
        ds = ImageFolderDataset(root, unreadable="skip")
    except DataError as e:
        raise CalibrationError(f"calibration data: {e}") from e
    return [p for p, _ in ds.samples]


def calibration_batches(
    data: str | os.PathLike,
    preprocessing: Mapping[str, Any],
    *,
    batches: int = 8,
    batch_size: int = 16,
    seed: int = 0,
) -> tuple[list[np.ndarray], str]:
    """``batches`` batches of ``batch_size`` preprocessed images (float32, (B, C, H, W)) for calibration, and a
    description of where they came from.

    ``data``: ``"digits"`` (the embedded set's training split), an ImageFolder root (its ``train/``, else its
    ``val/``), a folder of class folders, a folder of images, or a ``.npy`` file of already preprocessed images
    (N, C, H, W). Images are drawn at random (``seed``) across the whole set, so that every class is seen, and go
    through the model's eval transform (``preprocessing``, as stored in the exported file). Unreadable images are
    left out. Raises :class:`CalibrationError` when the data is missing, empty, or its tensors do not have the
    model's input shape (``preprocessing["input_size"]``).
    """
    if batches < 1 or batch_size < 1:
        raise ConfigError(f"calibration batches and batch size must be >= 1, got {batches} and {batch_size}")
    pre = resolve_data_config(preprocessing)
    chw = tuple(int(s) for s in pre["input_size"])
    want = batches * batch_size
    check_calibration_source(data)
    path = Path(data)
    if path.suffix.lower() == ".npy":
        arr = np.load(path, mmap_mode="r")
        if arr.ndim != 4 or tuple(arr.shape[1:]) != chw:
            raise CalibrationError(
                f"{path} holds an array of shape {tuple(arr.shape)}; the model takes (N, {', '.join(map(str, chw))})"
            )
        if len(arr) == 0:
            raise CalibrationError(f"{path} holds no images")
        arr = np.asarray(arr[:want], dtype=np.float32)
        return [arr[i : i + batch_size] for i in range(0, len(arr), batch_size)], str(path)
    items: Sequence[Any]
    if str(data) == "digits":  # upscaled to the model's input size, as validate and training read them
        digits = DigitsDataset("train", size=chw[-1])
        items, where = [partial(digits.load, i) for i in range(len(digits))], "digits (embedded, train split)"
    else:
        items, where = _image_source(data)
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    transform = eval_transform(pre)
    out: list[torch.Tensor] = []
    bad: list[str] = []
    for i in order:
        if len(out) == want:
            break
        item = items[i]
        try:
            img = read_image(item) if isinstance(item, (str, Path)) else item()  # a file, or an embedded image
        except ImageError as e:
            bad.append(f"{item}: {e}")
            continue
        x = transform(img)
        if tuple(x.shape) != chw:
            raise CalibrationError(
                f"calibration images preprocess to {tuple(x.shape)}, the model takes {chw} "
                f"(e.g. {item if isinstance(item, (str, Path)) else where})"
            )
        out.append(x)
    if not out:
        raise CalibrationError(
            f"none of the calibration images in {where} is readable" + (f" ({bad[0]})" if bad else "")
        )
    if bad:
        warnings.warn(f"{len(bad)} unreadable calibration image(s) left out, e.g. {bad[0]}", stacklevel=2)
    stacked = torch.stack(out).numpy()
    return [stacked[i : i + batch_size] for i in range(0, len(stacked), batch_size)], where


class CalibrationReader:
    """onnxruntime's ``CalibrationDataReader`` protocol over a list of batches: ``get_next()`` gives
    ``{input_name: batch}`` until the batches run out, then ``None``; ``rewind()`` starts over (the entropy and
    percentile calibrators read the data twice)."""

    def __init__(self, batches: Sequence[np.ndarray], input_name: str) -> None:
        if not batches:
            raise CalibrationError("no calibration batches")
        self.batches = [np.ascontiguousarray(b, dtype=np.float32) for b in batches]
        self.input_name = input_name
        self._next = 0

    def __len__(self) -> int:
        return len(self.batches)

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._next >= len(self.batches):
            return None
        self._next += 1
        return {self.input_name: self.batches[self._next - 1]}

    def rewind(self) -> None:
        self._next = 0

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return iter({self.input_name: b} for b in self.batches)


# ------------------------------------------------------------------------------------------------------- int8
def is_quantized(path: str | os.PathLike) -> str | None:
    """Why ``path`` is not an fp32 ONNX file (its precision metadata, or the quantization ops it contains), else
    None."""
    import onnx

    meta = read_onnx_metadata(path)
    if meta.get(PRECISION_KEY, "fp32") != "fp32":
        return f"its metadata says precision {meta[PRECISION_KEY]}"
    proto = onnx.load(str(path), load_external_data=False)
    ops = sorted({n.op_type for n in proto.graph.node if n.op_type in _QUANT_OPS})
    if ops:
        return f"it contains {', '.join(ops)} nodes"
    low = {t.data_type for t in proto.graph.initializer} & {onnx.TensorProto.BFLOAT16, onnx.TensorProto.FLOAT16}
    if low:
        return "it holds 16-bit float weights"
    return None


def fp32_nodes(model: Any, groups: Sequence[str]) -> dict[str, list[str]]:
    """Names of the nodes of an ONNX graph (a ``ModelProto``) that each group in ``groups`` keeps in fp32.

    * ``stem``: the convolution(s) reading the graph input (the first layer sees raw normalised pixels);
    * ``head``: every node after the global average pool (the classifier MLP and its norm: few FLOPs, and its
      outputs are the logits themselves);
    * ``dwconv``: the grouped (depthwise) convolutions, i.e. the Inception token mixer's branches;
    * ``add``: elementwise additions (the residual connections);
    * ``none``: nothing.
    """
    unknown = sorted(set(groups) - set(FP32_OP_GROUPS))
    if unknown:
        raise ConfigError(f"unknown fp32 op group(s) {', '.join(unknown)}; choose from {', '.join(FP32_OP_GROUPS)}")
    graph = model.graph
    inputs = {i.name for i in graph.input}
    out: dict[str, list[str]] = {}
    for g in groups:
        if g == "none":
            continue
        if g == "stem":
            names = [n.name for n in graph.node if n.op_type == "Conv" and n.input[0] in inputs]
        elif g == "dwconv":
            names = [
                n.name for n in graph.node
                if n.op_type == "Conv" and any(a.name == "group" and a.i > 1 for a in n.attribute)
            ]  # fmt: skip
        elif g == "add":
            names = [n.name for n in graph.node if n.op_type == "Add"]
        else:  # head: everything downstream of the last global pooling
            pools = [i for i, n in enumerate(graph.node)
                     if n.op_type in ("GlobalAveragePool", "ReduceMean", "AdaptiveAvgPool2d")]  # fmt: skip
            names = [n.name for n in graph.node[pools[-1] :]] if pools else []
        out[g] = names
    return out


@dataclass
class QuantizeReport:
    """What :func:`quantize_onnx` wrote and how well it agrees with the fp32 file on the calibration images."""

    path: Path
    source: Path
    size_bytes: int
    method: str
    fp32_ops: tuple[str, ...]
    excluded_nodes: int
    calibration: str
    calibration_images: int
    reduce_range: bool
    agreement: float | None = None  # fraction of the checked images with the same top-1 class as the fp32 file
    checked_images: int = 0  # the calibration images, or check_data
    max_abs_diff: float | None = None  # of the logits, over the same images
    logit_scale: float | None = None  # max |logit| of the fp32 file over those images
    seconds: float = 0.0
    metadata: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        size = f"{self.size_bytes / 2**20:.1f} MiB"
        kept = ", ".join(self.fp32_ops) or "none"
        parity = "parity not checked"
        if self.agreement is not None:
            parity = (
                f"top-1 agrees with fp32 on {100 * self.agreement:.1f}% of {self.checked_images} checked "
                f"images, max |diff| {self.max_abs_diff:.3g} (logits up to {self.logit_scale:.3g})"
            )
        return (
            f"int8 onnx   {self.path}  {size}  QDQ, {self.method} calibration on {self.calibration_images} images of "
            f"{self.calibration}, per-channel int8 weights, uint8 activations, fp32 kept: {kept}; {parity} "
            f"[{self.seconds:.1f}s]"
        )


def _quant_pre_process(src: Path, dst: Path) -> bool:
    """onnxruntime's recommended pre-processing (symbolic shape inference + graph optimisation), if it works."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            quant_pre_process(str(src), str(dst), skip_symbolic_shape=False)
        return True
    except Exception:  # noqa: BLE001 - pre-processing is an optimisation; quantizing the plain file still works
        return False


def quantize_onnx(
    source: str | os.PathLike,
    path: str | os.PathLike,
    calibration: str | os.PathLike | Sequence[np.ndarray],
    *,
    method: str = DEFAULT_METHOD,
    fp32_ops: Sequence[str] = DEFAULT_FP32_OPS,
    batches: int = 8,
    batch_size: int = 16,
    per_channel: bool = True,
    reduce_range: bool | None = None,
    check: bool = True,
    min_agreement: float = 0.9,
    check_data: Sequence[np.ndarray] | None = None,
    seed: int = 0,
) -> QuantizeReport:
    """Quantize an fp32 ONNX classifier (as written by :func:`inceptionnext.export.export_onnx`) to int8, QDQ.

    Args:
        source: the fp32 ``.onnx`` file; its metadata (preprocessing, classes) is copied, plus ``precision: int8``
            and the calibration settings.
        path: the int8 file to write.
        calibration: images for the activation ranges: see :func:`calibration_batches`, or a list of preprocessed
            batches.
        method: ``"minmax"``, ``"entropy"`` or ``"percentile"`` (99.999th percentile).
        fp32_ops: node groups left in fp32, see :func:`fp32_nodes`.
        batches, batch_size, seed: how many calibration images, drawn at random with ``seed``.
        reduce_range: 7-bit weights. Default: only on an x86 CPU without VNNI, where onnxruntime's u8s8 kernels can
            saturate (the message says so).
        check: run the int8 and fp32 files on the calibration images; raise :class:`ExportError` if their top-1
            classes agree on fewer than ``min_agreement`` of them (randomly initialised weights give near-tied logits
            and disagree more: pass 0 there). ``check_data``: other preprocessed batches to check on (a calibration set
            that misses what real images look like agrees with fp32 on itself, not on them).
    """
    from .serve import _require_onnx

    _require_onnx("onnx", "onnxruntime")

    if method not in CALIBRATION_METHODS:
        raise ConfigError(f"calibration method must be one of {', '.join(CALIBRATION_METHODS)}, got {method!r}")
    source, path = Path(source), Path(path)
    if source.resolve() == path.resolve():
        raise ConfigError(f"the int8 file must not overwrite its fp32 source {source}")
    start = time.perf_counter()
    fp32 = OnnxClassifier(source)
    why = is_quantized(source)
    if why:
        raise AlreadyQuantizedError(f"{source} is already quantized ({why}); quantize the fp32 export instead")
    notes: list[str] = []
    if reduce_range is None:
        ok, reason = cpu_supports("int8")
        reduce_range = not ok and reason.startswith("x86")
        if reduce_range:
            notes.append(f"{reason}: quantizing with 7-bit weights (reduce_range) to avoid saturation in "
                         "onnxruntime's u8s8 kernels; int8 runs, but without its speed-up, on this CPU")  # fmt: skip
        elif not ok:
            notes.append(f"{reason}: int8 may run without its speed-up on this CPU")
        if not ok:
            warnings.warn(notes[-1], stacklevel=2)
    pre = fp32.preprocessing
    if isinstance(calibration, (str, os.PathLike)):
        if "input_size" not in pre:
            raise CalibrationError(f"{source}: no input size in its metadata or graph; re-export it")
        calib, where = calibration_batches(calibration, pre, batches=batches, batch_size=batch_size, seed=seed)
    else:
        calib, where = list(calibration), "given batches"
        chw = _input_chw(fp32.metadata, fp32.input_shape)
        for b in calib:
            if np.ndim(b) != 4 or tuple(np.shape(b)[1:]) != chw:
                raise CalibrationError(f"a calibration batch has shape {np.shape(b)}; the model takes (B, {chw})")
    n_images = sum(len(b) for b in calib)
    path.parent.mkdir(parents=True, exist_ok=True)
    # written and checked under another name, then moved into place: a file already at ``path`` stays until the new
    # one has passed its check, and a kill midway leaves no half-written or unchecked file under the user's name
    staged = path.with_name(f".{path.name}.partial")
    try:
        report = _quantize_staged(
            source, staged, fp32, calib, where, n_images, notes, method=method, fp32_ops=fp32_ops,
            per_channel=per_channel, reduce_range=bool(reduce_range), check=check, min_agreement=min_agreement,
            check_data=check_data, target=path,
        )  # fmt: skip
    except BaseException:
        staged.unlink(missing_ok=True)
        raise
    os.replace(staged, path)
    report.seconds = time.perf_counter() - start
    return report


def _quantize_staged(
    source: Path, staged: Path, fp32: OnnxClassifier, calib: list[np.ndarray], where: str, n_images: int,
    notes: list[str], *, method: str, fp32_ops: Sequence[str], per_channel: bool, reduce_range: bool, check: bool,
    min_agreement: float, check_data: Sequence[np.ndarray] | None, target: Path,
) -> QuantizeReport:  # fmt: skip
    """:func:`quantize_onnx`'s work on the staged file; the report names ``target``, where it will be moved."""
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    with tempfile.TemporaryDirectory(prefix="inceptionnext-quant-") as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        if not _quant_pre_process(source, prepared):
            prepared = source
            notes.append("onnxruntime's quant_pre_process failed; quantized the file as exported")
        graph = onnx.load(str(prepared))
        excluded = fp32_nodes(graph, fp32_ops)
        exclude = sorted({n for names in excluded.values() for n in names})
        del graph
        methods = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
                   "percentile": CalibrationMethod.Percentile}  # fmt: skip
        extra = {"CalibMovingAverage": False}
        if method == "percentile":
            extra["CalibPercentile"] = 99.999
        reader = CalibrationReader(calib, fp32.input_name)
        cache = None
        try:
            with warnings.catch_warnings(), _quiet_ort_logging():
                warnings.simplefilter("ignore")
                if method == "entropy":
                    cache = _entropy_ranges(prepared, reader, Path(tmp))
                quantize_static(
                    str(prepared), str(staged), reader,
                    quant_format=QuantFormat.QDQ, per_channel=per_channel, reduce_range=reduce_range,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, nodes_to_exclude=exclude,
                    calibrate_method=methods[method], extra_options=extra,
                    calibration_providers=["CPUExecutionProvider"], calibration_cache_path=cache,
                )  # fmt: skip
        except Exception as e:
            raise ExportError(f"onnxruntime could not quantize {source}: {type(e).__name__}: {e}") from e
    meta = dict(fp32.metadata)
    meta.update({
        PRECISION_KEY: "int8", "quantization": "onnxruntime static QDQ, per-channel int8 weights, uint8 activations",
        "calibration_method": method, "calibration_data": where, "calibration_images": n_images,
        "fp32_ops": list(fp32_ops), "reduce_range": bool(reduce_range), "source_file": source.name,
    })  # fmt: skip
    proto = onnx.load(str(staged))
    del proto.metadata_props[:]
    for k, v in meta.items():
        proto.metadata_props.add(key=k, value=json.dumps(v))
    onnx.save(proto, str(staged))
    del proto
    report = QuantizeReport(target, source, staged.stat().st_size, method, tuple(fp32_ops), len(exclude), where,
                            n_images, reduce_range, metadata=meta, notes=notes)  # fmt: skip
    if check:
        checked = list(check_data) if check_data is not None else calib
        report.agreement, report.max_abs_diff, report.logit_scale = _agreement(OnnxClassifier(staged), fp32, checked)
        report.checked_images = sum(len(b) for b in checked)
        if not np.isfinite(report.max_abs_diff):
            raise ExportError(f"the int8 file gives non-finite logits ({target} not written)")
        if report.agreement < min_agreement:
            which = "calibration" if check_data is None else "check"
            raise ExportError(
                f"the int8 file's top-1 agrees with the fp32 file on only {100 * report.agreement:.1f}% of the "
                f"{report.checked_images} {which} images (< {100 * min_agreement:.0f}%); {target} not written. "
                "Try another --calibration-method or more --calibration-batches, keep more ops in fp32 "
                "(--fp32-ops), or pass --min-agreement 0 to keep it (randomly initialised weights have "
                "near-tied logits)"
            )
    return report


def _entropy_ranges(model: Path, reader: CalibrationReader, tmp: Path) -> Path:
    """KL-divergence (entropy) ranges over 2048-bin histograms, written as a calibration cache for quantize_static.

    ``quantize_static(calibrate_method=Entropy)`` cannot pass the histogram size, and with onnxruntime's defaults
    (128 bins, 128 quantized bins) the threshold search has a single candidate, the full range: measured here, its
    scales equal MinMax's to the last bit. TensorRT's entropy calibration, which the method comes from, uses 2048 bins.
    """
    from onnxruntime.quantization import CalibrationMethod
    from onnxruntime.quantization.calibrate import create_calibrator, save_tensors_data

    calibrator = create_calibrator(
        model, None, augmented_model_path=str(tmp / "augmented.onnx"), calibrate_method=CalibrationMethod.Entropy,
        providers=["CPUExecutionProvider"], extra_options={"num_bins": 2048, "num_quantized_bins": 128},
    )  # fmt: skip
    calibrator.collect_data(reader)
    reader.rewind()
    cache = tmp / "entropy_ranges.json"
    save_tensors_data(calibrator.compute_data(), cache)
    return cache


@contextlib.contextmanager
def _quiet_ort_logging() -> Iterator[None]:
    """onnxruntime's calibrator logs a warning per tensor at the default severity, and the histogram calibrators
    print their progress to stdout."""
    import io
    import logging

    import onnxruntime as ort

    def drop_ort(record: logging.LogRecord) -> bool:  # e.g. "Axis 1 is out-of-range for weight ...": per-tensor then
        return "onnxruntime" not in record.pathname

    root = logging.getLogger()
    root.addFilter(drop_ort)
    ort.set_default_logger_severity(3)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        ort.set_default_logger_severity(2)
        root.removeFilter(drop_ort)


def _agreement(low: Any, ref: Any, batches: Sequence[np.ndarray]) -> tuple[float, float, float]:
    """(top-1 agreement, max |logit diff|, max |reference logit|) of two classifiers on the batches."""
    same = total = 0
    worst = scale = 0.0
    for b in batches:
        a, r = np.asarray(low(b), dtype=np.float64), np.asarray(ref(b), dtype=np.float64)
        same += int((a.argmax(1) == r.argmax(1)).sum())
        total += len(b)
        worst = max(worst, float(np.abs(a - r).max()))
        scale = max(scale, float(np.abs(r).max()))
    return same / max(total, 1), worst, scale


# ------------------------------------------------------------------------------------------------------- bf16
def export_bf16(
    model: torch.nn.Module,
    path: str | os.PathLike,
    *,
    calibration: str | os.PathLike | None = None,
    batches: int = 2,
    calibration_batch_size: int = 16,
    min_agreement: float = 0.9,
    image_size: int | Sequence[int] | None = None,
    batch_size: int = 2,
    check: bool = True,
    atol: float = 1e-4,
    metadata: Mapping[str, Any] | None = None,
    reference: torch.nn.Module | None = None,
) -> ExportReport:
    """A TorchScript file (:func:`~inceptionnext.export.export_torchscript`, fp32 weights) whose metadata says
    ``precision: bf16``: :class:`~inceptionnext.serve.TorchScriptClassifier` runs it under
    ``torch.autocast("cpu", torch.bfloat16)`` on channels-last input, or in fp32 on a CPU without bf16 instructions.

    The traced graph is checked against ``reference`` in fp32 (``atol``), as any TorchScript export; then the bf16
    run is compared with fp32 on ``calibration`` images when given (:func:`calibration_batches`; raises
    :class:`~inceptionnext.export.ExportError` when top-1 agrees on fewer than ``min_agreement``), else on random
    inputs (reported only).
    """
    meta = {**(metadata or {}), PRECISION_KEY: "bf16", "runtime": "torch.autocast(cpu, bfloat16), channels_last"}
    # traced from a channels-last copy: the weights are stored in the layout the served input has
    traced = copy.deepcopy(model).to(memory_format=torch.channels_last)
    report = export_torchscript(
        traced, path, image_size=image_size, batch_size=batch_size, check=check, atol=atol, metadata=meta,
        reference=reference,
    )  # fmt: skip
    report.format = "torchscript"
    ok, reason = cpu_supports("bf16")
    if not ok:
        report.notes.append(f"{reason}: the file runs in bf16 on a CPU that has them, and in fp32 here")
        warnings.warn(report.notes[-1], stacklevel=2)
    if not check:
        return report
    ref = reference if reference is not None else model
    low = TorchScriptClassifier(report.path, precision="bf16")
    chw = tuple(report.metadata["input_size"])
    if calibration is not None:
        data, where = calibration_batches(
            calibration, {**report.metadata, "input_size": chw}, batches=batches, batch_size=calibration_batch_size
        )
    else:
        g = torch.Generator().manual_seed(0)
        data, where = [torch.randn((4, *chw), generator=g).numpy()], "random inputs"
    was_training = ref.training
    ref.eval()
    try:
        with torch.inference_mode():
            agree, worst, scale = _agreement(low, lambda b: ref(torch.from_numpy(b)).float().numpy(), data)
    finally:
        ref.train(was_training)
    n = sum(len(b) for b in data)
    if not np.isfinite(worst):
        report.path.unlink(missing_ok=True)
        raise ExportError(f"the bf16 run gives non-finite logits ({report.path} removed)")
    report.notes.append(
        f"bf16 (autocast) vs fp32 on {n} images of {where}: max |diff| {worst:.3g} (logits up to {scale:.3g})"
        + (f", top-1 agrees on {100 * agree:.1f}%" if calibration is not None else "")
    )
    if calibration is not None and agree < min_agreement:
        report.path.unlink(missing_ok=True)
        raise ExportError(
            f"the bf16 run's top-1 agrees with fp32 on only {100 * agree:.1f}% of {n} images of {where} "
            f"(< {100 * min_agreement:.0f}%; {report.path} removed; --min-agreement 0 keeps it)"
        )
    return report
