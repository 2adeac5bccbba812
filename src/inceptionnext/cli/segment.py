"""``inceptionnext segment train | eval | predict | benchmark``: UperNet / Semantic FPN, ADE20K or the embedded set."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..errors import UserError
from .options import add_run_config, parse_size, progress_enabled, resolve_run_config, run_training


def add_parser(subparsers) -> argparse.ArgumentParser:
    from ..engine.config import list_recipes
    from ..segmentation.config import EVAL_MODES, HEADS, SEG_RECIPES, SegConfig

    p = subparsers.add_parser(
        "segment", help="semantic segmentation: UperNet / Semantic FPN on ADE20K or the embedded set"
    )
    seg = p.add_subparsers(dest="seg_command", required=True)
    q = seg.add_parser("train", help="train (torchrun -m inceptionnext segment train ... for several processes)")
    add_run_config(q, SegConfig, list_recipes(SEG_RECIPES))
    q = seg.add_parser("eval", help="mIoU / mAcc / aAcc of a checkpoint")
    q.add_argument("--checkpoint", required=True)
    q.add_argument("--data", default=None, help="ADEChallengeData2016 root (default: the checkpoint's own data)")
    q.add_argument("--mode", choices=EVAL_MODES, default=None, help="default: the checkpoint's eval_mode")
    q.add_argument("--aug-test", action="store_true", help="multi-scale (0.5-1.75) + flip")
    q.add_argument("--output", default=None, help="directory for results.json (with per-class IoU)")
    q = seg.add_parser("predict", help="colour-coded masks overlaid on images")
    q.add_argument("inputs", nargs="+")
    q.add_argument("--checkpoint", required=True)
    q.add_argument("--output", default="segment_predictions")
    q = seg.add_parser("benchmark", help="params, MACs and FPS as Tables 6 and 7 measure them")
    q.add_argument("--head", choices=HEADS, action="append", help="default: both")
    q.add_argument("--backbone", action="append", help="default: inceptionnext_tiny, _small, _base")
    q.add_argument(
        "--data", default=None, help="ADEChallengeData2016 root: FPS over its val images resized to fit 2048x512"
    )
    q.add_argument("--size", default=None, help="synthetic FPS image HxW without --data (default 512x683)")
    q.add_argument("--runs", type=int, default=None, help="timed images (default: mmseg's 195)")
    q.add_argument("--warmup", type=int, default=None, help="untimed images first (default: mmseg's 5)")
    q.add_argument("--mode", choices=EVAL_MODES, default="whole", help="whole image (default) or sliding windows")
    q.add_argument("--no-fps", action="store_true", help="only params and MACs (meta device, instant)")
    return p


def _train(args: argparse.Namespace) -> int:
    from ..segmentation.config import SegConfig, resolve_seg_config
    from ..segmentation.engine import train_segmentation

    cfg = resolve_run_config(
        args, SegConfig, resolve_seg_config, "textures", "the 'textures' recipe on the embedded texture mosaics"
    )
    return run_training(
        args,
        cfg,
        train_segmentation,
        lambda s: f"best mIoU {s['best']['mIoU']:.2f}% at step {s['best']['step']}; outputs in {s['output']}",
    )


def _eval(args: argparse.Namespace) -> int:
    import torch

    from ..segmentation.data import EvalPipeline, build_seg_dataset
    from ..segmentation.engine import evaluate_segmentation
    from ..segmentation.tools import load_segmentor

    model, cfg, classes = load_segmentor(args.checkpoint)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    data = args.data if args.data is not None else cfg.data
    dataset = build_seg_dataset(data, "val", EvalPipeline(scale=tuple(cfg.scale)), seed=cfg.seed)
    if list(dataset.classes) != classes:
        raise UserError(f"the dataset's classes {list(dataset.classes)[:5]}... differ from the checkpoint's")
    mode = args.mode or cfg.eval_mode
    res = evaluate_segmentation(
        model,
        dataset,
        device,
        mode=mode,
        crop=tuple(cfg.slide_crop),
        stride=tuple(cfg.slide_stride),
        aug_test=args.aug_test,
        progress=progress_enabled(),
    )
    print(
        f"{cfg.head} + {cfg.backbone} on {data or 'texture mosaics (embedded)'} ({len(dataset)} images, "
        f"{mode}{', ms+flip' if args.aug_test else ''}): mIoU {res['mIoU']:.2f}  "
        f"mAcc {res['mAcc']:.2f}  aAcc {res['aAcc']:.2f}"
    )
    for name, iou in zip(classes, res["IoU"]):
        print(f"  {name:24s} IoU {iou:6.2f}")
    if args.output:
        Path(args.output).mkdir(parents=True, exist_ok=True)
        per_class = dict(zip(classes, res["IoU"]))
        out = {k: v for k, v in res.items() if k not in ("IoU", "Acc")} | {"per_class_IoU": per_class}
        (Path(args.output) / "results.json").write_text(json.dumps(out, indent=1))
    return 0


def _predict(args: argparse.Namespace) -> int:
    from ..segmentation.tools import predict_masks

    written, problems = predict_masks(args.checkpoint, args.inputs, args.output)
    for p in problems:
        print(f"skipped: {p}", file=sys.stderr)
    print(f"{len(written) // 2} images segmented; masks and overlays in {args.output}")
    return 0 if written else 1


def _benchmark(args: argparse.Namespace) -> int:
    from ..segmentation.config import HEADS
    from ..segmentation.tools import SEG_FPS_IMAGES, SEG_FPS_WARMUP, benchmark_segmentor

    heads = args.head or list(HEADS)
    backbones = args.backbone or ["inceptionnext_tiny", "inceptionnext_small", "inceptionnext_base"]
    size = parse_size(args.size, "512x683")
    if args.data is not None and size is not None:
        raise UserError("--size is the synthetic image's; with --data the images keep their own sizes")
    if (args.runs is not None and args.runs < 1) or (args.warmup is not None and args.warmup < 0):
        raise UserError("--runs must be >= 1 and --warmup >= 0")
    if args.data is not None and not Path(args.data).is_dir():
        raise UserError(f"--data {args.data} is not a folder (an ADEChallengeData2016 root)")
    print(
        f"{'segmentor':34s} {'params (M)':>10s} {'paper':>6s} {'MACs (G)':>9s} {'paper':>6s} {'input':>9s} "
        f"{'FPS':>7s} {'paper FPS (2080Ti)':>18s}"
    )
    sources = set()
    for head in heads:
        for backbone in backbones:
            r = benchmark_segmentor(
                head, backbone, runs=args.runs, warmup=args.warmup, fps=not args.no_fps, data=args.data, size=size,
                mode=args.mode,
            )  # fmt: skip
            p = r["paper"]
            fps = f"{r['fps']:.2f}" if r.get("fps") else "-"
            if r.get("fps"):
                sources.add((r["fps_input"], r["fps_images"], r["fps_warmup"], r["device"]))
            print(
                f"{head + ' + ' + backbone:34s} {r['params_m']:10.2f} {p.get('params_m', '-'):>6s} "
                f"{r['macs_g']:9.1f} {p.get('macs_g', '-'):>6s} {r['mac_input']:>9s} {fps:>7s} "
                f"{p.get('fps', '-')!s:>18s}"
            )
    for source, images, warmup, device in sorted(sources):
        print(
            f"FPS as mmseg's benchmark measures it: batch 1, {args.mode} image, {warmup} warm-up + {images} timed "
            f"images (mmseg: {SEG_FPS_WARMUP} + {SEG_FPS_IMAGES}), images / total time, on {device}; images: {source}"
        )
    return 0


def run(args: argparse.Namespace) -> int:
    return {"train": _train, "eval": _eval, "predict": _predict, "benchmark": _benchmark}[args.seg_command](args)
