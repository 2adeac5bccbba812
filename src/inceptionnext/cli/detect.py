"""``inceptionnext detect train | eval | predict | benchmark``: Mask R-CNN / Faster R-CNN / RetinaNet, COCO or the
embedded digit composites."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..errors import UserError
from .options import add_run_config, parse_size, progress_enabled, resolve_run_config, run_training

_METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def add_parser(subparsers) -> argparse.ArgumentParser:
    from ..detection.config import ARCHS, DET_RECIPES, DetConfig
    from ..engine.config import list_recipes

    p = subparsers.add_parser(
        "detect",
        help="detection / instance segmentation: Mask R-CNN, Faster R-CNN, RetinaNet on COCO or the embedded set",
    )
    det = p.add_subparsers(dest="det_command", required=True)
    q = det.add_parser("train", help="train (torchrun -m inceptionnext detect train ... for several processes)")
    add_run_config(q, DetConfig, list_recipes(DET_RECIPES))
    q = det.add_parser("eval", help="COCO box (and mask) AP of a checkpoint")
    q.add_argument("--checkpoint", required=True)
    q.add_argument("--data", default=None, help="COCO root (default: the checkpoint's own data)")
    q.add_argument("--output", default=None, help="directory for metrics.json and the COCO results JSON")
    q = det.add_parser("predict", help="boxes, masks and class names drawn on images")
    q.add_argument("inputs", nargs="+")
    q.add_argument("--checkpoint", required=True)
    q.add_argument("--output", default="detect_predictions")
    q.add_argument("--score-threshold", type=float, default=0.5, help="draw detections at least this confident")
    q = det.add_parser("benchmark", help="params, MACs (at 1280x800) and img/s")
    q.add_argument("--arch", choices=ARCHS, action="append", help="default: maskrcnn")
    q.add_argument("--backbone", action="append", help="default: inceptionnext_tiny (timm names work: convnext_tiny)")
    q.add_argument("--size", default="800x1280", help="input HxW (default 800x1280, the convention of the tables)")
    q.add_argument("--runs", type=int, default=10, help="timed images (batch 1)")
    q.add_argument("--warmup", type=int, default=2, help="untimed images first")
    q.add_argument("--no-fps", action="store_true", help="only params and MACs")
    return p


def _train(args: argparse.Namespace) -> int:
    from ..detection.config import DetConfig, resolve_det_config
    from ..detection.engine import train_detection

    cfg = resolve_run_config(
        args, DetConfig, resolve_det_config, "digits", "the 'digits' recipe on the embedded digit composites"
    )

    def result(s: dict) -> str:
        best = s["best"]
        return f"best box AP {best['bbox_AP']:.2f} at epoch {best['epoch']}; outputs in {s['output']}"

    return run_training(args, cfg, train_detection, result)


def _eval(args: argparse.Namespace) -> int:
    import torch

    from ..detection.data import EvalPipeline, build_det_dataset
    from ..detection.engine import evaluate_detection
    from ..detection.metrics import write_results
    from ..detection.tools import load_detector

    model, cfg, classes = load_detector(args.checkpoint)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    data = args.data if args.data is not None else cfg.data
    dataset = build_det_dataset(data, "val", EvalPipeline(), seed=cfg.seed)
    if list(dataset.classes) != classes:
        raise UserError(f"the dataset's categories {list(dataset.classes)[:5]}... differ from the checkpoint's")
    metrics, results = evaluate_detection(model, dataset, device, progress=progress_enabled())
    where = data or "digit composites (embedded)"
    print(f"{cfg.arch} + {cfg.backbone} on {where} ({len(dataset)} images, {len(results)} detections)")
    for kind, label in (("bbox", "box"), ("segm", "mask")):
        if f"{kind}_AP" in metrics:
            print(f"  {label:4s} " + "  ".join(f"{m} {metrics[f'{kind}_{m}']:.2f}" for m in _METRICS))
    if args.output:
        out = Path(args.output)
        out.mkdir(parents=True, exist_ok=True)
        write_results(out / "results.json", results)
        (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
    return 0


def _predict(args: argparse.Namespace) -> int:
    from ..detection.tools import predict_images

    if not 0.0 <= args.score_threshold <= 1.0:
        raise UserError("--score-threshold must be in [0, 1]")
    written, problems = predict_images(args.checkpoint, args.inputs, args.output, score_threshold=args.score_threshold)
    for p in problems:
        print(f"skipped: {p}", file=sys.stderr)
    images = sum(1 for w in written if w.suffix == ".png")
    print(f"{images} images; drawings and detections.json in {args.output}")
    return 0 if images else 1


def _benchmark(args: argparse.Namespace) -> int:
    from ..detection.tools import benchmark_detector

    if args.runs < 1 or args.warmup < 0:
        raise UserError("--runs must be >= 1 and --warmup >= 0")
    size = parse_size(args.size, "800x1280")
    print(f"{'detector':40s} {'params (M)':>10s} {'MACs (G)':>9s} {'input':>9s} {'img/s':>7s}")
    for arch in args.arch or ["maskrcnn"]:
        for backbone in args.backbone or ["inceptionnext_tiny"]:
            r = benchmark_detector(arch, backbone, size=size, runs=args.runs, warmup=args.warmup, fps=not args.no_fps)
            speed = f"{r['img_per_s']:.2f}" if "img_per_s" in r else "-"
            print(
                f"{arch + ' + ' + backbone:40s} {r['params'] / 1e6:10.2f} {r['macs'] / 1e9:9.1f} "
                f"{f'{size[1]}x{size[0]}':>9s} {speed:>7s}"
            )
    return 0


def run(args: argparse.Namespace) -> int:
    return {"train": _train, "eval": _eval, "predict": _predict, "benchmark": _benchmark}[args.det_command](args)
