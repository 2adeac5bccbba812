"""``inceptionnext`` command line: thin argument parsing over library functions."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence


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
    return parser


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


def main(argv: Sequence[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    handlers = {"list": _cmd_list, "complexity": _cmd_complexity}
    return handlers[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
