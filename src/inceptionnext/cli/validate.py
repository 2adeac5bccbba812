"""``inceptionnext validate``: top-1/top-5 of a training checkpoint, of released weights or of an exported file."""

from __future__ import annotations

import argparse
import sys

from .options import add_model_source, positive_int, progress_enabled
from .predict import add_exported, load_exported_from_args


def add_parser(subparsers) -> argparse.ArgumentParser:
    from ..engine.config import AMP_MODES

    p = subparsers.add_parser(
        "validate",
        help="top-1/top-5 of a checkpoint, released weights or an exported file",
        description="Top-1/top-5 on a val set with the model's eval preprocessing. --exported FILE measures an "
        "exported file (fp32/int8 ONNX, fp32/bf16 TorchScript) in the precision it was exported in: run it next to "
        "the checkpoint's own validate on the same --data to see what the precision costs.",
    )
    add_model_source(p)
    add_exported(p)
    p.add_argument("--data", default=None, help="ImageFolder root with val/ (default: the run's data or the digits)")
    p.add_argument("--batch-size", type=positive_int, default=64)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--amp", default="auto", choices=AMP_MODES)
    p.add_argument("--output", default=None, help="directory for results.json and results.csv")
    p.add_argument(
        "--crop-pct",
        type=float,
        default=None,
        help="eval center-crop ratio instead of the model's (e.g. 0.95, timm's setting for inceptionnext_base; "
        "the official code and the paper's 84.0 use 0.875)",
    )
    return p


def run(args: argparse.Namespace) -> int:
    from ..engine import validate

    loaded = load_exported_from_args(args) if args.exported else None
    result = validate(
        args.model,
        args.checkpoint,
        loaded=loaded,
        pretrained=args.pretrained,
        data=args.data,
        use_ema=args.use_ema,
        batch_size=args.batch_size,
        workers=args.workers,
        amp=args.amp,
        output=args.output,
        progress=progress_enabled(),
        num_classes=args.num_classes,
        crop_pct=args.crop_pct,
    )
    print(
        f"{result['model']} on {result['data']} ({result['count']} images, {result['img_size']}px, "
        f"crop_pct {result['crop_pct']}): top-1 {result['top1']:.2f}%  top-5 {result['top5']:.2f}%  "
        f"loss {result['loss']:.4f}  [{result['weights']}]"
        + (f"  precision {result['precision']}" if "precision" in result else "")
    )
    skipped = result["skipped_images"]
    if skipped:
        if args.output:
            where = f"listed in {args.output}/skipped_images.txt"
        else:
            more = f" ... ({len(skipped)} in all; --output DIR lists them all)" if len(skipped) > 5 else ""
            where = "they are " + ", ".join(skipped[:5]) + more
        print(
            f"{len(skipped)} unreadable image(s) left out (the accuracy is over the {result['count']} readable ones); "
            f"{where}",
            file=sys.stderr,
        )
    return 0
