"""``inceptionnext segment train | eval | predict | benchmark``: UperNet / Semantic FPN, ADE20K or the embedded set."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..errors import UserError
from .options import add_run_config, is_main_process, progress_enabled, resolve_run_config


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
    q.add_argument("--runs", type=int, default=3)
    q.add_argument("--no-fps", action="store_true", help="only params and MACs (meta device, instant)")
    return p


def _train(args: argparse.Namespace) -> int:
    from ..engine import NonFiniteLossError
    from ..engine.config import dry_run_text
    from ..segmentation.config import SegConfig, resolve_seg_config
    from ..segmentation.engine import train_segmentation

    cfg = resolve_run_config(
        args, SegConfig, resolve_seg_config, "textures", "the 'textures' recipe on the embedded texture mosaics"
    )
    if args.dry_run:
        print(dry_run_text(cfg), end="")
        return 0
    try:
        summary = train_segmentation(cfg, resume=args.resume)
    except NonFiniteLossError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if is_main_process():
        print(f"best mIoU {summary['best']['mIoU']:.2f}% at step {summary['best']['step']}; outputs in {cfg.output}")
    return 0


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
    from ..segmentation.tools import benchmark_segmentor

    heads = args.head or list(HEADS)
    backbones = args.backbone or ["inceptionnext_tiny", "inceptionnext_small", "inceptionnext_base"]
    print(
        f"{'segmentor':34s} {'params (M)':>10s} {'paper':>6s} {'MACs (G)':>9s} {'paper':>6s} {'input':>9s} "
        f"{'FPS':>7s} {'paper FPS (2080Ti)':>18s}"
    )
    for head in heads:
        for backbone in backbones:
            r = benchmark_segmentor(head, backbone, runs=args.runs, warmup=1, fps=not args.no_fps)
            p = r["paper"]
            fps = f"{r['fps']:.2f}" if r.get("fps") else "-"
            print(
                f"{head + ' + ' + backbone:34s} {r['params_m']:10.2f} {p.get('params_m', '-'):>6s} "
                f"{r['macs_g']:9.1f} {p.get('macs_g', '-'):>6s} {r['mac_input']:>9s} {fps:>7s} "
                f"{p.get('fps', '-')!s:>18s}"
            )
    if not args.no_fps:
        print("FPS: batch 1, 512x2048, whole image, median of timed runs on this machine's device")
    return 0


def run(args: argparse.Namespace) -> int:
    return {"train": _train, "eval": _eval, "predict": _predict, "benchmark": _benchmark}[args.seg_command](args)
