"""``inceptionnext`` command line: one module per command, each thin over library functions.

A command is a module of this package with ``add_parser(subparsers)`` (registers its parser) and ``run(args) -> int``
(its exit status). Adding one means writing that module and naming it in :data:`COMMANDS`; flags that several
commands share live in :mod:`inceptionnext.cli.options`.

Exit status: 0 success, 1 the work ran but failed (a check, a NaN loss, no image readable), 2 bad input. Only the
package's :class:`~inceptionnext.errors.UserError` becomes a one-line ``error: ...`` with status 2; any other
exception is a bug or an environment failure and keeps its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from ..errors import UserError

__all__ = ["COMMANDS", "get_args_parser", "main"]

#: command modules, in the order ``inceptionnext --help`` lists them
COMMANDS = (
    "list_models", "complexity", "train", "validate", "predict", "cam", "hub", "segment", "detect", "export",
    "benchmark", "data",
)  # fmt: skip


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="inceptionnext", description="InceptionNeXt models and tools.")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        module = importlib.import_module(f"{__name__}.{name}")
        module.add_parser(subparsers).set_defaults(handler=module.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    try:
        return args.handler(args)
    except UserError as e:
        print(f"error: {user_message(e)}", file=sys.stderr)
        return 2


def user_message(e: UserError) -> str:
    """The error's own message; for one raised in a DataLoader worker process, which torch re-raises with the
    worker's traceback as its message, the original message only."""
    text = str(e)
    if text.startswith("Caught ") and "Original Traceback" in text:
        marker = f"{type(e).__module__}.{type(e).__qualname__}: "
        at = text.rfind(marker)
        if at >= 0:
            return text[at + len(marker) :].rstrip("\n")
    return text


if __name__ == "__main__":
    sys.exit(main())
