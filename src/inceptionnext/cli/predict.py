"""``inceptionnext predict``: top-k classes of images or folders, from a model, a checkpoint or an exported file."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..errors import UserError
from .options import add_model_source, load_model_from_args, positive_int, progress_enabled


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("predict", help="top-k classes of images or folders of images")
    p.add_argument("inputs", nargs="+", help="image files and/or folders (searched recursively)")
    add_model_source(p)
    p.add_argument("--topk", type=positive_int, default=5)
    p.add_argument("--batch-size", type=positive_int, default=32)
    p.add_argument("--format", choices=["table", "json"], default="table")
    p.add_argument("--output", default=None, help="also write the JSON report to this file")
    add_exported(p)
    return p


def add_exported(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--exported",
        "--onnx",
        default=None,
        metavar="FILE",
        help="run an exported file instead: .onnx (fp32 or int8) with onnxruntime, a TorchScript .pt (fp32 or bf16) "
        "with torch",
    )


def load_exported_from_args(args: argparse.Namespace):
    """The exported file behind the torch interface (preprocessing and classes from its metadata)."""
    from ..serve import load_exported_model

    if args.model or args.checkpoint or args.pretrained or args.use_ema or args.num_classes is not None:
        raise UserError(
            "--exported/--onnx replaces --model/--checkpoint/--pretrained/--use-ema/--num-classes: the file carries "
            "model, weights and preprocessing"
        )
    return load_exported_model(args.exported)


def run(args: argparse.Namespace) -> int:
    from ..tools.predict import format_predictions, predict

    loaded = load_exported_from_args(args) if args.exported else load_model_from_args(args)
    report = predict(loaded, args.inputs, topk=args.topk, batch_size=args.batch_size, progress=progress_enabled())
    text = json.dumps(report.to_dict(), indent=1)
    if args.output:
        Path(args.output).write_text(text)
    print(text if args.format == "json" else format_predictions(report))
    return 0 if report.predictions else 1
