"""InceptionNeXt (Yu, Zhou, Yan, Wang, CVPR 2024) for PyTorch.

>>> import inceptionnext
>>> model = inceptionnext.create_model("inceptionnext_tiny", pretrained=True)
>>> inceptionnext.list_models("convnext_*")
"""

from .checkpoint import CheckpointError, load_checkpoint, remap_state_dict
from .layers import IdentityMixer, InceptionDWConv2d, PartialDWConv2d, SelfAttention2d
from .models import (
    MetaNeXt,
    PaperFigures,
    PretrainedCfg,
    PretrainedWeightsUnavailable,
    UnknownModelError,
    create_model,
    get_entry,
    list_models,
    register_in_timm,
)
from .reparam import fuse
from .version import __version__ as __version__  # re-exported: the package version

__all__ = [
    "CheckpointError",
    "IdentityMixer",
    "InceptionDWConv2d",
    "MetaNeXt",
    "PaperFigures",
    "PartialDWConv2d",
    "PretrainedCfg",
    "PretrainedWeightsUnavailable",
    "SelfAttention2d",
    "UnknownModelError",
    "create_model",
    "fuse",
    "get_entry",
    "list_models",
    "load_checkpoint",
    "remap_state_dict",
]

register_in_timm()
