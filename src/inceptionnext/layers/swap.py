"""Swapping a module for another implementation of the same layer, in place, without touching its weights.

The fast variants of a layer (the Triton mixer, the ``F.linear`` MLP, the fused model's buffer-reusing mixer) are
subclasses of the reference with the same submodules. Swapping one in moves the reference's submodules, parameters
and buffers into an instance of the other class: the state-dict keys and the parameter objects (which an optimizer
may already hold) stay the same, so a swap can happen before or after loading weights, and in either direction.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from torch import nn

__all__ = ["share_as", "replace_modules"]

M = TypeVar("M", bound=nn.Module)


def share_as(cls: type[M], module: nn.Module, **attrs: Any) -> M:
    """An instance of ``cls`` that shares ``module``'s submodules, parameters, buffers and public attributes.

    ``cls.__init__`` is not run (the parts already exist); ``attrs`` sets the attributes that ``cls`` adds.
    Hooks are not carried over.
    """
    new = cls.__new__(cls)
    nn.Module.__init__(new)
    for name, param in module._parameters.items():
        new.register_parameter(name, param)
    for name, buf in module._buffers.items():
        new.register_buffer(name, buf, persistent=name not in module._non_persistent_buffers_set)
    for name, child in module._modules.items():
        new.add_module(name, child)
    for key, value in vars(module).items():
        if not key.startswith("_") and key != "training":
            setattr(new, key, value)
    new.training = module.training
    for key, value in attrs.items():
        setattr(new, key, value)
    return new


def replace_modules(model: nn.Module, swap: Callable[[nn.Module], nn.Module | None]) -> int:
    """Replace every submodule ``m`` of ``model`` for which ``swap(m)`` returns a module; returns how many.

    ``model`` itself is never replaced (it has no parent to hold the new module).
    """
    count = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            new = swap(child)
            if new is not None and new is not child:
                setattr(parent, name, new)
                count += 1
    return count
