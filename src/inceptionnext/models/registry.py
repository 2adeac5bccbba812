"""Name -> model entry registry. Refuses duplicate names; lists by glob pattern; suggests close names."""

from __future__ import annotations

import difflib
import fnmatch
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..errors import UserError
from .pretrained import PaperFigures, PretrainedCfg

__all__ = ["ModelEntry", "UnknownModelError", "register_model", "get_entry", "list_models", "is_model"]


@dataclass(frozen=True)
class ModelEntry:
    """One named variant: its architecture arguments, eval/pretrained config and the paper's figures."""

    name: str
    arch_fn: Callable[[], dict[str, Any]]
    cfg: PretrainedCfg
    paper: PaperFigures | None = None
    description: str = ""
    tags: tuple[str, ...] = field(default_factory=tuple)

    def arch_kwargs(self) -> dict[str, Any]:
        return self.arch_fn()


class UnknownModelError(UserError, ValueError):
    """Raised for a model name that is not registered; the message lists the closest names."""


_REGISTRY: dict[str, ModelEntry] = {}


def register_model(
    *, cfg: PretrainedCfg | None = None, paper: PaperFigures | None = None, tags: tuple[str, ...] = ()
) -> Callable[[Callable[[], dict[str, Any]]], Callable[[], dict[str, Any]]]:
    """Decorator: register a function returning the architecture kwargs of :class:`MetaNeXt` under its name."""

    def wrap(fn: Callable[[], dict[str, Any]]) -> Callable[[], dict[str, Any]]:
        name = fn.__name__
        if name in _REGISTRY:
            raise ValueError(f"model name {name!r} is already registered")
        doc = (fn.__doc__ or "").strip().splitlines()
        _REGISTRY[name] = ModelEntry(name, fn, cfg or PretrainedCfg(), paper, doc[0] if doc else "", tags)
        return fn

    return wrap


def is_model(name: str) -> bool:
    return name in _REGISTRY


def get_entry(name: str) -> ModelEntry:
    try:
        return _REGISTRY[name]
    except KeyError:
        close = difflib.get_close_matches(name, list(_REGISTRY), n=5, cutoff=0.5)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        raise UnknownModelError(
            f"Unknown model {name!r}.{hint} `inceptionnext.list_models()` lists all {len(_REGISTRY)} models."
        ) from None


def list_models(pattern: str | None = None, *, tag: str | None = None) -> list[str]:
    """Registered names, sorted; ``pattern`` is a shell glob (``"inceptionnext_*"``), ``tag`` a table tag."""
    names = sorted(_REGISTRY)
    if pattern:
        names = [n for n in names if fnmatch.fnmatchcase(n, pattern)]
    if tag:
        names = [n for n in names if tag in _REGISTRY[n].tags]
    return names
