"""``inceptionnext export``: ONNX / TorchScript files with a parity check, and ``predict --onnx``'s model loader."""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

__all__ = ["add_export_parser", "run_export", "load_onnx_for_predict"]

_SUFFIX = {"onnx": ".onnx", "torchscript": ".pt"}
_FILE_SUFFIXES = (".onnx", ".pt", ".pth", ".ts", ".torchscript")


def add_export_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``export`` on the ``inceptionnext`` sub-command parsers."""
    p = subparsers.add_parser(
        "export",
        help="ONNX / TorchScript export with a parity check against the eager model",
        description="Export a classifier (this package's or timm's) to ONNX (dynamic batch, weights in one file, "
        "preprocessing in the metadata) and/or TorchScript, then check the file against eager torch on other batch "
        "sizes. This package's models are exported with BatchNorm/LayerScale folded (inceptionnext.fuse).",
    )
    p.add_argument("--model", default=None, help="model name (this package's, timm's, hf-hub:..., local-dir:...)")
    p.add_argument("--checkpoint", default=None, help="checkpoint (this package's carry model, classes, preprocessing)")
    p.add_argument("--pretrained", action="store_true", help="released weights of --model")
    p.add_argument("--use-ema", action="store_true", help="EMA weights of a training checkpoint")
    p.add_argument("--format", choices=["onnx", "torchscript", "both"], default="onnx")
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
    return p


def _outputs(output: str, name: str, formats: list[str]) -> dict[str, Path]:
    out = Path(output)
    if out.suffix.lower() in _FILE_SUFFIXES and not out.is_dir():
        if len(formats) == 1:
            if (formats[0] == "onnx") != (out.suffix.lower() == ".onnx"):
                raise ValueError(f"--output {out}: use a .onnx file for --format onnx and a .pt file for torchscript")
            return {formats[0]: out}
        return {f: out.with_suffix(_SUFFIX[f]) for f in formats}
    stem = re.sub(r"[^\w.-]+", "_", name).strip("_") or "model"
    return {f: out / f"{stem}{_SUFFIX[f]}" for f in formats}


def _maybe_fuse(model, no_fuse: bool):
    from ..models import MetaNeXt

    if no_fuse or not isinstance(model, MetaNeXt):
        return model, False
    try:
        from ..reparam import fuse
    except ImportError:
        print("note: inceptionnext.fuse is not available; exporting the unfused model", file=sys.stderr)
        return model, False
    try:
        fused = fuse(model, primitive="conv")  # plain 1x1 convolutions: no oneDNN-only ops in the graph
    except TypeError:  # an older fuse() without the primitive option
        fused = fuse(model)
    return (fused if fused is not None else model), True


def run_export(args: argparse.Namespace) -> int:
    """The ``export`` command: 0 when every file was written and passed its check, 1 on export/parity failure."""
    from ..export import ExportError, MissingDependencyError, export_onnx, export_torchscript
    from ..inference import load_model

    if args.checkpoint is None and args.model is None:
        raise ValueError("give --checkpoint PATH and/or --model NAME")
    if args.atol < 0:
        raise ValueError(f"--atol must be >= 0, got {args.atol}")
    formats = ["onnx", "torchscript"] if args.format == "both" else [args.format]
    loaded = load_model(args.model, args.checkpoint, pretrained=args.pretrained, use_ema=args.use_ema)
    paths = _outputs(args.output, loaded.name, formats)
    model, fused = _maybe_fuse(loaded.model, args.no_fuse)
    pre = dict(loaded.preprocessing)
    image_size = args.image_size or tuple(pre.get("input_size", (3, 224, 224)))
    meta = {k: v for k, v in pre.items() if k != "input_size"}
    meta.update(model_name=loaded.name, class_names=loaded.class_names, weights=loaded.weights)
    # the parity check compares the file with the model as loaded (unfused): it covers folding and export together
    common = dict(image_size=image_size, batch_size=args.batch_size, check=not args.no_check, atol=args.atol,
                  metadata=meta, reference=loaded.model)  # fmt: skip
    print(f"exporting {loaded.name} [{loaded.weights}]{' with BatchNorm/LayerScale folded' if fused else ''}")
    try:
        for fmt in formats:
            if fmt == "onnx":
                report = export_onnx(model, paths[fmt], opset=args.opset, exporter=args.exporter, **common)
            else:
                report = export_torchscript(model, paths[fmt], **common)
            print(f"  {report.summary()}")
            for note in report.notes:
                print(f"  note: {note}")
    except MissingDependencyError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except ExportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


def load_onnx_for_predict(args: argparse.Namespace):
    """``predict --onnx FILE``: the file behind the torch ``predict`` interface (preprocessing from its metadata)."""
    from ..export import MissingDependencyError, load_onnx_model

    if args.model or args.checkpoint or args.pretrained:
        raise ValueError("--onnx replaces --model/--checkpoint/--pretrained: the file carries model and preprocessing")
    try:
        return load_onnx_model(args.onnx)
    except MissingDependencyError as e:
        raise ValueError(str(e)) from e
