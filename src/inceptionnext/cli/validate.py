"""``inceptionnext validate``: top-1/top-5 of a training checkpoint or of released weights."""

from __future__ import annotations

import argparse

from .options import add_model_source


def add_parser(subparsers) -> argparse.ArgumentParser:
    from ..engine.config import AMP_MODES

    p = subparsers.add_parser("validate", help="top-1/top-5 of a checkpoint or released weights")
    add_model_source(p)
    p.add_argument("--data", default=None, help="ImageFolder root with val/ (default: the run's data or the digits)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--amp", default="auto", choices=AMP_MODES)
    p.add_argument("--output", default=None, help="directory for results.json and results.csv")
    return p


def run(args: argparse.Namespace) -> int:
    from ..engine import validate

    result = validate(
        args.model,
        args.checkpoint,
        pretrained=args.pretrained,
        data=args.data,
        use_ema=args.use_ema,
        batch_size=args.batch_size,
        workers=args.workers,
        amp=args.amp,
        output=args.output,
    )
    print(
        f"{result['model']} on {result['data']} ({result['count']} images, {result['img_size']}px, "
        f"crop_pct {result['crop_pct']}): top-1 {result['top1']:.2f}%  top-5 {result['top5']:.2f}%  "
        f"loss {result['loss']:.4f}  [{result['weights']}]"
    )
    return 0
