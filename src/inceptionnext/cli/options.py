"""Flag groups that several commands share, and the checks that go with them."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path
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
    parser.add_argument(
        "--num-classes",
        type=int,
        default=None,
        help="class count of a --checkpoint that does not carry its class names (the outputs are class indices)",
    )


def require_model_source(args: argparse.Namespace) -> None:
    if args.checkpoint is None and args.model is None:
        raise UserError("give --checkpoint PATH and/or --model NAME")


def load_model_from_args(args: argparse.Namespace):
    """The :class:`~inceptionnext.inference.LoadedModel` that :func:`add_model_source`'s flags name."""
    from ..inference import load_model

    require_model_source(args)
    return load_model(
        args.model, args.checkpoint, pretrained=args.pretrained, use_ema=args.use_ema, num_classes=args.num_classes
    )


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
    # --config is always a file; --recipe NAME a packaged recipe (a path, or a name ending .yaml, is a file)
    recipe = args.recipe or (Path(args.config) if args.config else None)
    if recipe is None and overrides.get("data") is None:
        recipe = default_recipe
        print(f"no --data and no --recipe: {default_note}", file=sys.stderr)
    return resolve(recipe, overrides)


def run_training(
    args: argparse.Namespace, cfg: Any, train: Callable[..., dict[str, Any]], result: Callable[[dict[str, Any]], str]
) -> int:
    """``--dry-run`` prints the resolved config and writes nothing; otherwise train (resuming ``--resume`` or the
    output folder's ``last.pth``). A NaN/inf loss is a failed run (exit 1); rank 0 prints ``result(summary)``."""
    from ..engine import NonFiniteLossError
    from ..engine.config import dry_run_text

    if args.dry_run:
        print(dry_run_text(cfg), end="")
        return 0
    try:
        summary = train(cfg, resume=args.resume)
    except NonFiniteLossError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if is_main_process():
        print(result(summary))
    return 0


def is_main_process() -> bool:
    """Rank 0 of a torchrun launch (or a plain process): the one that prints results."""
    return int(os.environ.get("RANK", "0")) == 0


def progress_enabled() -> bool:
    """Progress bars on a terminal, unless ``INCEPTIONNEXT_NO_PROGRESS`` is set (as training reads it)."""
    return sys.stderr.isatty() and os.environ.get("INCEPTIONNEXT_NO_PROGRESS") is None


def positive_int(text: str) -> int:
    """argparse type for counts that must be at least 1 (``--topk``, ``--batch-size``)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def parse_size(text: str | None, example: str = "512x683") -> tuple[int, int] | None:
    """``--size HxW`` as ``(h, w)`` (None stays None); anything else is a UserError showing the form."""
    if text is None:
        return None
    h, sep, w = text.lower().partition("x")
    if not (sep and h.strip().isdigit() and w.strip().isdigit()) or int(h) < 1 or int(w) < 1:
        raise UserError(f"--size takes HxW, e.g. {example}, got {text!r}")
    return int(h), int(w)
