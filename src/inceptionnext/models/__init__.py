from . import variants  # noqa: F401  (registers every named variant)
from .factory import create_model, register_in_timm
from .metanext import MetaNeXt, MetaNeXtBlock, MetaNeXtStage
from .pretrained import PaperFigures, PretrainedCfg, PretrainedWeightsUnavailable
from .registry import UnknownModelError, get_entry, is_model, list_models

__all__ = [
    "MetaNeXt",
    "MetaNeXtBlock",
    "MetaNeXtStage",
    "PaperFigures",
    "PretrainedCfg",
    "PretrainedWeightsUnavailable",
    "UnknownModelError",
    "create_model",
    "get_entry",
    "is_model",
    "list_models",
    "register_in_timm",
]
