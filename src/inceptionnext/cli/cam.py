"""``inceptionnext cam``: class activation maps (Grad-CAM & co.) of one or more models, as a Figure-4 grid."""

from __future__ import annotations

import argparse
import sys

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
    from ..inference import find_images, load_model
    from ..tools.cam import cam_grid

    models = []
    for spec in args.model:
        name, _, ckpt = spec.partition("=")
        loaded = load_model(name or None, ckpt or None, pretrained=args.pretrained and not ckpt, use_ema=args.use_ema)
        models.append((loaded.name, loaded))
    images, problems = find_images(args.images)
    grid, overlays, more = cam_grid(images, models, args.output, method=args.method, target_class=args.target_class,
                                    layer=args.layer, progress=progress_enabled())  # fmt: skip
    for p in problems + more:
        print(f"skipped: {p}", file=sys.stderr)
    print(f"{len(overlays)} overlays and the grid {grid} written to {args.output}")
    return 0
