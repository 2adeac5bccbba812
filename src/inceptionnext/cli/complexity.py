"""``inceptionnext complexity``: params and MACs of every variant next to the paper, Table 2, Figure 3."""

from __future__ import annotations

import argparse
import json

from .options import progress_enabled


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "complexity",
        help="params and MACs of every variant next to the paper's figures, Table 2 check, Figure 3",
    )
    p.add_argument("--model", default=None, help="shell glob of model names (default: all)")
    p.add_argument(
        "--figure", default=None, metavar="PATH", help="write Figure 3 (PNG) here; without it nothing is written"
    )
    p.add_argument("--json", default=None, help="also write the table as JSON to this file")
    return p


def run(args: argparse.Namespace) -> int:
    from .. import complexity as cx
    from ..errors import UserError
    from ..models.registry import UnknownModelError, get_entry

    rows = cx.complexity_table(args.model, progress=progress_enabled())
    if not rows:
        try:
            get_entry(args.model)
        except UnknownModelError as e:  # the closest names help with a typo
            raise UserError(f"no model matches {args.model!r}. {e}") from None
        raise UserError(f"no model matches {args.model!r}")
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
    if args.figure:  # Figure 3 plots Table 2's modules, whichever models were listed
        print(f"\nFigure 3 written to {cx.plot_figure3(cx.table2_check(), args.figure)}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                [dict(r.__dict__, params_match=r.params_match, macs_match=r.macs_match) for r in rows], f, indent=1
            )
    return 1 if bad else 0
