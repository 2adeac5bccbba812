"""Throughput the way the paper measures it (Tables 1, 4, 5, 8; Figure 1).

Protocol (paper, Table 4 caption): synthetic batches of 224x224 images, batch 128 reduced until the device can host
it, channels-first and channels-last both measured and the better one reported. Each measurement warms up, then times
single steps (with ``torch.cuda.synchronize`` on GPU) and reports images / median step time. Training steps are
forward + cross-entropy + backward + AdamW step; inference steps are forward under ``torch.inference_mode``.

Implementations (``impl``):

* ``eager``: the model as built (this package's or timm's).
* ``fused``: this package's models after :func:`inceptionnext.fuse` (inference only).
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
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = [
    "PEERS",
    "Measurement",
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
]

IMPLS = ("eager", "fused", "compile", "onnxruntime")
MODES = ("infer", "train")
PRECISIONS = ("fp32", "tf32", "bf16", "fp16")
LAYOUTS = ("channels_first", "channels_last")


@dataclass(frozen=True)
class PeerFigures:
    """A timm model's row of Table 4 (A100, TF32, batch 128), as printed."""

    label: str
    top1: float
    train: int | None
    infer: int | None


# Table 4 of the paper; timm names of the same architectures.
PEERS: dict[str, PeerFigures] = {
    "mobilenetv2_140": PeerFigures("MobileNetV2 (1.4)", 74.7, 1001, 5190),
    "efficientnet_b0": PeerFigures("EfficientNet-B0", 77.1, 954, 5502),
    "ghostnet_130": PeerFigures("GhostNet 1.3x", 75.7, 946, 7451),
    "convnext_atto": PeerFigures("ConvNeXt-A", 75.7, 835, 4539),
    "deit_small_patch16_224": PeerFigures("DeiT-S", 79.8, 1227, 3781),
    "swin_tiny_patch4_window7_224": PeerFigures("Swin-T", 81.3, 564, 1768),
    "resnet50": PeerFigures("ResNet-50", 78.4, 969, 3149),
    "regnety_040": PeerFigures("RegNetY-4G", 81.3, 670, 2694),
    "convnext_tiny": PeerFigures("ConvNeXt-T", 82.1, 575, 2413),
    "swin_small_patch4_window7_224": PeerFigures("Swin-S", 83.0, 359, 1131),
    "resnet101": PeerFigures("RSB-ResNet-101", 81.3, 620, 2057),
    "regnety_080": PeerFigures("RegNetY-8G", 82.1, 689, 1326),
    "convnext_small": PeerFigures("ConvNeXt-S", 83.1, 361, 1535),
    "deit_base_patch16_224": PeerFigures("DeiT-B", 81.8, 541, 1608),
    "swin_base_patch4_window7_224": PeerFigures("Swin-B", 83.5, 271, 843),
    "resnet152": PeerFigures("RSB-ResNet-152", 81.8, 437, 1457),
    "regnety_160": PeerFigures("RegNetY-16G", 82.2, 322, 1100),
    "convnext_base": PeerFigures("ConvNeXt-B", 83.8, 267, 1122),
}

# timm's own implementation of the paper's models: the figures are those of this package's variant of that name
_TIMM_TWINS = {f"inception_next_{s}": f"inceptionnext_{s}" for s in ("atto", "tiny", "small", "base")}


def paper_figures(name: str) -> tuple[float | None, int | None, int | None]:
    """(top-1, train img/s, infer img/s) printed in the paper for a model name of this package or a timm peer."""
    from .models import is_model
    from .models.registry import get_entry

    name = _TIMM_TWINS.get(name.split(".")[0], name)
    if is_model(name):
        p = get_entry(name).paper
        return (p.top1, p.train_throughput, p.infer_throughput) if p else (None, None, None)
    peer = PEERS.get(name.split(".")[0])
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
    paper_train: int | None = None
    paper_infer: int | None = None
    gflops_per_s: float | None = None


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
    if impl == "onnxruntime":
        return _onnxruntime_step(model, x)
    model = model.to(device=device, memory_format=_memory_format(layout))
    if impl == "compile":
        model = torch.compile(model, options={"freezing": True} if device.type == "cpu" else None)

    def step() -> None:
        with torch.inference_mode():
            model(x)

    return step


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


def _training_step(model: nn.Module, device: torch.device, layout: str, x: torch.Tensor, impl: str, precision: str):
    if impl in ("fused", "onnxruntime"):
        raise ValueError(f"impl {impl!r} is inference only")
    model = model.to(device=device, memory_format=_memory_format(layout)).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    forward = torch.compile(model) if impl == "compile" else model
    n_cls = getattr(model, "num_classes", 1000) or 1000
    target = torch.randint(0, n_cls, (x.shape[0],), device=device)

    def step() -> None:
        with precision_mode(precision, device):
            loss = nn.functional.cross_entropy(forward(x), target)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()

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


def measure(
    name: str,
    *,
    impl: str = "eager",
    mode: str = "infer",
    layout: str = "channels_first",
    precision: str = "fp32",
    device: str | torch.device = "auto",
    batch_size: int = 128,
    img_size: int = 224,
    warmup: int = 5,
    steps: int = 20,
    model: nn.Module | None = None,
) -> Measurement:
    """Time one configuration; on out-of-memory halve the batch until it fits (the paper's protocol).

    ``model`` may be given to reuse an already built instance (it is not modified for inference; training moves it
    and updates its weights).
    """
    if impl not in IMPLS:
        raise ValueError(f"unknown impl {impl!r}: use one of {', '.join(IMPLS)}")
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}: use 'infer' or 'train'")
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}: use one of {', '.join(PRECISIONS)}")
    dev = resolve_device(device)
    if impl == "onnxruntime" and (dev.type != "cpu" or precision not in ("fp32", "tf32")):
        raise ValueError("impl 'onnxruntime' is the CPU fp32 serving path: use --device cpu --precision fp32")
    base = model if model is not None else build_model(name)
    m = Measurement(name, impl, mode, layout, precision, dev.type, img_size, batch_size)
    bs = batch_size
    while True:
        try:
            in_chans = getattr(base, "in_chans", 3)
            x = torch.randn(bs, in_chans, img_size, img_size, device=dev)
            x = x.contiguous(memory_format=_memory_format(layout))
            if mode == "infer":
                inner = _inference_step(base, name, impl, dev, layout, x)

                def step(inner=inner) -> None:
                    with precision_mode(precision, dev):
                        inner()
            else:
                step = _training_step(base, dev, layout, x, impl, precision)
            times = time_steps(step, dev, warmup, steps)
            break
        except Exception as err:  # noqa: BLE001 - OOM backoff, anything else is reported in the row
            step = inner = x = None
            if dev.type == "cuda":
                torch.cuda.empty_cache()
            if _is_oom(err) and bs > 1:
                bs //= 2
                continue
            m.error = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"[:300]
            return m
    m.batch_size = bs
    m.step_ms = [t * 1e3 for t in times]
    m.step_ms_median = statistics.median(m.step_ms)
    m.img_per_s = bs / (m.step_ms_median / 1e3)
    return m


def tune_glibc_malloc() -> None:
    """Make glibc serve every allocation from its heap and keep freed memory (``mallopt(M_MMAP_MAX, 0)``,
    ``M_TRIM_THRESHOLD`` at its maximum), as ``MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=...`` would at start-up.

    By default glibc maps every allocation above 32 MiB afresh, so each large activation of an eager CPU forward pass
    is page-faulted and zeroed by the kernel: at 224 px and batch 32 that halves the throughput of an eager
    InceptionNeXt-T. This affects every model in the process equally (it is not specific to this package) and keeps
    the peak memory of the process reserved. Raises ``RuntimeError`` where the C library is not glibc.
    """
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError as e:
        raise RuntimeError(f"tune_glibc_malloc needs glibc: {e}") from None
    m_trim_threshold, m_mmap_max = -1, -4
    if not (libc.mallopt(m_mmap_max, 0) and libc.mallopt(m_trim_threshold, 2**31 - 1)):
        raise RuntimeError("mallopt failed: is this glibc?")


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
    precision: str = "fp32",
    device: str | torch.device = "auto",
    batch_size: int = 128,
    img_size: int = 224,
    warmup: int = 5,
    steps: int = 20,
    progress: bool = True,
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
        if impl == "fused" and name not in built:
            built[name] = build_model(name)
        if impl == "fused" and not _is_ours(built[name]):
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
            )  # fmt: skip
        )
        if bar is not None:
            bar.update()
    if bar is not None:
        bar.close()
    return out


def summarize(measurements: Iterable[Measurement], baseline: str | None = None, img_size: int = 224) -> list[Summary]:
    """Best layout per (model, impl) and mode; ratios to ``baseline`` ('model' or 'model:impl', default eager)."""
    from .complexity import count_macs, count_params

    rows: dict[tuple[str, str], Summary] = {}
    sizes: dict[str, tuple[float, float]] = {}
    for m in measurements:
        if m.model not in sizes:
            net = build_model(m.model)
            sizes[m.model] = (count_params(net) / 1e6, count_macs(net, (3, img_size, img_size)) / 1e9)
        key = (m.model, m.impl)
        if key not in rows:
            top1, ptrain, pinfer = paper_figures(m.model)
            rows[key] = Summary(m.model, m.impl, *sizes[m.model], paper_top1=top1, paper_train=ptrain,
                                paper_infer=pinfer)  # fmt: skip
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
        lines.append(line)
    lines.append("params in M, MACs in G per image, throughput in images/s (best layout), x = ratio to the baseline")
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
