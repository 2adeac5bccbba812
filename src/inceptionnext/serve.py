"""Serving exported files: ONNX classifiers in an onnxruntime CPU session, and the metadata stored at export.

>>> from inceptionnext.serve import OnnxClassifier
>>> clf = OnnxClassifier("model.onnx")  # intra_op_threads defaults to the physical cores
>>> logits = clf(images)  # (B, 3, H, W) float32 -> (B, num_classes)
>>> clf.preprocessing, clf.class_names  # as stored by inceptionnext.export

:mod:`inceptionnext.export` writes the files and checks them against the eager model (with this module's
:class:`OnnxClassifier`); this module only reads them, so a server needs onnxruntime and nothing of the exporters.
The metadata is JSON strings in the ONNX ``metadata_props`` (:func:`read_onnx_metadata`) and the
``inceptionnext.json`` extra file of a TorchScript archive (:func:`read_torchscript_metadata`).
"""

from __future__ import annotations

import contextlib
import json
import os
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .errors import ConfigError, UserError
from .inference import LoadedModel, imagenet_class_names
from .models.pretrained import PREPROCESSING_KEYS, resolve_data_config

__all__ = [
    "MissingDependencyError",
    "ModelFileNotFoundError",
    "OnnxClassifier",
    "OnnxModule",
    "PRECISION_KEY",
    "ServeError",
    "TorchScriptClassifier",
    "cpu_supports",
    "load_exported_model",
    "load_onnx_model",
    "physical_cores",
    "read_onnx_metadata",
    "read_torchscript_metadata",
]

TORCHSCRIPT_META = "inceptionnext.json"  # the extra file of a TorchScript archive that holds the metadata
PRECISION_KEY = "precision"  # metadata key: "fp32" (unset), "int8" (quantized ONNX) or "bf16" (TorchScript, autocast)
_ISA = {  # /proc/cpuinfo flags of the instructions each precision needs to be fast
    "int8": ("avx512_vnni", "avx_vnni", "amx_int8", "asimddp", "i8mm"),
    "bf16": ("avx512_bf16", "amx_bf16", "bf16"),
}


class MissingDependencyError(UserError, ImportError):
    """onnx / onnxruntime / onnxscript are not installed."""


class ServeError(UserError, ValueError):
    """An exported file that cannot be served as given: unreadable, or fed an input of another shape."""


class ModelFileNotFoundError(ServeError, FileNotFoundError):
    """The exported file does not exist."""


def _require_onnx(*modules: str) -> None:
    missing = []
    for name in modules:
        try:
            __import__(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise MissingDependencyError(
            f"{' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} not installed; "
            "install the ONNX extra: pip install 'inceptionnext[onnx]'"
        )


def _decode(props: Mapping[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in props.items():
        try:
            out[k] = json.loads(v)
        except (TypeError, ValueError):
            out[k] = v
    return out


def _ignore_jit_deprecation() -> None:
    # torch 2.14 marks torch.jit.trace/save/load deprecated (FutureWarning, "switch to torch.compile or
    # torch.export"); TorchScript still works and is what C++ (libtorch) deployments load, so we silence only that.
    warnings.filterwarnings("ignore", message=r"`torch\.jit\.\w+` is deprecated", category=FutureWarning)


def read_onnx_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The metadata :func:`~inceptionnext.export.export_onnx` stored in an ``.onnx`` file (JSON-decoded values;
    other files: as stored)."""
    path = Path(path)
    if not path.is_file():
        raise ModelFileNotFoundError(f"{path}: no such ONNX file")
    try:
        import onnx
    except ImportError:  # onnxruntime alone can read them too
        return dict(OnnxClassifier(path, intra_op_threads=1).metadata)
    proto = onnx.load(str(path), load_external_data=False)
    return _decode({p.key: p.value for p in proto.metadata_props})


@contextlib.contextmanager
def _quiet_jit() -> Iterator[None]:
    with warnings.catch_warnings():
        _ignore_jit_deprecation()
        yield


def read_torchscript_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The metadata :func:`~inceptionnext.export.export_torchscript` stored in a TorchScript archive ({} if none)."""
    files = {TORCHSCRIPT_META: ""}
    with _quiet_jit():
        torch.jit.load(str(path), map_location="cpu", _extra_files=files)
    return json.loads(files[TORCHSCRIPT_META]) if files[TORCHSCRIPT_META] else {}


def _cpu_flags() -> set[str] | None:
    """The CPU's feature flags (Linux ``/proc/cpuinfo``; None elsewhere)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):  # x86, arm64
            return set(value.split())
    return None


def cpu_supports(precision: str) -> tuple[bool, str]:
    """Whether this CPU has the instructions that make ``precision`` ("int8", "bf16") fast, and a sentence saying
    which it has or lacks. Without them int8 and bf16 still compute, through slow emulation paths.

    The environment variable ``INCEPTIONNEXT_CPU_FLAGS`` (space-separated flags) replaces the CPU's own list, to try
    the fallbacks on a machine that has the instructions."""
    if precision not in _ISA:
        raise ConfigError(f"precision must be one of {', '.join(_ISA)}, got {precision!r}")
    override = os.environ.get("INCEPTIONNEXT_CPU_FLAGS")
    flags = set(override.split()) if override is not None else _cpu_flags()
    if flags is None:
        return False, f"cannot read this CPU's flags to check for {precision} instructions"
    have = [f for f in _ISA[precision] if f in flags]
    if have:
        return True, f"this CPU has {', '.join(have)}"
    arch = "x86" if {"sse2", "avx2", "avx"} & flags or not flags & {"asimd", "fp"} else "arm"
    return False, f"{arch} CPU without {' / '.join(_ISA[precision])}"


def physical_cores() -> int:
    """Physical CPU cores available to this process (hyper-threads don't help onnxruntime's GEMMs)."""
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        usable = os.cpu_count() or 1
    cores = None
    try:
        import psutil

        cores = psutil.cpu_count(logical=False)
    except ImportError:
        try:
            seen, phys = set(), "0"
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                key, _, value = line.partition(":")
                if key.strip() == "physical id":
                    phys = value.strip()
                elif key.strip() == "core id":
                    seen.add((phys, value.strip()))
            cores = len(seen) or None
        except OSError:
            pass
    return max(1, min(cores or usable, usable))


class OnnxClassifier:
    """An ``.onnx`` classifier in an onnxruntime CPU session: ``clf(images) -> logits`` (numpy float32).

    Args:
        path: the ``.onnx`` file.
        intra_op_threads: threads per operator (default: :func:`physical_cores`).
        inter_op_threads: threads across independent operators (the graph is a chain: 1).
        optimization_level: onnxruntime graph optimisations: ``"all"`` (default), ``"extended"``, ``"basic"`` or
            ``"none"``.

    ``session`` is the ``onnxruntime.InferenceSession`` (for timing or IO binding), ``metadata`` the decoded
    ``metadata_props``, ``preprocessing`` the eval transform settings stored in the file (and the graph's input
    size) and ``class_names`` the labels when stored.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        intra_op_threads: int | None = None,
        inter_op_threads: int = 1,
        optimization_level: str = "all",
    ) -> None:
        _require_onnx("onnxruntime")
        import onnxruntime as ort

        self.path = Path(path)
        if not self.path.is_file():
            raise ModelFileNotFoundError(f"{self.path}: no such ONNX file")
        levels = {
            "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
            "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
            "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            "none": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        }
        if optimization_level not in levels:
            raise ConfigError(f"optimization_level must be one of {', '.join(levels)}, got {optimization_level!r}")
        opts = ort.SessionOptions()
        opts.graph_optimization_level = levels[optimization_level]
        opts.intra_op_num_threads = intra_op_threads or physical_cores()
        opts.inter_op_num_threads = inter_op_threads
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        try:
            self.session = ort.InferenceSession(str(self.path), opts, providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime raises its own exception types
            raise ServeError(f"{self.path}: onnxruntime cannot load it ({type(e).__name__}: {e})") from e
        inp, out = self.session.get_inputs()[0], self.session.get_outputs()[0]
        self.input_name, self.output_name = inp.name, out.name
        self.input_shape = tuple(d if isinstance(d, int) else None for d in inp.shape)  # None: dynamic
        self.metadata = _decode(self.session.get_modelmeta().custom_metadata_map)

    @property
    def preprocessing(self) -> dict[str, Any]:
        """The preprocessing keys stored in the file, and the graph's input size when the metadata lacks it; unset
        keys are left out (:func:`~inceptionnext.models.pretrained.resolve_data_config` fills them)."""
        pre = {k: tuple(v) if isinstance(v, list) else v for k, v in self.metadata.items() if k in PREPROCESSING_KEYS}
        if "input_size" not in pre and len(self.input_shape) == 4 and None not in self.input_shape[1:]:
            pre["input_size"] = self.input_shape[1:]
        return pre

    @property
    def class_names(self) -> list[str] | None:
        names = self.metadata.get("class_names")
        return list(names) if names else None

    @property
    def model_name(self) -> str:
        return str(self.metadata.get("model_name") or self.path.stem)

    def __call__(self, images: np.ndarray | torch.Tensor) -> np.ndarray:
        if isinstance(images, torch.Tensor):
            images = images.detach().to("cpu", torch.float32).numpy()
        x = np.ascontiguousarray(images, dtype=np.float32)
        expected = self.input_shape
        if x.ndim != len(expected) or any(e is not None and e != s for e, s in zip(expected[1:], x.shape[1:])):
            want = "x".join("?" if e is None else str(e) for e in expected)
            raise ServeError(f"{self.path.name} takes input of shape {want}, got {'x'.join(map(str, x.shape))}")
        return self.session.run([self.output_name], {self.input_name: x})[0]

    def __repr__(self) -> str:
        return f"OnnxClassifier({str(self.path)!r}, model={self.model_name!r}, input={self.input_shape})"


class OnnxModule(nn.Module):
    """An exported classifier (:class:`OnnxClassifier`, :class:`TorchScriptClassifier`) behind the ``nn.Module``
    interface (tensor in, float32 tensor out, CPU), so the torch tools (``predict``, ``validate``) run it unchanged.
    The file decides the precision: an autocast around it changes nothing."""

    def __init__(self, classifier: OnnxClassifier | TorchScriptClassifier) -> None:
        super().__init__()
        self.classifier = classifier
        self.num_classes = int(classifier.metadata.get("num_classes") or 0) or None
        # what runs: a bf16 file falls back to fp32 on a CPU without bf16 instructions
        self.precision = str(getattr(classifier, "precision", None) or classifier.metadata.get(PRECISION_KEY, "fp32"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Runs on the CPU; the logits go back to ``x``'s device (validate moves batches to the GPU if there is one)."""
        if isinstance(self.classifier, TorchScriptClassifier):
            return self.classifier.forward(x).to(x.device)
        return torch.from_numpy(self.classifier(x)).to(x.device)


class TorchScriptClassifier:
    """A TorchScript classifier written by :func:`~inceptionnext.export.export_torchscript` (or the bf16 export):
    ``clf(images) -> logits`` (numpy float32), with the same ``metadata`` / ``preprocessing`` / ``class_names``
    interface as :class:`OnnxClassifier`.

    A file whose metadata says ``precision: bf16`` runs under ``torch.autocast("cpu", torch.bfloat16)`` on a
    channels-last input (the faster layout for every InceptionNeXt path on CPU). On a CPU without native bf16
    instructions (AVX-512 BF16, AMX) bf16 is emulated and slower than fp32, so the file runs in fp32 instead, with a
    warning; ``precision`` says what actually runs. ``precision=`` forces one.
    """

    def __init__(self, path: str | os.PathLike, *, precision: str | None = None) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise ModelFileNotFoundError(f"{self.path}: no such TorchScript file")
        files = {TORCHSCRIPT_META: ""}
        try:
            with _quiet_jit():
                self.module = torch.jit.load(str(self.path), map_location="cpu", _extra_files=files).eval()
        except Exception as e:  # torch raises RuntimeError with the archive's complaint
            raise ServeError(f"{self.path}: torch.jit.load cannot load it ({type(e).__name__}: {e})") from e
        self.metadata = json.loads(files[TORCHSCRIPT_META]) if files[TORCHSCRIPT_META] else {}
        stored = str(self.metadata.get(PRECISION_KEY, "fp32"))
        if precision is not None and precision not in ("fp32", "bf16"):
            raise ConfigError(f"precision must be 'fp32' or 'bf16', got {precision!r}")
        self.precision = precision or stored
        self.notes: list[str] = []
        if precision is None and stored == "bf16":
            ok, reason = cpu_supports("bf16")
            if not ok:
                self.precision = "fp32"
                self.notes.append(f"{self.path.name} is a bf16 export, but {reason}: running it in fp32")
                warnings.warn(self.notes[-1], stacklevel=2)
        size = self.metadata.get("input_size")
        self.input_shape = (None, *size) if size else (None, None, None, None)

    preprocessing = OnnxClassifier.preprocessing
    class_names = OnnxClassifier.class_names
    model_name = OnnxClassifier.model_name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits as a float32 tensor (what :class:`OnnxModule` calls)."""
        x = x.detach().to("cpu", torch.float32)
        expected = self.input_shape
        if x.ndim != 4 or any(e is not None and e != s for e, s in zip(expected[1:], x.shape[1:])):
            want = "x".join("?" if e is None else str(e) for e in expected)
            raise ServeError(f"{self.path.name} takes input of shape {want}, got {'x'.join(map(str, x.shape))}")
        with torch.inference_mode():
            if self.precision == "bf16":
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    out = self.module(x.contiguous(memory_format=torch.channels_last))
            else:
                with torch.autocast("cpu", enabled=False):  # an fp32 file stays fp32 inside a caller's autocast
                    out = self.module(x)
        return out.float()

    def __call__(self, images: np.ndarray | torch.Tensor) -> np.ndarray:
        x = images if isinstance(images, torch.Tensor) else torch.from_numpy(np.asarray(images, dtype=np.float32))
        return self.forward(x).numpy()

    def __repr__(self) -> str:
        return f"TorchScriptClassifier({str(self.path)!r}, model={self.model_name!r}, precision={self.precision!r})"


def load_exported_model(
    path: str | os.PathLike, *, intra_op_threads: int | None = None, precision: str | None = None
) -> LoadedModel:
    """An exported file (``.onnx``: onnxruntime, fp32 or int8; else a TorchScript archive: torch, fp32 or bf16) as a
    :class:`~inceptionnext.inference.LoadedModel`, with the preprocessing and class names stored at export
    (``predict --exported``, ``validate --exported``)."""
    path = Path(path)
    if not path.is_file():
        kind = "ONNX" if path.suffix.lower() == ".onnx" else "exported"
        raise ModelFileNotFoundError(f"{path}: no such {kind} file")
    with open(path, "rb") as f:
        zip_archive = f.read(4) == b"PK\x03\x04"  # TorchScript archives are zip files; ONNX is protobuf
    if not zip_archive:
        return load_onnx_model(path, intra_op_threads=intra_op_threads)
    clf = TorchScriptClassifier(path, precision=precision)
    return _loaded(clf, path, f"{path} (TorchScript, {clf.precision})")


def _loaded(clf: OnnxClassifier | TorchScriptClassifier, path: Path, weights: str) -> LoadedModel:
    pre = clf.preprocessing
    if "input_size" not in pre:
        raise ServeError(f"{path}: no input size in its metadata or graph; re-export it with inceptionnext export")
    names = clf.class_names
    if names is None and clf.metadata.get("num_classes") == 1000:
        names = imagenet_class_names()
    return LoadedModel(OnnxModule(clf).eval(), clf.model_name, resolve_data_config(pre), names, weights)


def load_onnx_model(path: str | os.PathLike, *, intra_op_threads: int | None = None) -> LoadedModel:
    """An exported ``.onnx`` file as a :class:`~inceptionnext.inference.LoadedModel` (for ``predict``): the
    preprocessing and class names come from the metadata stored at export."""
    clf = OnnxClassifier(path, intra_op_threads=intra_op_threads)
    precision = clf.metadata.get(PRECISION_KEY, "fp32")
    return _loaded(clf, Path(path), f"{path} (onnxruntime, {precision})")
