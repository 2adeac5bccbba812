from .mixers import IdentityMixer, InceptionDWConv2d, PartialDWConv2d, SelfAttention2d

__all__ = ["IdentityMixer", "InceptionDWConv2d", "PartialDWConv2d", "SelfAttention2d"]
