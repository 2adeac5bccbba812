"""Pretrained weights, their eval preprocessing and the paper's figures as typed data; finding and downloading weights.

This is the one place that says what eval preprocessing is (:data:`PREPROCESSING_KEYS`), what its defaults are (the
field defaults of :class:`PretrainedCfg`) and how a model's settings are resolved (:func:`resolve_data_config`): the
data transforms, model loading, export metadata, ONNX serving and the Hub export all go through it.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from ..errors import UserError

__all__ = [
    "HUB_PREFIXES",
    "HUB_SOURCES",
    "HUB_WEIGHTS",
    "PREPROCESSING_KEYS",
    "PaperFigures",
    "PretrainedCfg",
    "PretrainedWeightsUnavailable",
    "fetch_pretrained",
    "resolve_data_config",
    "sha256_file",
    "weights_file_for",
]

# The eval preprocessing of a classifier, in timm's ``pretrained_cfg`` names (what ``timm.data.create_transform``
# takes for eval); defaults are the field defaults of PretrainedCfg below.
PREPROCESSING_KEYS = ("input_size", "crop_pct", "interpolation", "mean", "std")
# A folder in timm's Hugging Face layout (``inceptionnext hub export``): its weights file, and timm's two sources
# for it, ``hf-hub:OWNER/REPO`` and ``local-dir:/path`` (model names with these prefixes).
HUB_WEIGHTS = "model.safetensors"
HUB_SOURCES = ("hf-hub", "local-dir")
HUB_PREFIXES = tuple(f"{source}:" for source in HUB_SOURCES)


@dataclass(frozen=True)
class PretrainedCfg:
    """Where a variant's released weights live and how to preprocess its eval images.

    ``url`` is the file released by the official repository; ``hf_hub_id`` the Hugging Face Hub copy in timm's
    layout (same keys for InceptionNeXt). ``sha256`` is checked when set: the releases publish no hashes, so for
    them it is ``None`` and the loader's key and shape checks are what guard against a wrong file.
    """

    url: str | None = None
    hf_hub_id: str | None = None
    hf_filename: str = HUB_WEIGHTS
    sha256: str | None = None
    num_classes: int = 1000
    input_size: tuple[int, int, int] = (3, 224, 224)
    crop_pct: float = 0.875
    interpolation: str = "bicubic"
    mean: tuple[float, float, float] = IMAGENET_DEFAULT_MEAN
    std: tuple[float, float, float] = IMAGENET_DEFAULT_STD
    recipe: str = ""

    @property
    def has_weights(self) -> bool:
        return bool(self.url or self.hf_hub_id)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


_DEFAULT_PREPROCESSING: dict[str, Any] = {
    f.name: f.default for f in fields(PretrainedCfg) if f.name in PREPROCESSING_KEYS
}


def resolve_data_config(source: Any = None, overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The eval preprocessing (``input_size``, ``crop_pct``, ``interpolation``, ``mean``, ``std``) of a model.

    Each key comes from ``overrides`` where set (not ``None``), else from ``source``, else from the defaults of
    :class:`PretrainedCfg` (timm's defaults: 224 px, crop 0.875, bicubic, ImageNet mean/std). ``source`` is a
    model (its ``pretrained_cfg``, timm's models included), a :class:`PretrainedCfg`, a mapping (a pretrained cfg, a
    checkpoint's ``eval_preprocessing``, export metadata) or ``None``. Sizes and statistics come back as tuples.
    For a model with a pretrained cfg this equals ``timm.data.resolve_model_data_config`` (less ``crop_mode``).
    """
    if source is None:
        cfg: Mapping[str, Any] = {}
    elif isinstance(source, PretrainedCfg):
        cfg = source.to_dict()
    elif isinstance(source, Mapping):
        cfg = source
    else:
        cfg = getattr(source, "pretrained_cfg", None) or getattr(source, "default_cfg", None) or {}
        cfg = cfg.to_dict() if hasattr(cfg, "to_dict") else cfg
    overrides = overrides or {}
    out: dict[str, Any] = {}
    for key in PREPROCESSING_KEYS:
        value = overrides.get(key)
        if value is None:
            value = cfg.get(key)
        if value is None:
            value = _DEFAULT_PREPROCESSING[key]
        out[key] = tuple(value) if isinstance(value, (list, tuple)) else value
    return out


@dataclass(frozen=True, kw_only=True)
class PaperFigures:
    """Figures printed in the paper for a variant, kept as printed (strings keep their precision).

    Keyword-only: six numbers in a row would not say which is the parameter count and which the MACs.
    """

    table: str
    params_m: str
    macs_g: str
    top1: float | None = None
    train_throughput: int | None = None
    infer_throughput: int | None = None
    throughput_device: str = ""
    # Table 4 prints a second GPU next to the A100: the 2080Ti in FP32 (Table 5's device)
    train_throughput_2080ti: int | None = None
    infer_throughput_2080ti: int | None = None

    @staticmethod
    def decimals(printed: str) -> int:
        return len(printed.split(".")[1]) if "." in printed else 0


class PretrainedWeightsUnavailable(UserError, RuntimeError):
    """The weights could not be found locally nor downloaded; the message says what to fetch and how to pass it."""


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _url_cache_path(url: str) -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url.split("?")[0])


def _verified(path: Path, sha256: str | None) -> Path:
    if sha256 and sha256_file(path) != sha256:
        raise PretrainedWeightsUnavailable(
            f"{path} does not match the published sha256 {sha256}; delete it and download it again"
        )
    return path


def weights_file_for(pretrained_cfg: Mapping[str, Any]) -> Path | None:
    """The weights file of a folder exported in timm's layout, from timm's ``local-dir:`` / ``hf-hub:`` pretrained
    config (downloaded if needed); ``None`` for other sources."""
    source = pretrained_cfg.get("source")
    if source == "local-dir":
        folder = Path(pretrained_cfg["file"])
        for name in (HUB_WEIGHTS, "pytorch_model.bin", "open_clip_pytorch_model.bin"):
            if (folder / name).is_file():
                return folder / name
        raise PretrainedWeightsUnavailable(f"{folder} has no {HUB_WEIGHTS} (nor pytorch_model.bin)")
    if source == "hf-hub":
        from huggingface_hub import hf_hub_download

        return Path(hf_hub_download(pretrained_cfg["hf_hub_id"], HUB_WEIGHTS))
    return None


def fetch_pretrained(name: str, cfg: PretrainedCfg) -> Path:
    """Path of the released weights of ``name``: the local cache first, then a download (Hub copy, then URL)."""
    if not cfg.has_weights:
        raise PretrainedWeightsUnavailable(f"no pretrained weights are released for {name!r}")
    if cfg.url and _url_cache_path(cfg.url).is_file():
        return _verified(_url_cache_path(cfg.url), cfg.sha256)
    errors: list[str] = []
    if cfg.hf_hub_id:
        try:
            from huggingface_hub import hf_hub_download

            return _verified(Path(hf_hub_download(cfg.hf_hub_id, cfg.hf_filename)), cfg.sha256)
        except PretrainedWeightsUnavailable:
            raise
        except Exception as e:  # offline, hub unreachable, package missing: fall back to the URL
            errors.append(f"Hugging Face Hub {cfg.hf_hub_id}: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
    if cfg.url:
        dst = _url_cache_path(cfg.url)
        dst.parent.mkdir(parents=True, exist_ok=True)
        try:
            torch.hub.download_url_to_file(cfg.url, str(dst), progress=True)
            return _verified(dst, cfg.sha256)
        except PretrainedWeightsUnavailable:
            raise
        except Exception as e:
            errors.append(f"{cfg.url}: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}")
    sources = []
    if cfg.url:
        sources.append(f"  {cfg.url}")
    if cfg.hf_hub_id:
        sources.append(f"  https://huggingface.co/{cfg.hf_hub_id}/resolve/main/{cfg.hf_filename}")
    local = f"{_url_cache_path(cfg.url)}" if cfg.url else "<path>"
    raise PretrainedWeightsUnavailable(
        f"Pretrained weights for {name!r} could not be downloaded:\n  "
        + "\n  ".join(errors)
        + "\nFetch one of these files on a machine with internet access:\n"
        + "\n".join(sources)
        + f"\nthen pass it with create_model({name!r}, checkpoint_path='FILE') "
        f"(CLI: --checkpoint FILE), or place the .pth file at {local}."
    )
