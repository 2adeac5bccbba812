"""``inceptionnext train``: train or fine-tune a classifier (``torchrun --nproc_per_node N -m inceptionnext train``)."""

from __future__ import annotations

import argparse

from .options import add_run_config, resolve_run_config, run_training


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
    from ..engine import resolve_config, train
    from ..engine.config import TrainConfig

    cfg = resolve_run_config(
        args, TrainConfig, resolve_config, "digits", "training with the 'digits' recipe on the embedded digits set"
    )
    return run_training(args, cfg, train, _result)


def _result(summary: dict) -> str:
    best = summary["best"]
    return (
        f"best top-1 {best['top1']:.2f}% ({best['which']} weights, epoch {best['epoch']}); "
        f"outputs in {summary['output']}"
    )
