"""``inceptionnext export``: ONNX / TorchScript files with a parity check against the eager model; int8 (calibrated,
ONNX) and bf16 (TorchScript) files for CPU deployment."""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from ..errors import UserError
from .options import add_model_source, load_model_from_args, positive_int

_SUFFIX = {"onnx": ".onnx", "torchscript": ".pt"}
_FILE_SUFFIXES = (".onnx", ".pt", ".pth", ".ts", ".torchscript")


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "export",
        help="ONNX / TorchScript export with a parity check against the eager model",
        description="Export a classifier (this package's or timm's) to ONNX (dynamic batch, weights in one file, "
        "preprocessing in the metadata) and/or TorchScript, then check the file against eager torch on other batch "
        "sizes. This package's models are exported with BatchNorm/LayerScale folded (inceptionnext.fuse).",
    )
    add_model_source(p)
    p.add_argument(
        "--format",
        choices=["onnx", "torchscript", "both"],
        default=None,
        help="default: onnx (fp32, int8), torchscript (bf16)",
    )
    p.add_argument(
        "--output",
        default=".",
        help="a folder (files named after the model) or a file (.onnx / .pt; with --format both, the stem of both)",
    )
    p.add_argument("--image-size", type=int, default=None, help="H = W of the graph (default: the model's input size)")
    p.add_argument("--batch-size", type=int, default=2, help="batch of the example input (the batch stays dynamic)")
    p.add_argument(
        "--opset", type=int, default=None, help="ONNX opset (default: the exporter's; < 18: legacy exporter)"
    )
    p.add_argument("--exporter", choices=["auto", "dynamo", "torchscript"], default="auto", help="ONNX exporter")
    p.add_argument("--no-fuse", action="store_true", help="export this package's models without folding BN/LayerScale")
    p.add_argument("--no-check", action="store_true", help="skip onnx.checker and the parity check")
    p.add_argument("--atol", type=float, default=1e-4, help="max abs difference of the logits allowed by the check")
    from ..quantize import CALIBRATION_METHODS, DEFAULT_FP32_OPS, DEFAULT_METHOD, FP32_OP_GROUPS

    q = p.add_argument_group("reduced precision (docs/export.md: measured accuracy cost and speed)")
    q.add_argument(
        "--precision",
        choices=["fp32", "int8", "bf16"],
        default="fp32",
        help="int8: ONNX, onnxruntime static QDQ quantization calibrated on --calibration; bf16: TorchScript run "
        "under torch.autocast (onnxruntime has no bf16 CPU kernels)",
    )
    q.add_argument(
        "--calibration",
        default=None,
        metavar="DATA",
        help="int8 calibration images: an ImageFolder root (its train/, else val/), a folder of class folders or of "
        "images, a .npy of preprocessed (N, C, H, W) images, or 'digits'; bf16: images for the agreement check",
    )
    q.add_argument("--calibration-batches", type=positive_int, default=8, help="calibration batches (default 8)")
    q.add_argument("--calibration-batch-size", type=positive_int, default=16, help="images per batch (default 16)")
    q.add_argument("--calibration-method", choices=CALIBRATION_METHODS, default=DEFAULT_METHOD)
    q.add_argument(
        "--fp32-ops",
        nargs="+",
        choices=FP32_OP_GROUPS,
        default=list(DEFAULT_FP32_OPS),
        help=f"node groups left in fp32 in the int8 file (default: {' '.join(DEFAULT_FP32_OPS)})",
    )
    q.add_argument(
        "--min-agreement",
        type=float,
        default=0.9,
        help="fail when the reduced-precision file's top-1 agrees with fp32 on fewer of the calibration images "
        "(default 0.9; 0 for randomly initialised weights)",
    )
    q.add_argument(
        "--from-onnx",
        default=None,
        metavar="FILE",
        help="--precision int8: quantize this fp32 .onnx file (e.g. an earlier export) instead of exporting a model",
    )
    return p


def output_paths(output: str, name: str, formats: list[str], precision: str = "fp32") -> dict[str, Path]:
    """``--output`` as a file (one format, or the stem of both) or a folder (files named after the model, with
    ``_int8`` / ``_bf16`` for reduced precision)."""
    out = Path(output)
    if out.suffix.lower() in _FILE_SUFFIXES and not out.is_dir():
        if len(formats) == 1:
            if (formats[0] == "onnx") != (out.suffix.lower() == ".onnx"):
                raise UserError(f"--output {out}: use a .onnx file for --format onnx and a .pt file for torchscript")
            return {formats[0]: out}
        return {f: out.with_suffix(_SUFFIX[f]) for f in formats}
    stem = re.sub(r"[^\w.-]+", "_", name).strip("_") or "model"
    stem += "" if precision == "fp32" else f"_{precision}"
    return {f: out / f"{stem}{_SUFFIX[f]}" for f in formats}


def run(args: argparse.Namespace) -> int:
    """0 when every file was written and passed its check, 1 on an export or parity failure."""
    from ..export import ExportError, export_onnx, export_torchscript
    from ..models import MetaNeXt
    from ..reparam import fuse

    if args.atol < 0:
        raise UserError(f"--atol must be >= 0, got {args.atol}")
    formats = _formats(args)
    if args.from_onnx:
        return _quantize_file(args)
    loaded = load_model_from_args(args)
    paths = output_paths(args.output, loaded.name, formats, args.precision)
    fused = not args.no_fuse and isinstance(loaded.model, MetaNeXt)
    # plain 1x1 convolutions in the fused graph: no oneDNN-only ops in the file
    model = fuse(loaded.model, primitive="conv") if fused else loaded.model
    pre = dict(loaded.preprocessing)
    image_size = args.image_size or tuple(pre.get("input_size", (3, 224, 224)))
    meta = {k: v for k, v in pre.items() if k != "input_size"}
    meta.update(model_name=loaded.name, class_names=loaded.class_names, weights=loaded.weights)
    # the parity check compares the file with the model as loaded (unfused): it covers folding and export together
    common = dict(image_size=image_size, batch_size=args.batch_size, check=not args.no_check, atol=args.atol,
                  metadata=meta, reference=loaded.model)  # fmt: skip
    print(f"exporting {loaded.name} [{loaded.weights}]{' with BatchNorm/LayerScale folded' if fused else ''}")
    if args.precision != "fp32":
        return _export_reduced(args, loaded, model, paths[formats[0]], common)
    try:
        for fmt in formats:
            if fmt == "onnx":
                report = export_onnx(model, paths[fmt], opset=args.opset, exporter=args.exporter, **common)
            else:
                report = export_torchscript(model, paths[fmt], **common)
            print(f"  {report.summary()}")
            for note in report.notes:
                print(f"  note: {note}")
    except ExportError as e:  # the model does not export or the file disagrees with it: a failed run, not bad input
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


def _formats(args: argparse.Namespace) -> list[str]:
    """The formats to write; int8 is ONNX only, bf16 TorchScript only (measured: docs/export.md)."""
    if args.precision == "fp32":
        if args.calibration is not None:
            raise UserError("--calibration goes with --precision int8 or bf16")
        if args.from_onnx is not None:
            raise UserError("--from-onnx goes with --precision int8")
        fmt = args.format or "onnx"
        return ["onnx", "torchscript"] if fmt == "both" else [fmt]
    want = "onnx" if args.precision == "int8" else "torchscript"
    if args.format not in (None, want):
        why = (
            "int8 files are ONNX (onnxruntime's quantized kernels)"
            if args.precision == "int8"
            else "onnxruntime's CPU provider has no bf16 kernels; bf16 files are TorchScript run under torch.autocast"
        )
        raise UserError(f"--precision {args.precision} --format {args.format}: {why}; use --format {want}")
    if args.precision == "int8" and args.calibration is None:
        raise UserError(
            "--precision int8 needs --calibration DATA (an ImageFolder root, a folder of images, a .npy array or "
            "'digits'): the activation ranges are measured on real images"
        )
    if args.calibration is not None:
        from ..quantize import check_calibration_source

        check_calibration_source(args.calibration)
    if args.precision == "bf16" and args.from_onnx:
        raise UserError("--from-onnx goes with --precision int8 (bf16 files are TorchScript, exported from a model)")
    if not 0 <= args.min_agreement <= 1:
        raise UserError(f"--min-agreement must be in [0, 1], got {args.min_agreement}")
    return [want]


def _quant_options(args: argparse.Namespace) -> dict:
    return dict(
        method=args.calibration_method, fp32_ops=tuple(args.fp32_ops), batches=args.calibration_batches,
        batch_size=args.calibration_batch_size, min_agreement=args.min_agreement, check=not args.no_check,
    )  # fmt: skip


def _print_notes(report) -> None:
    print(f"  {report.summary()}")
    for note in report.notes:
        print(f"  note: {note}")


def _quantize_file(args: argparse.Namespace) -> int:
    """``--from-onnx FILE --precision int8``: quantize an existing fp32 ONNX file."""
    from ..export import ExportError
    from ..quantize import quantize_onnx

    if args.model or args.checkpoint or args.pretrained or args.use_ema or args.num_classes is not None:
        raise UserError("--from-onnx replaces --model/--checkpoint/--pretrained: the file carries the model")
    source = Path(args.from_onnx)
    if not source.is_file():
        raise UserError(f"--from-onnx {source}: no such ONNX file")
    out = Path(args.output)
    path = out if out.suffix.lower() == ".onnx" else out / f"{source.stem}_int8.onnx"
    print(f"quantizing {source} to int8")
    try:
        _print_notes(quantize_onnx(source, path, args.calibration, **_quant_options(args)))
    except ExportError as e:  # the quantized file fails its check: a failed run, not bad input
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


def _export_reduced(args: argparse.Namespace, loaded, model, path: Path, common: dict) -> int:
    """int8: export fp32 ONNX to a temporary file and quantize it; bf16: a TorchScript file marked bf16."""
    import tempfile

    from ..export import ExportError, export_onnx
    from ..quantize import export_bf16, quantize_onnx

    try:
        if args.precision == "int8":
            with tempfile.TemporaryDirectory(prefix="inceptionnext-export-") as tmp:
                fp32 = export_onnx(model, Path(tmp) / "fp32.onnx", opset=args.opset, exporter=args.exporter, **common)
                print(f"  fp32 (temporary, quantized below): {fp32.summary()}")
                _print_notes(quantize_onnx(fp32.path, path, args.calibration, **_quant_options(args)))
        else:
            opts = _quant_options(args)
            _print_notes(
                export_bf16(
                    model,
                    path,
                    calibration=args.calibration,
                    batches=opts["batches"],
                    calibration_batch_size=opts["batch_size"],
                    min_agreement=args.min_agreement,
                    **common,
                )  # fmt: skip
            )
    except ExportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0
