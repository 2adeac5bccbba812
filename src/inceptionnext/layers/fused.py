"""The fused Triton Inception depthwise convolution as a module, and the switch that puts it into a model.

:class:`TritonInceptionDWConv2d` has the parameters, checkpoint keys and numbers of the reference
:class:`~inceptionnext.layers.mixers.InceptionDWConv2d` and computes them with the one-launch kernel of
:mod:`inceptionnext.kernels` (forward and backward) where the kernel applies: CUDA tensors (or CPU tensors under
``TRITON_INTERPRET=1``), the default branch layout, eager mode. Anywhere else (CPU, ``torch.compile``, tracing for
export, the Table 8 ablations) it runs the reference code.

It is opt-in: the kernel is tested through Triton's interpreter and compiled for sm_90 ahead of time, but code never
run on a GPU is not a GPU default. Ask for it when building (``create_model(name, fused_mixer=True)``) or swap it
into a built model with :func:`set_triton_mixers`.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import ConfigError
from ..kernels import inception_dwconv, supports
from .mixers import InceptionDWConv2d
from .swap import replace_modules, share_as

__all__ = ["TritonInceptionDWConv2d", "set_triton_mixers", "use_fused_mixer"]

_KERNEL_BRANCHES = ("hw", "w", "h")  # the layout the kernel implements: square, 1 x k_b, k_b x 1, in parallel


class TritonInceptionDWConv2d(InceptionDWConv2d):
    """:class:`InceptionDWConv2d` computed by the fused Triton kernel where it applies (see the module docstring).

    Same constructor as the reference, plus ``tiles``: a ``(BLOCK_P, BLOCK_C)`` tile shape forced on the kernel
    (tests use it to cover the multi-tile paths on small images); by default the kernel picks it from the layout.
    """

    tiles: tuple[int, int] | None = None  # also for instances made by share_as, which does not run __init__

    def __init__(self, *args, tiles: tuple[int, int] | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.tiles = tiles

    @classmethod
    def from_module(cls, module: InceptionDWConv2d, *, tiles: tuple[int, int] | None = None):
        """The Triton variant of ``module``, sharing its parameters."""
        return share_as(cls, module, tiles=tiles)

    def _convs(self) -> tuple[nn.Module, nn.Module, nn.Module]:
        return self.dwconv_hw, self.dwconv_w, self.dwconv_h

    def uses_kernel(self, x: torch.Tensor) -> bool:
        """Whether ``self(x)`` runs the fused kernel (else the reference split / convolve / concatenate)."""
        if torch.compiler.is_compiling() or torch.jit.is_tracing() or torch.jit.is_scripting():
            return False  # compilers and exporters see the reference ops
        return self.branches == _KERNEL_BRANCHES and supports(x, self.split_sizes, self._convs())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.uses_kernel(x):
            return inception_dwconv(x, self.split_sizes, self._convs(), tiles=self.tiles)
        return super().forward(x)


def set_triton_mixers(model: nn.Module, enable: bool = True) -> nn.Module:
    """Swap every :class:`InceptionDWConv2d` of ``model`` for :class:`TritonInceptionDWConv2d` (``enable=False``:
    back to the reference), in place and sharing the parameters, so state dict and optimizer are unaffected.

    Returns ``model``. Any model works (a MetaNeXt, a backbone, a single mixer's parent); other modules are left alone.
    """
    src, dst = (InceptionDWConv2d, TritonInceptionDWConv2d) if enable else (TritonInceptionDWConv2d, InceptionDWConv2d)
    attrs = {"tiles": None} if enable else {}
    replace_modules(model, lambda m: share_as(dst, m, **attrs) if type(m) is src else None)
    return model


def use_fused_mixer(model: nn.Module, name: str) -> nn.Module:
    """``--fused-mixer``: swap ``model``'s Inception mixers for the fused Triton ones (in place, same parameters).

    A model without an Inception mixer (``convnext_*``, timm's models, a Table 8 ablation with another mixer) is a
    :class:`~inceptionnext.errors.ConfigError`: the flag would otherwise do nothing and say nothing.
    """
    if not any(isinstance(m, InceptionDWConv2d) for m in model.modules()):
        raise ConfigError(f"fused_mixer: {name} has no Inception depthwise mixer to fuse; leave --fused-mixer off")
    return set_triton_mixers(model)
