"""``inceptionnext segment train | eval | predict | benchmark``: argument handling over the library functions."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def _train(args: argparse.Namespace) -> int:
    from ..engine.config import dry_run_text, overrides_from_args
    from ..engine.trainer import NonFiniteLossError
    from .config import SegConfig, resolve_seg_config
    from .engine import train_segmentation

    overrides = overrides_from_args(args, SegConfig)
    recipe = args.recipe or args.config
    if recipe is None and overrides.get("data") is None:
        recipe = "textures"
        print("no --data and no --recipe: the 'textures' recipe on the embedded texture mosaics", file=sys.stderr)
    cfg = resolve_seg_config(recipe, overrides)
    if args.dry_run:
        print(dry_run_text(cfg), end="")
        return 0
    try:
        summary = train_segmentation(cfg)
    except NonFiniteLossError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"best mIoU {summary['best']['mIoU']:.2f}% at step {summary['best']['step']}; outputs in {cfg.output}")
    return 0


def _eval(args: argparse.Namespace) -> int:
    import torch

    from .data import EvalPipeline, build_seg_dataset
    from .engine import evaluate_segmentation
    from .tools import load_segmentor

    model, cfg, classes = load_segmentor(args.checkpoint)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    data = args.data if args.data is not None else cfg.data
    dataset = build_seg_dataset(data, "val", EvalPipeline(scale=tuple(cfg.scale)), seed=cfg.seed)
    if list(dataset.classes) != classes:
        raise ValueError(f"the dataset's classes {list(dataset.classes)[:5]}... differ from the checkpoint's")
    res = evaluate_segmentation(
        model,
        dataset,
        device,
        mode=args.mode or cfg.eval_mode,
        crop=tuple(cfg.slide_crop),
        stride=tuple(cfg.slide_stride),
        aug_test=args.aug_test,
        progress=sys.stderr.isatty(),
    )
    print(
        f"{cfg.head} + {cfg.backbone} on {data or 'texture mosaics (embedded)'} ({len(dataset)} images, "
        f"{args.mode or cfg.eval_mode}{', ms+flip' if args.aug_test else ''}): mIoU {res['mIoU']:.2f}  "
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
    from .tools import predict_masks

    written, problems = predict_masks(args.checkpoint, args.inputs, args.output)
    for p in problems:
        print(f"skipped: {p}", file=sys.stderr)
    print(f"{len(written) // 2} images segmented; masks and overlays in {args.output}")
    return 0 if written else 1


def _benchmark(args: argparse.Namespace) -> int:
    from .tools import benchmark_segmentor

    heads = args.head or ["upernet", "fpn"]
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
