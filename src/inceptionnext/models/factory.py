"""One builder for every variant: architecture, pretrained weights, local checkpoints, features-only mode."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from torch import nn

from ..checkpoint import load_checkpoint
from ..layers.fused import set_triton_mixers
from .metanext import MetaNeXt
from .pretrained import HUB_PREFIXES, HUB_SOURCES, PREPROCESSING_KEYS, fetch_pretrained, weights_file_for
from .registry import UnknownModelError, get_entry, is_model, list_models

__all__ = ["create_model", "create_any_model", "register_in_timm"]

# Builder options that are not architecture arguments.
_TIMM_IGNORED = ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir", "pretrained_strict")


def create_model(
    name: str,
    pretrained: bool = False,
    checkpoint_path: str | os.PathLike | None = None,
    *,
    features_only: bool = False,
    out_indices: Sequence[int] | None = None,
    use_ema: bool = False,
    fused_mixer: bool = False,
    **kwargs: Any,
) -> MetaNeXt:
    """Build a registered model.

    Args:
        name: a name from :func:`list_models` (an unknown name raises with the closest names).
        pretrained: load the released ImageNet-1K weights (downloaded once, then cached).
        checkpoint_path: load this file instead (any layout :mod:`inceptionnext.checkpoint` accepts).
        features_only: return a backbone whose forward gives the stage maps of ``out_indices``.
        use_ema: with ``checkpoint_path``, take the EMA weights of a training checkpoint.
        fused_mixer: run the Inception mixers with the fused Triton kernel where it applies (CUDA; opt-in, see
            :class:`~inceptionnext.layers.TritonInceptionDWConv2d`). Same parameters and checkpoint keys.
        **kwargs: override architecture arguments (``num_classes``, ``in_chans``, ``drop_path_rate``, ...).
            Weights keep loading with another ``num_classes`` (the classifier is re-initialised, with a warning).
    """
    entry = get_entry(name)
    for key in _TIMM_IGNORED:
        kwargs.pop(key, None)
    model = MetaNeXt(**{**entry.arch_kwargs(), **kwargs})
    model.pretrained_cfg = entry.cfg.to_dict() | {"architecture": name}
    model.default_cfg = model.pretrained_cfg
    if fused_mixer:
        set_triton_mixers(model)
    if features_only:
        model.as_features(out_indices)
    if checkpoint_path is not None:
        load_checkpoint(model, checkpoint_path, use_ema=use_ema)
    elif pretrained:
        load_checkpoint(model, fetch_pretrained(name, entry.cfg))
    return model


def create_any_model(
    name: str, pretrained: bool = False, checkpoint_path: str | os.PathLike | None = None, **kwargs: Any
) -> nn.Module:
    """This package's models by name, else timm's (the peers of Tables 4-7 and Figure 4, ``hf-hub:``/``local-dir:``
    sources included). Checkpoints go through this package's checked loader either way."""
    if is_model(name):
        return create_model(name, pretrained=pretrained, checkpoint_path=checkpoint_path, **kwargs)
    import timm

    if not (timm.is_model(name.split(".")[0]) or name.startswith(HUB_PREFIXES)):  # arch[.tag]
        try:
            get_entry(name)
        except UnknownModelError as e:
            raise UnknownModelError(f"{e} timm's models are accepted too (timm.list_models()).") from None
    model = timm.create_model(name, pretrained=pretrained and checkpoint_path is None, **kwargs)
    if checkpoint_path is not None:
        load_checkpoint(model, checkpoint_path)
    return model


# what an exported folder's config adds to the model's own pretrained cfg
_FOLDER_CFG_KEYS = (*PREPROCESSING_KEYS, "label_names")


def _timm_entrypoint(name: str):
    def entrypoint(pretrained: bool = False, pretrained_cfg: Any = None, **kwargs: Any) -> MetaNeXt:
        cfg = pretrained_cfg.to_dict() if hasattr(pretrained_cfg, "to_dict") else pretrained_cfg
        kwargs.pop("pretrained_model_args", None)
        if pretrained and isinstance(cfg, dict) and cfg.get("source") in HUB_SOURCES:
            # a folder exported by `inceptionnext hub export`: its weights, preprocessing and labels
            if cfg.get("num_classes") is not None:
                kwargs.setdefault("num_classes", cfg["num_classes"])
            model = create_model(name, checkpoint_path=weights_file_for(cfg), **kwargs)
            model.pretrained_cfg = {**model.pretrained_cfg, **{k: cfg[k] for k in _FOLDER_CFG_KEYS if k in cfg}}
            model.default_cfg = model.pretrained_cfg
            return model
        return create_model(name, pretrained=pretrained, **kwargs)

    entrypoint.__name__ = entrypoint.__qualname__ = name
    entrypoint.__module__ = __name__
    entrypoint.__doc__ = get_entry(name).description
    return entrypoint


def register_in_timm() -> list[str]:
    """Make ``timm.create_model(name)`` build this package's models. Names timm already uses are left alone."""
    import timm
    from timm.models import register_model

    existing = set(timm.list_models())
    added = []
    for name in list_models():
        if name in existing:
            continue
        register_model(_timm_entrypoint(name))
        added.append(name)
    return added
