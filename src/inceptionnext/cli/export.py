"""``inceptionnext export``: ONNX / TorchScript files with a parity check against the eager model."""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from ..errors import UserError
from .options import add_model_source, load_model_from_args

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


def output_paths(output: str, name: str, formats: list[str]) -> dict[str, Path]:
    """``--output`` as a file (one format, or the stem of both) or a folder (files named after the model)."""
    out = Path(output)
    if out.suffix.lower() in _FILE_SUFFIXES and not out.is_dir():
        if len(formats) == 1:
            if (formats[0] == "onnx") != (out.suffix.lower() == ".onnx"):
                raise UserError(f"--output {out}: use a .onnx file for --format onnx and a .pt file for torchscript")
            return {formats[0]: out}
        return {f: out.with_suffix(_SUFFIX[f]) for f in formats}
    stem = re.sub(r"[^\w.-]+", "_", name).strip("_") or "model"
    return {f: out / f"{stem}{_SUFFIX[f]}" for f in formats}


def run(args: argparse.Namespace) -> int:
    """0 when every file was written and passed its check, 1 on an export or parity failure."""
    from ..export import ExportError, export_onnx, export_torchscript
    from ..models import MetaNeXt
    from ..reparam import fuse

    if args.atol < 0:
        raise UserError(f"--atol must be >= 0, got {args.atol}")
    formats = ["onnx", "torchscript"] if args.format == "both" else [args.format]
    loaded = load_model_from_args(args)
    paths = output_paths(args.output, loaded.name, formats)
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
