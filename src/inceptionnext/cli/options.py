"""Flag groups that several commands share, and the checks that go with them."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from typing import Any

from ..errors import UserError


def add_model_source(parser: argparse.ArgumentParser) -> None:
    """Where a command's model comes from: a checkpoint, a name (with or without released weights), or both."""
    parser.add_argument(
        "--checkpoint", default=None, help="checkpoint (this package's carry model, classes, preprocessing)"
    )
    parser.add_argument("--model", default=None, help="model name (this package's, timm's, hf-hub:..., local-dir:...)")
    parser.add_argument("--pretrained", action="store_true", help="released weights of --model")
    parser.add_argument("--use-ema", action="store_true", help="EMA weights of a training checkpoint")


def require_model_source(args: argparse.Namespace) -> None:
    if args.checkpoint is None and args.model is None:
        raise UserError("give --checkpoint PATH and/or --model NAME")


def load_model_from_args(args: argparse.Namespace):
    """The :class:`~inceptionnext.inference.LoadedModel` that :func:`add_model_source`'s flags name."""
    from ..inference import load_model

    require_model_source(args)
    return load_model(args.model, args.checkpoint, pretrained=args.pretrained, use_ema=args.use_ema)


def add_run_config(parser: argparse.ArgumentParser, config_cls: type, recipes: list[str]) -> None:
    """A training run's config: ``--recipe`` or ``--config``, one flag per config field, ``--resume``, ``--dry-run``."""
    from ..engine.config import add_config_arguments

    parser.add_argument("--recipe", default=None, help=f"packaged recipe: {', '.join(recipes)}")
    parser.add_argument("--config", default=None, help="a YAML recipe file (same keys as the packaged ones)")
    parser.add_argument(
        "--resume",
        default=None,
        metavar="PATH",
        help="continue from this training checkpoint (default: OUTPUT/last.pth when it exists); "
        "the file is checked and read, never copied",
    )
    parser.add_argument("--dry-run", action="store_true", help="print the resolved config and exit (writes nothing)")
    add_config_arguments(parser, config_cls)


def resolve_run_config(
    args: argparse.Namespace,
    config_cls: type,
    resolve: Callable[[str | None, dict[str, Any]], Any],
    default_recipe: str,
    default_note: str,
) -> Any:
    """Defaults < ``--recipe``/``--config`` < flags. Without data and recipe, the embedded default run."""
    from ..engine.config import overrides_from_args

    if args.recipe and args.config:
        raise UserError("give --recipe or --config, not both")
    overrides = overrides_from_args(args, config_cls)
    recipe = args.recipe or args.config
    if recipe is None and overrides.get("data") is None:
        recipe = default_recipe
        print(f"no --data and no --recipe: {default_note}", file=sys.stderr)
    return resolve(recipe, overrides)


def is_main_process() -> bool:
    """Rank 0 of a torchrun launch (or a plain process): the one that prints results."""
    return int(os.environ.get("RANK", "0")) == 0


def progress_enabled() -> bool:
    return sys.stderr.isatty()
