"""Export classifiers to ONNX and TorchScript, check the files against the eager model, and store serving metadata.

>>> from inceptionnext.export import export_onnx
>>> report = export_onnx(model, "model.onnx")  # raises ExportError if onnxruntime disagrees with torch
>>> from inceptionnext.serve import OnnxClassifier  # serving the file is the job of inceptionnext.serve
>>> logits = OnnxClassifier("model.onnx")(images)  # (B, 3, H, W) float32 -> (B, num_classes)

**Exporter choice (torch 2.14).** :func:`export_onnx` uses the ``torch.export``-based exporter
(``torch.onnx.export(..., dynamo=True)`` with a strict ``Dim("batch")`` in ``dynamic_shapes``) by default:

* it is torch's default and the maintained path since 2.9; the TorchScript-based exporter (``dynamo=False``) emits a
  ``DeprecationWarning`` saying it will be removed;
* its graphs are about half the size in nodes (InceptionNeXt-T: 210 vs 528; ConvNeXt-T: 230 vs 454) because it
  emits opset-20 ``Gelu``/``LayerNormalization`` instead of decomposed arithmetic, and onnxscript's optimizer folds
  constants; onnxruntime latency and parity (~2e-6 max abs on random-init logits) were the same for both on
  InceptionNeXt-T, timm's ``inception_next_tiny``, ``convnext_tiny`` and ``resnet50``;
* a strict ``Dim`` fails loudly if the model specialises the batch size, instead of silently exporting a static one.

It is slower to export (5-9 s vs 3-4 s for a tiny model) and cannot target opsets below 18. So ``exporter="auto"``
takes the TorchScript-based exporter (``dynamic_axes``) when ``opset < 18`` is requested, and falls back to it, with a
warning, if the dynamo export fails. Either way the file is verified the same way: ``onnx.checker`` and an
onnxruntime run on batch sizes other than the exported one (which proves the batch dimension is dynamic).
timm's own ``timm.utils.onnx_export`` defaults to the TorchScript-based exporter (``use_dynamo=False``).

The preprocessing needed to serve the file (input size, mean, std, crop_pct, interpolation, class names, model
name) is stored as JSON strings in the ONNX ``metadata_props`` (:func:`read_onnx_metadata`) and, for TorchScript, in
the ``inceptionnext.json`` extra file of the archive (:func:`inceptionnext.serve.read_torchscript_metadata`).
``OnnxClassifier``, ``load_onnx_model``, ``read_onnx_metadata``, ``read_torchscript_metadata``, ``OnnxModule`` and
``physical_cores`` moved to :mod:`inceptionnext.serve`; importing them from here still works for one release, with a
``DeprecationWarning``.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .errors import ConfigError, UserError
from .models.pretrained import PREPROCESSING_KEYS
from .serve import TORCHSCRIPT_META, MissingDependencyError, _ignore_jit_deprecation, _require_onnx
from .serve import OnnxClassifier as _OnnxClassifier
from .version import __version__

__all__ = ["ExportError", "ExportReport", "MissingDependencyError", "export_onnx", "export_torchscript"]

INPUT_NAME = "images"
OUTPUT_NAME = "logits"
MIN_DYNAMO_OPSET = 18  # the dynamo exporter has no translations below this and silently keeps 18
_LARGE = 2**31 - 2**27  # weights above this go to an external-data sidecar (protobuf's 2 GB limit, with headroom)
_EXPORTERS = ("auto", "dynamo", "torchscript")
# the names inceptionnext.serve took over, still importable from here (with a DeprecationWarning) for one release
_MOVED_TO_SERVE = (
    "OnnxClassifier", "OnnxModule", "load_onnx_model", "physical_cores", "read_onnx_metadata",
    "read_torchscript_metadata",
)  # fmt: skip


def __getattr__(name: str) -> Any:
    if name in _MOVED_TO_SERVE:
        warnings.warn(
            f"inceptionnext.export.{name} moved to inceptionnext.serve.{name}; the old import path will be removed "
            "in the next release",
            DeprecationWarning,
            stacklevel=2,
        )
        from . import serve

        return getattr(serve, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class ExportError(UserError, RuntimeError):
    """The model cannot be exported, or the exported file disagrees with the eager model."""


@dataclass
class ExportReport:
    """What :func:`export_onnx` / :func:`export_torchscript` wrote and how well the file matches the eager model."""

    format: str  # "onnx" or "torchscript"
    path: Path
    size_bytes: int
    exporter: str  # "dynamo", "torchscript" (legacy ONNX exporter) or "jit.trace"
    input_shape: tuple[int, ...]  # of the example batch (B, C, H, W)
    dynamic_batch: bool
    opset: int | None = None
    external_data: bool = False
    checked_batch_sizes: tuple[int, ...] = ()
    max_abs_diff: float | None = None  # None when the parity check was skipped
    atol: float | None = None
    seconds: float = 0.0
    metadata: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        size = f"{self.size_bytes / 2**20:.1f} MiB" + (" + external data" if self.external_data else "")
        how = f"{self.exporter} exporter" + (f", opset {self.opset}" if self.opset is not None else "")
        batch = "dynamic batch" if self.dynamic_batch else f"static batch {self.input_shape[0]}"
        hw = "x".join(map(str, self.input_shape[2:]))
        if self.max_abs_diff is None:
            parity = "parity not checked"
        else:
            sizes = ", ".join(map(str, self.checked_batch_sizes))
            parity = f"parity vs eager torch: max |diff| {self.max_abs_diff:.2e} on batch {sizes} (atol {self.atol:g})"
        return f"{self.format:11s} {self.path}  {size}  {how}, {batch}, {hw} px; {parity} [{self.seconds:.1f}s]"


# ------------------------------------------------------------------------------------------------ model helpers
@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Eval mode for the duration; every submodule gets its own training flag back afterwards."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, training in flags:
            m.training = training


def _feature_net_types() -> tuple[type, ...]:
    from timm.models import _features as tf

    names = ("FeatureListNet", "FeatureDictNet", "FeatureHookNet", "FeatureGetterNet")
    return tuple(getattr(tf, n) for n in names if hasattr(tf, n))


def _check_classifier(model: nn.Module) -> None:
    if not isinstance(model, nn.Module):
        raise ExportError(f"expected a torch.nn.Module, got {type(model).__name__}")
    if getattr(model, "features_only", False) or isinstance(model, _feature_net_types()):
        raise ExportError(
            f"{type(model).__name__} is a features_only backbone (it returns a list of feature maps); "
            "export supports classifiers only: build the model without features_only"
        )


def _cfg(model: nn.Module) -> dict[str, Any]:
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    return cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)


def _input_chw(model: nn.Module, image_size: int | Sequence[int] | None) -> tuple[int, int, int]:
    """(C, H, W): ``image_size`` if given, else the model's pretrained input size, else 224."""
    cfg_size = _cfg(model).get("input_size")
    chans = int(cfg_size[0]) if cfg_size else int(getattr(model, "in_chans", 3))
    if image_size is None:
        h, w = (int(cfg_size[1]), int(cfg_size[2])) if cfg_size else (224, 224)
    elif isinstance(image_size, int):
        h = w = image_size
    else:
        sizes = tuple(int(s) for s in image_size)
        if len(sizes) == 3:  # (C, H, W)
            chans, sizes = sizes[0], sizes[1:]
        if len(sizes) != 2:
            raise ConfigError(f"image_size must be an int, (H, W) or (C, H, W), got {image_size!r}")
        h, w = sizes
    if h < 1 or w < 1:
        raise ConfigError(f"image size must be positive, got {h}x{w}")
    return chans, h, w


def _model_device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _random_batch(batch: int, chw: tuple[int, int, int], seed: int, device: torch.device) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn((batch, *chw), generator=g).to(device)


@torch.inference_mode()
def _eager(model: nn.Module, x: torch.Tensor) -> np.ndarray:
    return model(x).float().cpu().numpy()


def _probe(model: nn.Module, x: torch.Tensor) -> None:
    """One eager forward: the output must be a single (B, num_classes) tensor."""
    try:
        with torch.inference_mode():
            out = model(x)
    except Exception as e:
        raise ExportError(f"the model fails on an input of shape {tuple(x.shape)}: {type(e).__name__}: {e}") from e
    if not isinstance(out, torch.Tensor):
        raise ExportError(
            f"the model returns {type(out).__name__}, not one tensor of logits; export supports classifiers only "
            "(features_only backbones and multi-output models are not supported)"
        )
    if out.ndim != 2 or out.shape[0] != x.shape[0]:
        raise ExportError(f"expected logits of shape (batch, num_classes), got {tuple(out.shape)}")


def _check_batches(batch_size: int, dynamic: bool) -> tuple[int, ...]:
    """Batch sizes for the parity check: others than the exported one when the batch is dynamic."""
    if not dynamic:
        return (batch_size,)
    return tuple(b for b in (1, batch_size + 1) if b != batch_size)


def _metadata(model: nn.Module, chw: tuple[int, int, int], extra: Mapping[str, Any] | None) -> dict[str, Any]:
    """Serving metadata: the model's pretrained cfg, overridden by ``extra``; input_size is always the exported one.

    Preprocessing keys the model's cfg leaves unset stay unset: the reader applies the same defaults.
    """
    cfg = _cfg(model)
    meta: dict[str, Any] = {"model_name": cfg.get("architecture") or type(model).__name__}
    meta.update({k: cfg[k] for k in PREPROCESSING_KEYS if k != "input_size" and cfg.get(k) is not None})
    if cfg.get("label_names"):
        meta["class_names"] = list(cfg["label_names"])
    if getattr(model, "num_classes", None) is not None:
        meta["num_classes"] = int(model.num_classes)
    meta.update({k: v for k, v in (extra or {}).items() if v is not None})
    meta["input_size"] = list(chw)
    meta["fused"] = bool(getattr(model, "fused", False))
    meta["inceptionnext_version"] = __version__
    meta["torch_version"] = torch.__version__
    return {k: list(v) if isinstance(v, tuple) else v for k, v in meta.items()}


def _max_diff(a: np.ndarray, b: np.ndarray) -> float:
    if a.shape != b.shape:
        raise ExportError(f"the exported model's output has shape {a.shape}, the eager model's {b.shape}")
    return float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64)))) if a.size else 0.0


def _verify(
    run, model: nn.Module, chw: tuple[int, int, int], batches: Sequence[int], atol: float, device, what: str
) -> float:
    worst = 0.0
    for i, b in enumerate(batches):
        x = _random_batch(b, chw, seed=1000 + i, device=device)
        try:
            got = run(x)
        except Exception as e:
            raise ExportError(f"the exported {what} fails on a batch of {b}: {type(e).__name__}: {e}") from e
        diff = _max_diff(np.asarray(got), _eager(model, x))
        if not np.isfinite(diff):
            raise ExportError(f"the exported {what} gives non-finite outputs on a batch of {b}")
        worst = max(worst, diff)
    if worst > atol:
        raise ExportError(
            f"the exported {what} disagrees with the eager model: max abs diff {worst:.3g} > atol {atol:g} "
            f"(batch sizes {', '.join(map(str, batches))}); raise atol if this precision is acceptable"
        )
    return worst


@contextlib.contextmanager
def _remove_on_failure(path: Path) -> Iterator[None]:
    """A file that fails its check is deleted, so nothing picks it up as a good export."""
    try:
        yield
    except ExportError as e:
        path.unlink(missing_ok=True)
        raise ExportError(f"{e} ({path} removed; export with check=False / --no-check to keep it)") from e


# ---------------------------------------------------------------------------------------------------------- ONNX
@contextlib.contextmanager
def _quiet_legacy() -> Iterator[None]:
    # chosen deliberately (opset < 18, or dynamo failed and we said so): no deprecation notice on every export
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message=r".*legacy TorchScript-based ONNX export", category=DeprecationWarning
        )
        warnings.filterwarnings("ignore", message=r"The feature will be removed", category=DeprecationWarning)
        _ignore_check_input_tracer_warnings()
        yield


def _ignore_check_input_tracer_warnings() -> None:
    # MetaNeXt._check_input compares the channel count and the image size to constants: tracing turns those into
    # constants, which is what we want (the batch stays dynamic, as the parity check on other batch sizes proves).
    warnings.filterwarnings(
        "ignore", message=r"Converting a tensor to a Python boolean", module=r"inceptionnext\.models\.metanext"
    )


def _export_dynamo(model, x, path: Path, opset: int | None, dynamic: bool, external: bool) -> None:
    dynamic_shapes = ({0: torch.export.Dim("batch")},) if dynamic else None
    torch.onnx.export(
        model, (x,), str(path), dynamo=True, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
        dynamic_shapes=dynamic_shapes, opset_version=opset, external_data=external, optimize=True, verbose=False,
    )  # fmt: skip


def _export_legacy(model, x, path: Path, opset: int | None, dynamic: bool) -> None:
    axes = {INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}} if dynamic else None
    with _quiet_legacy():
        torch.onnx.export(
            model, (x,), str(path), dynamo=False, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
            dynamic_axes=axes, opset_version=opset or 17, do_constant_folding=True,
        )  # fmt: skip


def export_onnx(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    image_size: int | Sequence[int] | None = None,
    batch_size: int = 2,
    opset: int | None = None,
    dynamic_batch: bool = True,
    check: bool = True,
    atol: float = 1e-4,
    exporter: str = "auto",
    metadata: Mapping[str, Any] | None = None,
    reference: nn.Module | None = None,
) -> ExportReport:
    """Export a classifier to one ``.onnx`` file (input ``images`` (B, C, H, W), output ``logits``) and verify it.

    Args:
        model: a classifier (this package's or timm's); exported in eval mode, its modes are restored afterwards.
        path: the ``.onnx`` file; weights are embedded (an external-data sidecar only for models over ~2 GB).
        image_size: H = W (int), (H, W) or (C, H, W); default: the model's pretrained input size, else 224.
            H and W are fixed in the graph; the batch dimension is dynamic unless ``dynamic_batch=False``.
        batch_size: batch of the example input (2: ``torch.export`` specialises dimensions of size 1).
        opset: ONNX opset (default: the exporter's, 20 for dynamo); below 18 the TorchScript-based exporter is used.
        check: run ``onnx.checker`` and compare onnxruntime (CPU) with eager torch on random batches of other sizes
            than ``batch_size``; raise :class:`ExportError` if the max abs difference of the logits exceeds ``atol``.
        exporter: ``"auto"`` (dynamo, TorchScript-based as fallback), ``"dynamo"`` or ``"torchscript"``.
        metadata: serving metadata to store (model_name, mean, std, crop_pct, interpolation, class_names, ...);
            defaults come from ``model.pretrained_cfg``. Values are stored JSON-encoded in ``metadata_props``.
        reference: compare the file with this model instead of ``model`` (e.g. the original of a fused copy).
    """
    _require_onnx("onnx", "onnxscript", "onnxruntime")
    import onnx

    if exporter not in _EXPORTERS:
        raise ConfigError(f"exporter must be one of {', '.join(map(repr, _EXPORTERS))}, got {exporter!r}")
    if exporter == "dynamo" and opset is not None and opset < MIN_DYNAMO_OPSET:
        raise ConfigError(f"the dynamo exporter supports opset >= {MIN_DYNAMO_OPSET}, got {opset}")
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    _check_classifier(model)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    chw = _input_chw(model, image_size)
    if dynamic_batch and batch_size == 1:
        batch_size = 2  # a size-1 dimension is specialised (made static) by torch.export
    start = time.perf_counter()
    notes: list[str] = []
    ref = model if reference is None else reference
    with _eval_mode(model), _eval_mode(ref):
        device = _model_device(model)
        x = _random_batch(batch_size, chw, seed=0, device=device)
        _probe(model, x)
        param_bytes = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
        external = param_bytes >= _LARGE
        use_legacy = exporter == "torchscript" or (
            exporter == "auto" and opset is not None and opset < MIN_DYNAMO_OPSET
        )
        used = "torchscript" if use_legacy else "dynamo"
        if not use_legacy:
            try:
                _export_dynamo(model, x, path, opset, dynamic_batch, external)
            except Exception as e:
                if exporter == "dynamo":
                    raise ExportError(f"torch.onnx.export(dynamo=True) failed: {type(e).__name__}: {e}") from e
                msg = f"dynamo ONNX export failed ({type(e).__name__}: {str(e)[:300]}); using the TorchScript exporter"
                warnings.warn(msg, stacklevel=2)
                notes.append(msg)
                used, use_legacy = "torchscript", True
        if use_legacy:
            try:
                _export_legacy(model, x, path, opset, dynamic_batch)
            except Exception as e:
                raise ExportError(f"torch.onnx.export(dynamo=False) failed: {type(e).__name__}: {e}") from e

        meta = _metadata(model, chw, metadata)
        meta["exporter"] = used
        proto = onnx.load(str(path), load_external_data=False)
        keep = [p for p in proto.metadata_props if p.key not in meta]
        del proto.metadata_props[:]
        proto.metadata_props.extend(keep)
        for k, v in meta.items():
            proto.metadata_props.add(key=k, value=json.dumps(v))
        opset_used = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
        external = any(t.data_location == onnx.TensorProto.EXTERNAL for t in proto.graph.initializer)
        onnx.save(proto, str(path))
        del proto
        if opset is not None and opset_used != opset:
            notes.append(f"opset {opset} was requested, the file has opset {opset_used}")

        report = ExportReport("onnx", path, path.stat().st_size, used, tuple(x.shape), dynamic_batch, opset_used,
                              external, metadata=meta, notes=notes)  # fmt: skip
        if check:
            with _remove_on_failure(path):
                try:
                    onnx.checker.check_model(str(path), full_check=True)
                except Exception as e:
                    raise ExportError(f"onnx.checker rejects {path}: {type(e).__name__}: {e}") from e
                runner = _OnnxClassifier(path)
                batches = _check_batches(batch_size, dynamic_batch)
                report.max_abs_diff = _verify(runner, ref, chw, batches, atol, device, f"ONNX file {path}")
                report.checked_batch_sizes, report.atol = batches, atol
    report.seconds = time.perf_counter() - start
    return report


# --------------------------------------------------------------------------------------------------- TorchScript
@contextlib.contextmanager
def _quiet_torchscript() -> Iterator[None]:
    with warnings.catch_warnings():
        _ignore_jit_deprecation()
        _ignore_check_input_tracer_warnings()
        yield


def export_torchscript(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    image_size: int | Sequence[int] | None = None,
    batch_size: int = 2,
    check: bool = True,
    atol: float = 1e-4,
    metadata: Mapping[str, Any] | None = None,
    reference: nn.Module | None = None,
) -> ExportReport:
    """Trace a classifier with ``torch.jit.trace`` and save it; reload it and check parity on other batch sizes.

    ``torch.jit.script`` does not compile these models (starred unpacking of ``torch.split`` in the mixers), so the
    model is traced; H and W are fixed by the example input, the batch size is not. The serving metadata is stored
    as the ``inceptionnext.json`` extra file of the archive (:func:`inceptionnext.serve.read_torchscript_metadata`).
    Arguments as in
    :func:`export_onnx`.
    """
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    _check_classifier(model)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    chw = _input_chw(model, image_size)
    start = time.perf_counter()
    ref = model if reference is None else reference
    with _eval_mode(model), _eval_mode(ref), _quiet_torchscript():
        device = _model_device(model)
        x = _random_batch(batch_size, chw, seed=0, device=device)
        _probe(model, x)
        meta = _metadata(model, chw, metadata)
        meta["exporter"] = "jit.trace"
        try:
            with torch.no_grad():
                traced = torch.jit.trace(model, x, check_trace=False)  # checked below, on other batch sizes
            torch.jit.save(traced, str(path), _extra_files={TORCHSCRIPT_META: json.dumps(meta)})
        except Exception as e:
            raise ExportError(f"torch.jit.trace failed: {type(e).__name__}: {e}") from e
        report = ExportReport("torchscript", path, path.stat().st_size, "jit.trace", tuple(x.shape), True,
                              metadata=meta)  # fmt: skip
        if check:
            with _remove_on_failure(path):
                loaded = torch.jit.load(str(path), map_location=device)
                batches = _check_batches(batch_size, True)
                report.max_abs_diff = _verify(
                    lambda t: _eager(loaded, t), ref, chw, batches, atol, device, f"TorchScript file {path}"
                )
                report.checked_batch_sizes, report.atol = batches, atol
    report.seconds = time.perf_counter() - start
    return report
