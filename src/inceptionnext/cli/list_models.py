"""``inceptionnext list``: the registered models, optionally only those with released weights."""

from __future__ import annotations

import argparse


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("list", help="list the registered models")
    p.add_argument("pattern", nargs="?", default=None, help="shell glob, e.g. 'inceptionnext_*'")
    p.add_argument("--pretrained", action="store_true", help="only models with released weights")
    return p


def run(args: argparse.Namespace) -> int:
    from ..models import get_entry, list_models

    for name in list_models(args.pattern):
        entry = get_entry(name)
        if args.pretrained and not entry.cfg.has_weights:
            continue
        print(f"{name:38s} {'weights' if entry.cfg.has_weights else '       '}  {entry.description}")
    return 0
