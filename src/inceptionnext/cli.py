"""``inceptionnext`` command line: thin argument parsing over library functions."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="inceptionnext", description="InceptionNeXt models and tools.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("list", help="list the registered models")
    p.add_argument("pattern", nargs="?", default=None, help="shell glob, e.g. 'inceptionnext_*'")
    p.add_argument("--pretrained", action="store_true", help="only models with released weights")

    p = sub.add_parser(
        "complexity",
        help="params and MACs of every variant next to the paper's figures, Table 2 check, Figure 3",
    )
    p.add_argument("--model", default=None, help="shell glob of model names (default: all)")
    p.add_argument("--figure", default="figure3_flops.png", help="where to write Figure 3 (PNG); '' to skip")
    p.add_argument("--json", default=None, help="also write the table as JSON to this file")

    from .engine.config import add_config_arguments, list_recipes

    p = sub.add_parser(
        "train",
        help="train or fine-tune (torchrun --nproc_per_node N -m inceptionnext train ... for several processes)",
        description="Defaults < --recipe/--config < flags. An output directory holding last.pth is resumed.",
    )
    p.add_argument("--recipe", default=None, help=f"packaged recipe: {', '.join(list_recipes())}")
    p.add_argument("--config", default=None, help="a YAML recipe file (same keys as the packaged ones)")
    p.add_argument(
        "--resume",
        default=None,
        metavar="PATH",
        help="continue from this checkpoint (default: OUTPUT/last.pth when it exists)",
    )
    p.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    add_config_arguments(p)

    p = sub.add_parser("validate", help="top-1/top-5 of a checkpoint or released weights")
    p.add_argument("--model", default=None, help="model name (read from this package's training checkpoints)")
    p.add_argument("--checkpoint", default=None, help="checkpoint file")
    p.add_argument("--pretrained", action="store_true", help="validate the released weights of --model")
    p.add_argument("--data", default=None, help="ImageFolder root with val/ (default: the embedded digits set)")
    p.add_argument("--use-ema", action="store_true", help="evaluate the EMA weights of a training checkpoint")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--amp", default="auto", choices=["auto", "bf16", "fp16", "fp32"])
    p.add_argument("--output", default=None, help="directory for results.json and results.csv")

    p = sub.add_parser("predict", help="top-k classes of images or folders of images")
    p.add_argument("inputs", nargs="+", help="image files and/or folders (searched recursively)")
    _model_source_args(p)
    p.add_argument("--topk", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--format", choices=["table", "json"], default="table")
    p.add_argument("--output", default=None, help="also write the JSON report to this file")
    p.add_argument("--onnx", default=None, metavar="FILE", help="run an exported .onnx file with onnxruntime instead")

    p = sub.add_parser("cam", help="class activation maps (Grad-CAM & co.) of one or more models, Figure-4 grid")
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

    p = sub.add_parser("hub", help="export / push checkpoints in timm's Hugging Face layout")
    hub = p.add_subparsers(dest="hub_command", required=True)
    q = hub.add_parser("export", help="write config.json + model.safetensors to a folder")
    _model_source_args(q)
    q.add_argument("folder")
    q = hub.add_parser("push", help="export and upload to the Hugging Face Hub")
    _model_source_args(q)
    q.add_argument("repo_id", help="OWNER/NAME on huggingface.co")
    q.add_argument("--private", action="store_true")

    from .segmentation.config import SEG_RECIPES, SegConfig

    p = sub.add_parser("segment", help="semantic segmentation: UperNet / Semantic FPN on ADE20K or the embedded set")
    seg = p.add_subparsers(dest="seg_command", required=True)
    q = seg.add_parser("train", help="train (torchrun -m inceptionnext segment train ... for several processes)")
    q.add_argument("--recipe", default=None, help=f"packaged recipe: {', '.join(list_recipes(SEG_RECIPES))}")
    q.add_argument("--config", default=None, help="a YAML recipe file")
    q.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    add_config_arguments(q, SegConfig)
    q = seg.add_parser("eval", help="mIoU / mAcc / aAcc of a checkpoint")
    q.add_argument("--checkpoint", required=True)
    q.add_argument("--data", default=None, help="ADEChallengeData2016 root (default: the checkpoint's own data)")
    q.add_argument("--mode", choices=["whole", "slide"], default=None, help="default: the checkpoint's eval_mode")
    q.add_argument("--aug-test", action="store_true", help="multi-scale (0.5-1.75) + flip")
    q.add_argument("--output", default=None, help="directory for results.json (with per-class IoU)")
    q = seg.add_parser("predict", help="colour-coded masks overlaid on images")
    q.add_argument("inputs", nargs="+")
    q.add_argument("--checkpoint", required=True)
    q.add_argument("--output", default="segment_predictions")
    q = seg.add_parser("benchmark", help="params, MACs and FPS as Tables 6 and 7 measure them")
    q.add_argument("--head", choices=["upernet", "fpn"], action="append", help="default: both")
    q.add_argument("--backbone", action="append", help="default: inceptionnext_tiny, _small, _base")
    q.add_argument("--runs", type=int, default=3)
    q.add_argument("--no-fps", action="store_true", help="only params and MACs (meta device, instant)")

    from .tools.export import add_export_parser

    add_export_parser(sub)

    from .tools.benchmark_cmd import add_benchmark_parser

    add_benchmark_parser(sub)
    return parser


def _model_source_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", default=None, help="checkpoint (this package's carry model, classes, preprocessing)")
    p.add_argument("--model", default=None, help="model name (this package's, timm's, hf-hub:..., local-dir:...)")
    p.add_argument("--pretrained", action="store_true", help="released weights of --model")
    p.add_argument("--use-ema", action="store_true", help="EMA weights of a training checkpoint")


def _cmd_list(args: argparse.Namespace) -> int:
    from .models import get_entry, list_models

    for name in list_models(args.pattern):
        entry = get_entry(name)
        if args.pretrained and not entry.cfg.has_weights:
            continue
        print(f"{name:38s} {'weights' if entry.cfg.has_weights else '       '}  {entry.description}")
    return 0


def _cmd_complexity(args: argparse.Namespace) -> int:
    from . import complexity as cx

    rows = cx.complexity_table(args.model, progress=sys.stderr.isatty())
    if not rows:
        from .models.registry import UnknownModelError, get_entry

        try:
            get_entry(args.model)
        except UnknownModelError as e:
            print(f"error: no model matches {args.model!r}. {e}", file=sys.stderr)
        return 2
    print("Parameters and MACs at each model's resolution, next to the paper's printed figures")
    print("(MACs in fvcore's convention: conv/linear/matmul multiply-accumulates, BN 2 and LN 5 per element;")
    print(" the paper prints fvcore's 3 significant digits rounded to its precision; see docs/complexity.md)\n")
    print(cx.format_table(rows))
    bad = [r.name for r in rows if r.params_match is False or r.macs_match is False]
    checked = sum(r.paper_params is not None for r in rows)
    print(f"\n{checked - len(bad)}/{checked} models equal the paper's figures at printed precision.")
    if args.model is None:
        t2 = cx.table2_check()
        print("\nTable 2: parameters and FLOPs of real modules (C=96, 56x56) against the formulas\n")
        print(cx.format_table2(t2))
        if not all(r.ok for r in t2):
            bad.append("table2")
        if args.figure:
            print(f"\nFigure 3 written to {cx.plot_figure3(t2, args.figure)}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                [dict(r.__dict__, params_match=r.params_match, macs_match=r.macs_match) for r in rows], f, indent=1
            )
    return 1 if bad else 0


def _cmd_train(args: argparse.Namespace) -> int:
    import shutil

    from .engine import NonFiniteLossError, resolve_config, train
    from .engine.config import dry_run_text, overrides_from_args

    if args.recipe and args.config:
        print("error: give --recipe or --config, not both", file=sys.stderr)
        return 2
    overrides = overrides_from_args(args)
    recipe = args.recipe or args.config
    if recipe is None and overrides.get("data") is None:
        recipe = "digits"  # no data and no recipe: the embedded default run
        print(
            "no --data and no --recipe: training with the 'digits' recipe on the embedded digits set", file=sys.stderr
        )
    cfg = resolve_config(recipe, overrides)
    if args.resume:
        last = Path(cfg.output) / "last.pth"
        if Path(args.resume).resolve() != last.resolve():
            last.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(args.resume, last)
    if args.dry_run:
        print(dry_run_text(cfg), end="")
        return 0
    try:
        summary = train(cfg)
    except NonFiniteLossError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if int(os.environ.get("RANK", "0")) == 0:
        best = summary["best"]
        print(
            f"best top-1 {best['top1']:.2f}% ({best['which']} weights, epoch {best['epoch']}); "
            f"outputs in {summary['output']}"
        )
    return 0


def _cmd_validate(args: argparse.Namespace) -> int:
    from .engine import validate

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


def _load(args: argparse.Namespace):
    from .inference import load_model

    if args.checkpoint is None and args.model is None:
        raise ValueError("give --checkpoint PATH and/or --model NAME")
    return load_model(args.model, args.checkpoint, pretrained=args.pretrained, use_ema=args.use_ema)


def _cmd_predict(args: argparse.Namespace) -> int:
    from .tools.export import load_onnx_for_predict
    from .tools.predict import format_predictions, predict

    loaded = load_onnx_for_predict(args) if args.onnx else _load(args)
    report = predict(loaded, args.inputs, topk=args.topk, batch_size=args.batch_size, progress=sys.stderr.isatty())
    text = json.dumps(report.to_dict(), indent=1)
    if args.output:
        Path(args.output).write_text(text)
    print(text if args.format == "json" else format_predictions(report))
    return 0 if report.predictions else 1


def _cmd_cam(args: argparse.Namespace) -> int:
    from .inference import find_images, load_model
    from .tools.cam import cam_grid

    models = []
    for spec in args.model:
        name, _, ckpt = spec.partition("=")
        loaded = load_model(name or None, ckpt or None, pretrained=args.pretrained and not ckpt, use_ema=args.use_ema)
        models.append((loaded.name, loaded))
    images, problems = find_images(args.images)
    grid, overlays, more = cam_grid(images, models, args.output, method=args.method, target_class=args.target_class,
                                    layer=args.layer, progress=sys.stderr.isatty())  # fmt: skip
    for p in problems + more:
        print(f"skipped: {p}", file=sys.stderr)
    print(f"{len(overlays)} overlays and the grid {grid} written to {args.output}")
    return 0


def _cmd_hub(args: argparse.Namespace) -> int:
    import tempfile

    from .tools.hub import export_folder, push_to_hub

    loaded = _load(args)
    if args.hub_command == "export":
        print(f"exported {loaded.name} to {export_folder(loaded, args.folder)}")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        print(f"pushed {loaded.name} to {push_to_hub(export_folder(loaded, tmp), args.repo_id, private=args.private)}")
    return 0


def _cmd_segment(args: argparse.Namespace) -> int:
    from .segmentation import commands

    return commands.run(args)


def _cmd_export(args: argparse.Namespace) -> int:
    from .tools.export import run_export

    return run_export(args)


def _cmd_benchmark(args: argparse.Namespace) -> int:
    from .tools.benchmark_cmd import run_benchmark_cmd

    return run_benchmark_cmd(args)


def main(argv: Sequence[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    handlers = {
        "list": _cmd_list, "complexity": _cmd_complexity, "train": _cmd_train, "validate": _cmd_validate,
        "predict": _cmd_predict, "cam": _cmd_cam, "hub": _cmd_hub, "segment": _cmd_segment,
        "export": _cmd_export, "benchmark": _cmd_benchmark,
    }  # fmt: skip
    try:
        return handlers[args.command](args)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        from .checkpoint import CheckpointError
        from .data import DataError
        from .models import PretrainedWeightsUnavailable, UnknownModelError

        if isinstance(
            e,
            (
                CheckpointError,
                DataError,
                PretrainedWeightsUnavailable,
                UnknownModelError,
                ValueError,
                FileNotFoundError,
            ),
        ):
            print(f"error: {e}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
