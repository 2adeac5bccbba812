"""Throughput the way the paper measures it (Tables 1, 4, 5, 8; Figure 1).

Two protocols (:data:`PROTOCOLS`), ``official`` by default:

* ``official``: the released ``benchmark.py`` of sail-sg/inceptionnext (timm 0.6.11's script, run through its
  command line): ``torch.backends.cudnn.benchmark = True``; 10 warm-up and 40 timed steps (the runner class says 50,
  but the command line's ``--num-bench-iter`` default of 40 is what it passes); images per second = images / total
  timed time; a training step is forward + cross-entropy + backward + SGD step (timm's ``create_optimizer_v2(opt='sgd',
  lr=1e-4)``: Nesterov momentum 0.9, no weight decay) with a fresh random target per step; inference under
  ``torch.no_grad``; on out-of-memory the batch steps down as timm's ``decay_batch_step`` does (128, 96, 64, 48, ...);
  TF32 on (the paper: Tables 1, 4 and 8 were measured "with TF32" on an A100; the 2080Ti has no TF32, so there it is
  plain FP32 either way).
* ``this``: this package's earlier protocol: 5 warm-up and 20 timed steps, images / median step time, AdamW
  training step, ``torch.inference_mode``, batch halved on out-of-memory, fp32 (TF32 off), cudnn's autotuner left as
  it is.

Both measure at batch 128 by default and, as the paper's Table 4 caption says, channels-first and channels-last
with the better one reported (the script measures one layout per run).

Implementations (``impl``):

* ``eager``: the model as built (this package's or timm's).
* ``fused``: this package's models after :func:`inceptionnext.fuse` (inference only): the inference
  re-parameterisation (BatchNorm, mixer biases and LayerScale folded into the 1x1 convolutions, the MLP as GEMMs
  with fused epilogues); no Triton.
* ``triton``: this package's models as built, with the Inception mixers swapped for the fused Triton kernel
  (:func:`inceptionnext.layers.set_triton_mixers`, what ``create_model(..., fused_mixer=True)`` and training's
  ``--fused-mixer`` build): one launch per mixer instead of split / three convolutions / concatenate, training and
  inference. The kernel runs on CUDA only; elsewhere the reference code runs, so on CPU this measures ``eager``.
* ``compile``: ``torch.compile`` (inductor; for inference the fused model with weight freezing).
* ``onnxruntime``: the model exported to ONNX (fused first for this package's models) run by onnxruntime on CPU,
  fp32 (inference only).

Precision: ``fp32`` (TF32 off), ``tf32`` (TF32 matmuls and convolutions; same as fp32 on CPU), ``bf16`` and ``fp16``
(autocast; fp16 training with a gradient scaler).
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import KW_ONLY, asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = [
    "PEERS",
    "PEERS_384",
    "PROTOCOLS",
    "BackendSettings",
    "Measurement",
    "PaperRow",
    "Protocol",
    "Summary",
    "measure",
    "run_benchmark",
    "summarize",
    "format_table",
    "write_csv",
    "write_json",
    "plot_figure1",
    "matmul_rate",
    "tune_glibc_malloc",
    "paper_figures",
    "paper_row",
    "backend_settings",
    "describe_protocol",
    "train_optimizer",
    "resolve_protocol",
]

IMPLS = ("eager", "fused", "triton", "compile", "onnxruntime")
MODES = ("infer", "train")
PRECISIONS = ("fp32", "tf32", "bf16", "fp16")
LAYOUTS = ("channels_first", "channels_last")
TRAIN_OPTS = ("sgd", "adamw")
STATISTICS = ("mean", "median")


@dataclass(frozen=True)
class Protocol:
    """How one throughput is measured; :data:`PROTOCOLS` holds the two this package knows (see the module doc)."""

    name: str
    warmup: int
    steps: int
    train_opt: str  # "sgd": the released script's optimizer; "adamw": the paper's training optimizer
    precision: str
    statistic: str  # "mean": images / total timed time (the script); "median": images / median step time
    cudnn_benchmark: bool | None  # None leaves the process's setting alone
    grad_mode: str  # "no_grad" (the script) or "inference_mode"
    batch_decay: str  # "timm": decay_batch_step (the script); "halve"
    source: str = ""

    def describe(self) -> str:
        opt = "SGD (lr 1e-4, Nesterov momentum 0.9)" if self.train_opt == "sgd" else "AdamW (lr 1e-6)"
        decay = "steps down as timm's decay_batch_step" if self.batch_decay == "timm" else "halved"
        cudnn = {True: "on", False: "off", None: "as set"}[self.cudnn_benchmark]
        per_s = "images / total timed time" if self.statistic == "mean" else "images / median step time"
        return (
            f"protocol {self.name}{f' ({self.source})' if self.source else ''}: {self.precision}, cudnn.benchmark "
            f"{cudnn}, {self.warmup} warm-up + {self.steps} timed steps, {per_s}, train step with {opt}, inference "
            f"under {self.grad_mode}, batch {decay} on out-of-memory"
        )


PROTOCOLS: dict[str, Protocol] = {
    "official": Protocol(
        "official",
        warmup=10,
        steps=40,
        train_opt="sgd",
        precision="tf32",
        statistic="mean",
        cudnn_benchmark=True,
        grad_mode="no_grad",
        batch_decay="timm",
        source="the released benchmark.py, timm 0.6.11",
    ),
    "this": Protocol(
        "this",
        warmup=5,
        steps=20,
        train_opt="adamw",
        precision="fp32",
        statistic="median",
        cudnn_benchmark=None,
        grad_mode="inference_mode",
        batch_decay="halve",
        source="this package's earlier protocol",
    ),
}


def resolve_protocol(protocol: str | Protocol = "official", **overrides: Any) -> Protocol:
    """A protocol by name, with the given fields replaced where not ``None`` (``warmup=3, train_opt='adamw'``)."""
    if isinstance(protocol, str):
        if protocol not in PROTOCOLS:
            raise ValueError(f"unknown protocol {protocol!r}: use one of {', '.join(PROTOCOLS)}")
        protocol = PROTOCOLS[protocol]
    changed = {k: v for k, v in overrides.items() if v is not None}
    for key, allowed in (("train_opt", TRAIN_OPTS), ("precision", PRECISIONS), ("statistic", STATISTICS)):
        if key in changed and changed[key] not in allowed:
            raise ValueError(f"unknown {key} {changed[key]!r}: use one of {', '.join(allowed)}")
    return replace(protocol, **changed) if changed else protocol


def describe_protocol(protocol: Protocol, changed: Iterable[str] = ()) -> str:
    """One line saying which protocol ran, and which of its values were set by hand."""
    changed = list(changed)
    return protocol.describe() + (f" (set by flag: {', '.join(changed)})" if changed else "")


@dataclass(frozen=True)
class BackendSettings:
    """The global torch switches one measurement runs under (applied by :func:`backend`, restored after)."""

    cudnn_benchmark: bool | None
    matmul_tf32: bool
    cudnn_tf32: bool
    autocast_dtype: torch.dtype | None


def backend_settings(protocol: Protocol, precision: str | None = None) -> BackendSettings:
    """What a protocol at ``precision`` (default: the protocol's) sets: TF32 for matmuls and cuDNN only at ``tf32``
    (they act on CUDA only), cudnn's autotuner as the protocol says."""
    precision = precision or protocol.precision
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}: use one of {', '.join(PRECISIONS)}")
    tf32 = precision == "tf32"
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    return BackendSettings(protocol.cudnn_benchmark, matmul_tf32=tf32, cudnn_tf32=tf32, autocast_dtype=dtype)


@contextlib.contextmanager
def backend(settings: BackendSettings):
    """Apply the process-wide switches of ``settings``; the previous values come back on exit."""
    old = (torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    if settings.cudnn_benchmark is not None:
        torch.backends.cudnn.benchmark = settings.cudnn_benchmark
    torch.backends.cuda.matmul.allow_tf32 = settings.matmul_tf32
    torch.backends.cudnn.allow_tf32 = settings.cudnn_tf32
    try:
        yield settings
    finally:
        torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


@dataclass(frozen=True)
class PeerFigures:
    """A timm model's row of Table 4, as printed: top-1, A100 (TF32) and 2080Ti (FP32) train / infer img/s at batch
    128 (reduced until it fits), params and MACs, and the image size of the row."""

    label: str
    top1: float
    train: int | None  # A100
    infer: int | None  # A100
    _: KW_ONLY
    train_2080ti: int | None = None
    infer_2080ti: int | None = None
    params_m: str = ""
    macs_g: str = ""
    img_size: int = 224


def _peer(
    label: str,
    params_m: str,
    macs_g: str,
    a100: tuple[int, int],
    rtx: tuple[int, int],
    top1: float,
    img_size: int = 224,
) -> PeerFigures:
    """One row in the paper's column order: params, MACs, A100 train/infer, 2080Ti train/infer, top-1."""
    a100_train, a100_infer = a100
    return PeerFigures(
        label, top1, a100_train, a100_infer, train_2080ti=rtx[0], infer_2080ti=rtx[1], params_m=params_m,
        macs_g=macs_g, img_size=img_size,
    )  # fmt: skip


# Table 4 of the paper at 224 px; timm names of the same architectures.
PEERS: dict[str, PeerFigures] = {
    "mobilenetv2_140": _peer("MobileNetV2 (1.4)", "6.1", "0.60", (1001, 5190), (471, 1859), 74.7),
    "efficientnet_b0": _peer("EfficientNet-B0", "5.3", "0.40", (954, 5502), (464, 1944), 77.1),
    "ghostnet_130": _peer("GhostNet 1.3x", "7.3", "0.24", (946, 7451), (589, 2757), 75.7),
    "convnext_atto": _peer("ConvNeXt-A", "3.7", "0.55", (835, 4539), (345, 1568), 75.7),
    "deit_small_patch16_224": _peer("DeiT-S", "22", "4.6", (1227, 3781), (276, 784), 79.8),
    "swin_tiny_patch4_window7_224": _peer("Swin-T", "29", "4.5", (564, 1768), (184, 554), 81.3),
    "resnet50": _peer("ResNet-50", "26", "4.1", (969, 3149), (278, 977), 78.4),
    "regnety_040": _peer("RegNetY-4G", "21", "4.0", (670, 2694), (222, 859), 81.3),
    "convnext_tiny": _peer("ConvNeXt-T", "29", "4.5", (575, 2413), (177, 590), 82.1),
    "swin_small_patch4_window7_224": _peer("Swin-S", "50", "8.7", (359, 1131), (109, 328), 83.0),
    "resnet101": _peer("RSB-ResNet-101", "45", "7.9", (620, 2057), (168, 592), 81.3),
    "regnety_080": _peer("RegNetY-8G", "39", "8.0", (689, 1326), (124, 480), 82.1),
    "convnext_small": _peer("ConvNeXt-S", "50", "8.7", (361, 1535), (105, 353), 83.1),
    "deit_base_patch16_224": _peer("DeiT-B", "86", "17.5", (541, 1608), (86, 259), 81.8),
    "swin_base_patch4_window7_224": _peer("Swin-B", "88", "15.4", (271, 843), (72, 223), 83.5),
    "resnet152": _peer("RSB-ResNet-152", "60", "11.6", (437, 1457), (115, 415), 81.8),
    "regnety_160": _peer("RegNetY-16G", "84", "15.9", (322, 1100), (76, 295), 82.2),
    "convnext_base": _peer("ConvNeXt-B", "89", "15.4", (267, 1122), (68, 236), 83.8),
}

# Table 4's rows fine-tuned at 384 px, by timm architecture (ConvNeXt-B at 384 is timm's convnext_base run at 384:
# ``inceptionnext benchmark convnext_base --img-size 384``).
PEERS_384: dict[str, PeerFigures] = {
    "deit_base_patch16_384": _peer("DeiT-B", "86", "55.4", (131, 361), (25, 73), 83.1, img_size=384),
    "swin_base_patch4_window12_384": _peer("Swin-B", "88", "47.1", (104, 296), (21, 65), 84.5, img_size=384),
    "convnext_base": _peer("ConvNeXt-B", "89", "45.0", (95, 393), (23, 79), 85.1, img_size=384),
}
_PEERS_BY_SIZE = {224: PEERS, 384: PEERS_384}

# timm's own implementation of the paper's models: the figures are those of this package's variant of that name
_TIMM_TWINS = {f"inception_next_{s}": f"inceptionnext_{s}" for s in ("atto", "tiny", "small", "base")}


@dataclass(frozen=True)
class PaperRow:
    """The paper's figures for one model at one image size: top-1 and the throughputs on each GPU it printed."""

    top1: float | None = None
    a100_train: int | None = None
    a100_infer: int | None = None
    rtx2080ti_train: int | None = None
    rtx2080ti_infer: int | None = None
    img_size: int | None = None


def paper_row(name: str, img_size: int | None = None) -> PaperRow | None:
    """The paper's row for a model of this package or a timm peer at ``img_size`` (default: the row the name
    denotes); ``None`` when the paper printed none at that size (figures at another resolution do not compare)."""
    from .models import is_model
    from .models.registry import get_entry

    base = name.split(".")[0]
    ours = _TIMM_TWINS.get(base, base if is_model(base) else None)
    if ours is not None:
        if img_size is not None and is_model(f"{ours}_{img_size}"):
            ours = f"{ours}_{img_size}"
        entry = get_entry(ours)
        size = entry.cfg.input_size[-1]
        p = entry.paper
        if p is None or (img_size is not None and img_size != size):
            return None
        a100 = "A100" in p.throughput_device
        return PaperRow(
            p.top1,
            p.train_throughput if a100 else None,
            p.infer_throughput if a100 else None,
            p.train_throughput_2080ti if a100 else p.train_throughput,
            p.infer_throughput_2080ti if a100 else p.infer_throughput,
            size,
        )  # fmt: skip
    sizes = [img_size] if img_size is not None else list(_PEERS_BY_SIZE)
    for size in sizes:
        peer = _PEERS_BY_SIZE.get(size, {}).get(base)
        if peer is not None:
            return PaperRow(peer.top1, peer.train, peer.infer, peer.train_2080ti, peer.infer_2080ti, peer.img_size)
    return None


def paper_figures(name: str) -> tuple[float | None, int | None, int | None]:
    """(top-1, train img/s, infer img/s) printed in the paper for a model name of this package or a timm peer.

    The throughputs are those of the model's table (A100 for Tables 1, 4 and 8, 2080Ti for Table 5);
    :func:`paper_row` gives both GPUs' columns."""
    from .models import is_model
    from .models.registry import get_entry

    name = _TIMM_TWINS.get(name.split(".")[0], name)
    if is_model(name):
        p = get_entry(name).paper
        return (p.top1, p.train_throughput, p.infer_throughput) if p else (None, None, None)
    peer = PEERS.get(name.split(".")[0]) or PEERS_384.get(name.split(".")[0])
    return (peer.top1, peer.train, peer.infer) if peer else (None, None, None)


@dataclass
class Measurement:
    """One timed configuration; ``img_per_s`` is None when it failed (``error`` says why)."""

    model: str
    impl: str
    mode: str
    layout: str
    precision: str
    device: str
    img_size: int
    batch_size: int
    img_per_s: float | None = None
    step_ms_median: float | None = None
    step_ms: list[float] = field(default_factory=list)
    error: str | None = None
    protocol: str = ""
    step_ms_mean: float | None = None


@dataclass
class Summary:
    """The best layout of one (model, impl), both modes, with the model's size and the paper's figures."""

    model: str
    impl: str
    params_m: float
    macs_g: float
    infer: float | None = None
    train: float | None = None
    infer_layout: str = ""
    train_layout: str = ""
    batch_size: int | None = None
    infer_ratio: float | None = None
    train_ratio: float | None = None
    paper_top1: float | None = None
    paper_train: int | None = None  # A100 (Tables 1, 4, 8)
    paper_infer: int | None = None
    gflops_per_s: float | None = None
    paper_train_2080ti: int | None = None  # 2080Ti (Tables 4, 5)
    paper_infer_2080ti: int | None = None
    img_size: int | None = None


# ----------------------------------------------------------------------------------------------------- building
def resolve_device(device: str | torch.device = "auto") -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda asked for, but torch sees no CUDA device; use --device cpu")
    return dev


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def precision_mode(precision: str, device: torch.device):
    """TF32 switches and autocast for one precision; restores the previous TF32 settings."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}: use one of {', '.join(PRECISIONS)}")
    old = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = precision == "tf32"
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    try:
        with torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext():
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def build_model(name: str, *, pretrained: bool = False) -> nn.Module:
    from .models.factory import create_any_model

    return create_any_model(name, pretrained=pretrained)


def _is_ours(model: nn.Module) -> bool:
    from .models.metanext import MetaNeXt

    return isinstance(model, MetaNeXt)


def _memory_format(layout: str) -> torch.memory_format:
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}: use one of {', '.join(LAYOUTS)}")
    return torch.channels_last if layout == "channels_last" else torch.contiguous_format


def _inference_step(model: nn.Module, name: str, impl: str, device: torch.device, layout: str, x: torch.Tensor):
    model.eval()
    if impl in ("fused", "compile", "onnxruntime") and _is_ours(model):
        from .reparam import fuse

        model = fuse(model)
    elif impl == "fused":
        raise ValueError(f"impl 'fused' needs one of this package's models, {name!r} is timm's")
    if impl == "triton":
        model = _with_triton_mixers(model, name, copy=True)
    if impl == "onnxruntime":
        return _onnxruntime_step(model, x)
    model = model.to(device=device, memory_format=_memory_format(layout))
    if impl == "compile":
        model = torch.compile(model, options={"freezing": True} if device.type == "cpu" else None)

    def step() -> None:  # the caller enters the protocol's no-grad mode
        model(x)

    return step


def _with_triton_mixers(model: nn.Module, name: str, *, copy: bool) -> nn.Module:
    """``model`` (a copy of it: an inference model may be reused by the next impl) with Triton mixers."""
    import copy as copy_module

    from .layers import set_triton_mixers

    if not _is_ours(model):
        raise ValueError(f"impl 'triton' needs one of this package's models, {name!r} is timm's")
    return set_triton_mixers(copy_module.deepcopy(model) if copy else model)


def _onnxruntime_step(model: nn.Module, x: torch.Tensor):
    from .export import export_onnx
    from .serve import OnnxClassifier

    tmp = tempfile.TemporaryDirectory(prefix="inceptionnext-bench-")
    path = Path(tmp.name) / "model.onnx"
    export_onnx(model.cpu(), path, image_size=x.shape[-1], check=False)
    runner = OnnxClassifier(path)
    batch = x.detach().cpu().contiguous().numpy()

    def step() -> None:
        runner(batch)

    step._keep = (tmp, runner)  # the session and its file live as long as the step
    return step


def train_optimizer(model: nn.Module, name: str = "sgd") -> torch.optim.Optimizer:
    """The optimizer of a benchmark training step.

    ``sgd`` is what the released benchmark script builds, timm's ``create_optimizer_v2(model, opt='sgd', lr=1e-4)``
    (its ``--momentum``/``--weight-decay`` flags never reach it): Nesterov momentum 0.9, no weight decay, so no
    parameter groups. ``adamw`` is this package's earlier choice, the paper's training optimizer (a tiny lr: the
    weights should barely move while timing).
    """
    if name == "sgd":
        return torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9, nesterov=True, weight_decay=0.0)
    if name == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=1e-6)
    raise ValueError(f"unknown train optimizer {name!r}: use one of {', '.join(TRAIN_OPTS)}")


def _training_step(
    model: nn.Module,
    device: torch.device,
    layout: str,
    x: torch.Tensor,
    impl: str,
    precision: str,
    train_opt: str = "adamw",
):
    if impl in ("fused", "onnxruntime"):
        raise ValueError(f"impl {impl!r} is inference only")
    if impl == "triton":
        model = _with_triton_mixers(model, "this model", copy=False)  # training updates its model anyway
    model = model.to(device=device, memory_format=_memory_format(layout)).train()
    opt = train_optimizer(model, train_opt)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    forward = torch.compile(model) if impl == "compile" else model
    n_cls = getattr(model, "num_classes", 1000) or 1000

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        # a fresh target every step, inside the timed region, as the released script draws it
        target = torch.empty(x.shape[0], dtype=torch.long, device=device).random_(n_cls)
        with precision_mode(precision, device):
            loss = nn.functional.cross_entropy(forward(x), target)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()

    step.optimizer = opt  # what the step trains with, for inspection
    return step


def _is_oom(err: BaseException) -> bool:
    if isinstance(err, torch.OutOfMemoryError):
        return True
    text = str(err).lower()
    return isinstance(err, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


def time_steps(step: Callable[[], None], device: torch.device, warmup: int, steps: int) -> list[float]:
    """Seconds of each of ``steps`` timed calls after ``warmup`` untimed ones."""
    for _ in range(warmup):
        step()
    _sync(device)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return times


def _next_batch(bs: int, decay: str) -> int:
    if decay == "timm":
        from timm.utils import decay_batch_step

        return decay_batch_step(bs)
    return bs // 2


def default_img_size(model: nn.Module) -> int:
    """The model's input size from its pretrained config (224 without one; 384 for the 384 models), as the
    released script picks it when ``--img-size`` is not given. Not timm's ``test_input_size`` (288 for timm's
    ``resnet50``), which the script would prefer: Table 4 prints its rows at 224 px."""
    from .models.pretrained import resolve_data_config

    return int(resolve_data_config(model)["input_size"][-1])


def measure(
    name: str,
    *,
    impl: str = "eager",
    mode: str = "infer",
    layout: str = "channels_first",
    precision: str | None = None,
    device: str | torch.device = "auto",
    batch_size: int = 128,
    img_size: int | None = None,
    warmup: int | None = None,
    steps: int | None = None,
    model: nn.Module | None = None,
    protocol: str | Protocol = "official",
    train_opt: str | None = None,
) -> Measurement:
    """Time one configuration under ``protocol`` (see :data:`PROTOCOLS`; ``precision``, ``warmup``, ``steps`` and
    ``train_opt`` override its values); on out-of-memory reduce the batch until it fits (the paper's protocol).

    ``img_size`` defaults to the model's eval size (384 for the 384 models). ``model`` may be given to reuse an
    already built instance (it is not modified for inference; training moves it and updates its weights).
    """
    proto = resolve_protocol(protocol, precision=precision, warmup=warmup, steps=steps, train_opt=train_opt)
    precision = proto.precision
    if impl not in IMPLS:
        raise ValueError(f"unknown impl {impl!r}: use one of {', '.join(IMPLS)}")
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}: use 'infer' or 'train'")
    dev = resolve_device(device)
    if impl == "onnxruntime" and (dev.type != "cpu" or precision not in ("fp32", "tf32")):
        raise ValueError("impl 'onnxruntime' is the CPU fp32 serving path: use --device cpu --precision fp32")
    base = model if model is not None else build_model(name)
    img_size = img_size or default_img_size(base)
    m = Measurement(name, impl, mode, layout, precision, dev.type, img_size, batch_size, protocol=proto.name)
    grad_mode = torch.no_grad if proto.grad_mode == "no_grad" else torch.inference_mode
    bs = batch_size
    with backend(backend_settings(proto)):
        while True:
            try:
                in_chans = getattr(base, "in_chans", 3)
                x = torch.randn(bs, in_chans, img_size, img_size, device=dev)
                x = x.contiguous(memory_format=_memory_format(layout))
                if mode == "infer":
                    inner = _inference_step(base, name, impl, dev, layout, x)

                    def step(inner=inner) -> None:
                        with grad_mode(), precision_mode(precision, dev):
                            inner()
                else:
                    step = _training_step(base, dev, layout, x, impl, precision, train_opt=proto.train_opt)
                times = time_steps(step, dev, proto.warmup, proto.steps)
                break
            except Exception as err:  # noqa: BLE001 - OOM backoff, anything else is reported in the row
                step = inner = x = None
                if dev.type == "cuda":
                    torch.cuda.empty_cache()
                if _is_oom(err) and bs > 1:
                    bs = _next_batch(bs, proto.batch_decay)
                    continue
                m.error = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"[:300]
                return m
    m.batch_size = bs
    m.step_ms = [t * 1e3 for t in times]
    m.step_ms_median = statistics.median(m.step_ms)
    m.step_ms_mean = statistics.fmean(m.step_ms)
    # "mean": the script's samples / elapsed over the timed steps, i.e. batch / mean step time
    per_step = m.step_ms_mean if proto.statistic == "mean" else m.step_ms_median
    m.img_per_s = bs / (per_step / 1e3)
    return m


def tune_glibc_malloc() -> None:
    """Keep freed memory in glibc's heap for every model measured in this process
    (:func:`inceptionnext.engine.runtime.glibc_keep_freed_memory`): by default every large activation of an eager CPU
    forward pass is page-faulted and zeroed by the kernel again, which at 224 px and batch 32 halves the throughput
    of an eager InceptionNeXt-T. Raises ``RuntimeError`` where the C library is not glibc."""
    from .engine.runtime import glibc_keep_freed_memory

    if not glibc_keep_freed_memory():
        raise RuntimeError("tune_glibc_malloc needs glibc's mallopt (Linux with glibc)")


def matmul_rate(device: str | torch.device = "cpu", n: int = 2048, repeats: int = 10, dtype=torch.float32) -> float:
    """This machine's fp32 matrix-multiply rate in GFLOP/s (median of ``repeats`` n x n x n products)."""
    dev = resolve_device(device)
    a, b = torch.randn(n, n, device=dev, dtype=dtype), torch.randn(n, n, device=dev, dtype=dtype)
    times = time_steps(lambda: torch.mm(a, b), dev, 2, repeats)
    return 2 * n**3 / statistics.median(times) / 1e9


# ---------------------------------------------------------------------------------------------------- running
def _progress(total: int):
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="run", disable=bool(os.environ.get("INCEPTIONNEXT_NO_PROGRESS")) or None)


def run_benchmark(
    models: Sequence[str],
    *,
    impls: Sequence[str] = ("eager",),
    modes: Sequence[str] = MODES,
    layouts: Sequence[str] = LAYOUTS,
    precision: str | None = None,
    device: str | torch.device = "auto",
    batch_size: int = 128,
    img_size: int | None = None,
    warmup: int | None = None,
    steps: int | None = None,
    progress: bool = True,
    protocol: str | Protocol = "official",
    train_opt: str | None = None,
) -> list[Measurement]:
    """Every (model, impl, mode, layout) combination that applies; inference-only impls skip training and
    onnxruntime has no layout of its own (measured once, reported as channels_first)."""
    plan = []
    for name in models:
        for impl in impls:
            for mode in modes:
                if mode == "train" and impl in ("fused", "onnxruntime"):
                    continue
                for layout in layouts if impl != "onnxruntime" else ("channels_first",):
                    plan.append((name, impl, mode, layout))
    out: list[Measurement] = []
    built: dict[str, nn.Module] = {}
    bar = _progress(len(plan)) if progress else None
    for name, impl, mode, layout in plan:
        if bar is not None:
            bar.set_description(f"{name} {impl} {mode} {layout}")
        if impl in ("fused", "triton") and name not in built:
            built[name] = build_model(name)
        if impl in ("fused", "triton") and not _is_ours(built[name]):
            continue
        # training updates weights and compile wraps the module: give those a fresh instance
        reuse = mode == "infer" and impl != "compile"
        model = built.setdefault(name, build_model(name)) if reuse else None
        out.append(
            measure(
                name,
                impl=impl,
                mode=mode,
                layout=layout,
                precision=precision,
                device=device,
                batch_size=batch_size,
                img_size=img_size,
                warmup=warmup,
                steps=steps,
                model=model,
                protocol=protocol,
                train_opt=train_opt,
            )  # fmt: skip
        )
        if bar is not None:
            bar.update()
    if bar is not None:
        bar.close()
    return out


def summarize(
    measurements: Iterable[Measurement], baseline: str | None = None, img_size: int | None = None
) -> list[Summary]:
    """Best layout per (model, impl) and mode; ratios to ``baseline`` ('model' or 'model:impl', default eager).

    MACs are counted at ``img_size`` (default: each measurement's size). The paper's top-1 comes with the model; its
    A100 and 2080Ti throughputs only where the paper printed the model at the measured size."""
    from .complexity import count_macs, count_params

    rows: dict[tuple[str, str], Summary] = {}
    sizes: dict[tuple[str, int], tuple[float, float]] = {}
    for m in measurements:
        size = img_size or m.img_size
        if (m.model, size) not in sizes:
            net = build_model(m.model)
            sizes[m.model, size] = (count_params(net) / 1e6, count_macs(net, (3, size, size)) / 1e9)
        key = (m.model, m.impl)
        if key not in rows:
            sized = paper_row(m.model, m.img_size)
            top1 = sized.top1 if sized else (paper_row(m.model) or PaperRow()).top1
            p = sized or PaperRow()
            rows[key] = Summary(m.model, m.impl, *sizes[m.model, size], paper_top1=top1, paper_train=p.a100_train,
                                paper_infer=p.a100_infer, paper_train_2080ti=p.rtx2080ti_train,
                                paper_infer_2080ti=p.rtx2080ti_infer, img_size=m.img_size)  # fmt: skip
        row = rows[key]
        if m.img_per_s is None:
            continue
        if (getattr(row, m.mode) or 0) < m.img_per_s:
            setattr(row, m.mode, m.img_per_s)
            setattr(row, f"{m.mode}_layout", m.layout)
            row.batch_size = m.batch_size
    for row in rows.values():
        if row.infer is not None:
            row.gflops_per_s = 2 * row.macs_g * row.infer
    if baseline:
        bname, _, bimpl = baseline.partition(":")
        ref = rows.get((bname, bimpl or "eager"))
        if ref is None:
            raise ValueError(f"baseline {baseline!r} is not among the measured (model, impl) pairs")
        for row in rows.values():
            row.infer_ratio = row.infer / ref.infer if row.infer and ref.infer else None
            row.train_ratio = row.train / ref.train if row.train and ref.train else None
    return list(rows.values())


def _fmt(v: float | None, spec: str) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def format_table(rows: Sequence[Summary], baseline: str | None = None) -> str:
    head = f"{'model':<30} {'impl':<11} {'params':>7} {'MACs':>6} {'infer':>9} {'train':>8}"
    if baseline:
        head += f" {'infer x':>8} {'train x':>8}"
    head += f" {'GFLOP/s':>8} {'layout (infer/train)':<28} {'paper top1':>10}"
    head += f" {'paper A100 train/infer':>22} {'paper 2080Ti train/infer':>24}"
    lines = [head, "-" * len(head)]
    for r in rows:
        line = (
            f"{r.model:<30} {r.impl:<11} {_fmt(r.params_m, '7.1f')} {_fmt(r.macs_g, '6.2f')} "
            f"{_fmt(r.infer, '9.1f')} {_fmt(r.train, '8.1f')}"
        )
        if baseline:
            line += f" {_fmt(r.infer_ratio, '8.2f')} {_fmt(r.train_ratio, '8.2f')}"
        layouts = f"{r.infer_layout or '-'}/{r.train_layout or '-'}"
        line += f" {_fmt(r.gflops_per_s, '8.1f')} {layouts:<28} {_fmt(r.paper_top1, '10.1f')}"
        a100 = f"{_fmt(r.paper_train, 'd')}/{_fmt(r.paper_infer, 'd')}"
        rtx = f"{_fmt(r.paper_train_2080ti, 'd')}/{_fmt(r.paper_infer_2080ti, 'd')}"
        line += f" {a100:>22} {rtx:>24}"
        lines.append(line)
    lines.append("params in M, MACs in G per image, throughput in images/s (best layout), x = ratio to the baseline")
    lines.append("paper columns: Table 4/1/8 (A100, TF32) and Table 4/5 (2080Ti, FP32) at the measured image size")
    return "\n".join(lines)


def write_csv(measurements: Sequence[Measurement], path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fields = [f for f in Measurement.__dataclass_fields__ if f != "step_ms"]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for m in measurements:
            writer.writerow({k: v for k, v in asdict(m).items() if k != "step_ms"})
    return path


def environment() -> dict[str, Any]:
    import platform

    info: dict[str, Any] = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
    }
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
    return info


def write_json(
    measurements: Sequence[Measurement], rows: Sequence[Summary], path: str | os.PathLike, **extra: Any
) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "environment": environment(),
        **extra,
        "summary": [asdict(r) for r in rows],
        "measurements": [asdict(m) for m in measurements],
    }
    path.write_text(json.dumps(payload, indent=2))
    return path


def plot_figure1(rows: Sequence[Summary], path: str | os.PathLike, mode: str = "train", title: str = "") -> Path:
    """Figure 1 of the paper on this machine: the paper's top-1 against the measured throughput."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = [r for r in rows if r.paper_top1 is not None and getattr(r, mode)]
    if not pts:
        raise ValueError(f"no measured {mode} throughput with a paper top-1 to plot")
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for r in pts:
        ours = "inception" in r.model
        x, y = getattr(r, mode), r.paper_top1
        label = r.model if r.impl == "eager" else f"{r.model} ({r.impl})"
        ax.scatter(x, y, s=70 if ours else 40, c="tab:red" if ours else "tab:blue", marker="*" if ours else "o",
                   zorder=3)  # fmt: skip
        # a neighbour just to the right at about the same height: write this label on the left instead
        crowded = any(1 <= getattr(o, mode) / x < 1.6 and abs(o.paper_top1 - y) < 0.5 for o in pts if o is not r)
        ax.annotate(label, (x, y), textcoords="offset points", xytext=(-5 if crowded else 5, -9 if ours else 4),
                    ha="right" if crowded else "left", fontsize=7)  # fmt: skip
    xs = [getattr(r, mode) for r in pts]
    if max(xs) / min(xs) > 8:
        ax.set_xscale("log")
    ax.set_xlabel(f"{'training' if mode == 'train' else 'inference'} throughput measured here (img/s)")
    ax.set_ylabel("ImageNet-1K top-1 (%) as printed in the paper")
    ax.set_title(title or f"Accuracy vs {mode} throughput")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path
