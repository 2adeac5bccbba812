from .fused import TritonInceptionDWConv2d, set_triton_mixers
from .mixers import IdentityMixer, InceptionDWConv2d, PartialDWConv2d, SelfAttention2d
from .mlp import ConvMlp, LinearMlp

__all__ = [
    "ConvMlp",
    "IdentityMixer",
    "InceptionDWConv2d",
    "LinearMlp",
    "PartialDWConv2d",
    "SelfAttention2d",
    "TritonInceptionDWConv2d",
    "set_triton_mixers",
]
