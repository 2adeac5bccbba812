"""``inceptionnext train``: train or fine-tune a classifier (``torchrun --nproc_per_node N -m inceptionnext train``)."""

from __future__ import annotations

import argparse
import sys

from .options import add_run_config, is_main_process, resolve_run_config


def add_parser(subparsers) -> argparse.ArgumentParser:
    from ..engine.config import TrainConfig, list_recipes

    p = subparsers.add_parser(
        "train",
        help="train or fine-tune (torchrun --nproc_per_node N -m inceptionnext train ... for several processes)",
        description="Defaults < --recipe/--config < flags. An output directory holding last.pth is resumed.",
    )
    add_run_config(p, TrainConfig, list_recipes())
    return p


def run(args: argparse.Namespace) -> int:
    from ..engine import NonFiniteLossError, resolve_config, train
    from ..engine.config import TrainConfig, dry_run_text

    cfg = resolve_run_config(
        args, TrainConfig, resolve_config, "digits", "training with the 'digits' recipe on the embedded digits set"
    )
    if args.dry_run:
        print(dry_run_text(cfg), end="")
        return 0
    try:
        summary = train(cfg, resume=args.resume)
    except NonFiniteLossError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if is_main_process():
        best = summary["best"]
        print(
            f"best top-1 {best['top1']:.2f}% ({best['which']} weights, epoch {best['epoch']}); "
            f"outputs in {summary['output']}"
        )
    return 0
