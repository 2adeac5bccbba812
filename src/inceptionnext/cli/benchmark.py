"""``inceptionnext benchmark``: training / inference throughput as the paper measures it, CSV/JSON, Figure-1 plot."""

from __future__ import annotations

import argparse
import sys
from dataclasses import asdict

from .. import benchmark as bm
from ..errors import UserError
from .options import progress_enabled

DEFAULT_MODELS = ("inceptionnext_tiny", "convnext_tiny", "resnet50")


def _csv_list(choices: tuple[str, ...]):
    def parse(text: str) -> list[str]:
        items = [t.strip() for t in text.split(",") if t.strip()]
        bad = [t for t in items if t not in choices]
        if bad:
            raise argparse.ArgumentTypeError(f"unknown {', '.join(bad)}; choose from {', '.join(choices)}")
        return items

    return parse


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "benchmark",
        help="training / inference throughput as the paper measures it (Tables 1, 4, 5, 8; Figure 1)",
        description=(
            "Synthetic batches at the model's input size (128, reduced on out-of-memory), warm-up then timed steps, "
            "channels-first and channels-last with the better one reported, next to the paper's A100 and 2080Ti "
            "figures. --protocol official (default) follows the released benchmark.py: cudnn.benchmark on, TF32, "
            "10 warm-up + 40 timed steps, SGD train step, images / total timed time; --protocol this is this "
            "package's earlier protocol (fp32, 5 + 20 steps, AdamW, median step). Models: this package's and timm's "
            "(the peers of Table 4: "
            + ", ".join(list(bm.PEERS)[:9])
            + ", ...; at 384 px: "
            + ", ".join(bm.PEERS_384)
            + ")."
        ),
    )
    p.add_argument("models", nargs="*", default=list(DEFAULT_MODELS), help=f"default: {' '.join(DEFAULT_MODELS)}")
    p.add_argument("--impl", type=_csv_list(bm.IMPLS), default=["eager"], help="comma list of " + "|".join(bm.IMPLS))
    p.add_argument("--mode", type=_csv_list(bm.MODES), default=list(bm.MODES), help="infer,train (default both)")
    p.add_argument(
        "--layout",
        type=_csv_list(bm.LAYOUTS),
        default=list(bm.LAYOUTS),
        help="channels_first,channels_last (default both; the better is reported)",
    )
    p.add_argument(
        "--protocol",
        choices=list(bm.PROTOCOLS),
        default="official",
        help="official: the released benchmark.py (default); this: this package's earlier protocol",
    )
    p.add_argument("--precision", choices=bm.PRECISIONS, default=None, help="default: the protocol's (official: tf32)")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:1, ...")
    p.add_argument("--batch-size", type=int, default=128, help="start value; reduced until it fits")
    p.add_argument("--img-size", type=int, default=None, help="default: the model's input size (224; 384 models 384)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps (default: the protocol's, official 10)")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default: the protocol's, official 40)")
    p.add_argument(
        "--train-opt", choices=bm.TRAIN_OPTS, default=None, help="optimizer of the train step (official: sgd)"
    )
    p.add_argument("--baseline", default=None, help="MODEL or MODEL:IMPL for the ratio columns (default: first)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument(
        "--malloc-tuned",
        action="store_true",
        help="glibc keeps freed memory for every model measured (see docs/speed.md); default: the process default",
    )
    p.add_argument("--csv", default=None, help="write every raw measurement (both layouts) here")
    p.add_argument("--json", default=None, help="write environment, summary and raw measurements here")
    p.add_argument("--plot", default=None, help="write a Figure-1 style plot (paper top-1 vs throughput) here")
    p.add_argument("--plot-mode", choices=bm.MODES, default="train", help="throughput axis of the plot")
    return p


def run(args: argparse.Namespace) -> int:
    import torch

    if args.batch_size < 1 or (args.steps is not None and args.steps < 1) or (args.warmup or 0) < 0:
        raise UserError("--batch-size and --steps must be >= 1, --warmup >= 0")
    if args.img_size is not None and args.img_size < 1:
        raise UserError("--img-size must be >= 1")
    protocol = bm.resolve_protocol(
        args.protocol, precision=args.precision, warmup=args.warmup, steps=args.steps, train_opt=args.train_opt
    )
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.malloc_tuned:
        bm.tune_glibc_malloc()
    import timm

    from ..models import is_model
    from ..models.factory import create_any_model

    for name in args.models:  # fail fast on a typo (with suggestions), before minutes of measuring
        if not (is_model(name) or timm.is_model(name.split(".")[0])):
            create_any_model(name)
    measurements = bm.run_benchmark(
        args.models,
        impls=args.impl,
        modes=args.mode,
        layouts=args.layout,
        device=args.device,
        batch_size=args.batch_size,
        img_size=args.img_size,
        progress=progress_enabled(),
        protocol=protocol,
    )
    for m in measurements:
        if m.error:
            print(f"failed: {m.model} {m.impl} {m.mode} {m.layout}: {m.error}", file=sys.stderr)
    baseline = args.baseline or f"{args.models[0]}:{args.impl[0]}"
    rows = bm.summarize(measurements, baseline)
    env = bm.environment()
    device = env.get("gpu") if bm.resolve_device(args.device).type == "cuda" else env["cpu"]
    malloc = "; malloc tuned" if args.malloc_tuned else ""
    sizes = sorted({m.img_size for m in measurements})
    changed = [k for k in ("precision", "warmup", "steps", "train_opt") if getattr(args, k) is not None]
    print(f"{device}; torch {env['torch']}{malloc}; batch {args.batch_size}; {'/'.join(map(str, sizes))}px")
    print(bm.describe_protocol(protocol, changed) + "\n")
    print(bm.format_table(rows, baseline))
    print(f"ratios relative to {baseline}")
    if args.csv:
        print(f"raw measurements: {bm.write_csv(measurements, args.csv)}")
    if args.json:
        extra = dict(baseline=baseline, precision=protocol.precision, protocol=asdict(protocol))
        print(f"JSON: {bm.write_json(measurements, rows, args.json, **extra)}")
    if args.plot:
        title = f"{device}, {protocol.precision}, batch {args.batch_size}, {'/'.join(args.impl)}, best layout"
        print(f"plot: {bm.plot_figure1(rows, args.plot, mode=args.plot_mode, title=title)}")
    return 0 if all(m.img_per_s is not None for m in measurements) else 1
