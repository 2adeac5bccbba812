"""``inceptionnext cam``: class activation maps (Grad-CAM & co.) of one or more models, as a Figure-4 grid."""

from __future__ import annotations

import argparse
import sys
from collections import Counter

from .options import progress_enabled


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("cam", help="class activation maps (Grad-CAM & co.) of one or more models, Figure-4 grid")
    p.add_argument("images", nargs="+", help="image files and/or folders")
    p.add_argument(
        "--model",
        action="append",
        required=True,
        metavar="NAME[=CHECKPOINT]",
        help="a column of the grid; repeat for several models (this package's or timm's)",
    )
    p.add_argument("--pretrained", action="store_true", help="load the released weights of models without checkpoint")
    p.add_argument(
        "--method", default="gradcam", help="gradcam, gradcam++, hirescam, xgradcam, layercam, eigencam, ..."
    )
    p.add_argument("--target-class", type=int, default=None, help="class index (default: each model's prediction)")
    p.add_argument("--layer", default=None, help="target module name (default: the last stage)")
    p.add_argument("--use-ema", action="store_true")
    p.add_argument("--output", default="cam", help="directory for the overlays and cam_grid.png")
    return p


def run(args: argparse.Namespace) -> int:
    from ..errors import ConfigError
    from ..inference import find_images, load_model, unique_names
    from ..tools.cam import cam_grid

    specs = [spec.partition("=")[::2] for spec in args.model]
    if args.use_ema and not any(ckpt for _, ckpt in specs):
        raise ConfigError("--use-ema takes the EMA weights of a checkpoint: give one (--model NAME=CHECKPOINT)")
    loaded = [
        load_model(name or None, ckpt or None, pretrained=args.pretrained and not ckpt, use_ema=args.use_ema)
        if ckpt
        else load_model(name or None, pretrained=args.pretrained)
        for name, ckpt in specs
    ]
    # a column per model, titled by its name, and by its checkpoint where several share a name
    ckpt_names = dict(zip(range(len(specs)), unique_names([ckpt or "weights" for _, ckpt in specs])))
    counts = Counter(m.name for m in loaded)
    models = [
        (m.name if counts[m.name] == 1 else f"{m.name} ({ckpt_names[i] if specs[i][1] else m.weights})", m)
        for i, m in enumerate(loaded)
    ]
    images, problems = find_images(args.images)
    grid, overlays, more = cam_grid(images, models, args.output, method=args.method, target_class=args.target_class,
                                    layer=args.layer, progress=progress_enabled())  # fmt: skip
    for p in problems + more:
        print(f"skipped: {p}", file=sys.stderr)
    print(f"{len(overlays)} overlays and the grid {grid} written to {args.output}")
    return 0
