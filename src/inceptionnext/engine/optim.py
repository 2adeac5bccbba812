"""The optimizer every task builds: timm's, with weight decay on weights only."""

from __future__ import annotations

import torch
from timm.optim import create_optimizer_v2
from torch import nn

__all__ = ["build_optimizer"]


def build_optimizer(
    model: nn.Module, lr: float, *, opt: str = "adamw", weight_decay: float = 0.05, eps: float = 1e-8,
    betas: tuple[float, float] = (0.9, 0.999),
) -> torch.optim.Optimizer:  # fmt: skip
    """AdamW (or another timm optimizer) with weight decay on weights only: 1-D parameters (norms, biases) and
    the model's ``no_weight_decay()`` names (LayerScale) go to a group without decay."""
    return create_optimizer_v2(model, opt=opt, lr=lr, weight_decay=weight_decay, eps=eps, betas=tuple(betas))
