"""Pretrained weights and the paper's figures as typed data, and the download of released weights."""

from __future__ import annotations

import hashlib
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from ..errors import UserError

__all__ = ["PretrainedCfg", "PaperFigures", "PretrainedWeightsUnavailable", "fetch_pretrained", "sha256_file"]


@dataclass(frozen=True)
class PretrainedCfg:
    """Where a variant's released weights live and how to preprocess its eval images.

    ``url`` is the file released by the official repository; ``hf_hub_id`` the Hugging Face Hub copy in timm's
    layout (same keys for InceptionNeXt). ``sha256`` is checked when set: the releases publish no hashes, so for
    them it is ``None`` and the loader's key and shape checks are what guard against a wrong file.
    """

    url: str | None = None
    hf_hub_id: str | None = None
    hf_filename: str = "model.safetensors"
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


@dataclass(frozen=True)
class PaperFigures:
    """Figures printed in the paper for a variant, kept as printed (strings keep their precision)."""

    table: str
    params_m: str
    macs_g: str
    top1: float | None = None
    train_throughput: int | None = None
    infer_throughput: int | None = None
    throughput_device: str = ""

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
