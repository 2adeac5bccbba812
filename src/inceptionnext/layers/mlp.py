"""The MetaNeXt block MLP: two 1x1 convolutions with a GELU between them (paper Eq. 3).

:class:`ConvMlp` is the reference. :class:`LinearMlp` is the same layer (same parameters, same 4-D weights and
checkpoint keys) computed as ``F.linear`` over the NHWC view of a channels-last map; a model switches between them
with :meth:`~inceptionnext.models.metanext.MetaNeXt.set_mlp_primitive`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ConvMlp", "LinearMlp"]


class ConvMlp(nn.Module):
    """1x1 Conv -> GELU -> 1x1 Conv on (B, C, H, W) maps (the official InceptionNeXt MLP; keeps its state-dict
    keys and 4-D weights of the checkpoints)."""

    def __init__(self, dim: int, hidden: int, act_layer: type[nn.Module] = nn.GELU) -> None:
        super().__init__()
        self.fc1 = nn.Conv2d(dim, hidden, kernel_size=1)
        self.act = act_layer()
        self.fc2 = nn.Conv2d(hidden, dim, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class LinearMlp(ConvMlp):
    """:class:`ConvMlp` run as ``F.linear`` over the NHWC view of a channels-last map (the same weights viewed as 2-D).

    Maps in the default NCHW layout take the convolutions, which read them without permutes. Not the default: on the
    CPU measured in ``docs/speed.md`` the 1x1 convolutions are faster in training and inference.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim == 4 and x.is_contiguous(memory_format=torch.channels_last):
            rows = x.permute(0, 2, 3, 1)  # NHWC view, no copy
            h = self.act(F.linear(rows, self.fc1.weight.flatten(1), self.fc1.bias))
            return F.linear(h, self.fc2.weight.flatten(1), self.fc2.bias).permute(0, 3, 1, 2)
        return super().forward(x)
