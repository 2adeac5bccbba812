"""Reading, remapping and loading checkpoints, safely.

Accepted files:
    * the official InceptionNeXt releases and timm / Hugging Face copies (``.pth``, ``.bin``, ``.safetensors``):
      same keys as this package, loaded as they are;
    * ConvNeXt-layout files (the original ConvNeXt code and the Table 1 variants of the InceptionNeXt repository:
      ``downsample_layers.*``, ``stages.S.B.{dwconv,norm,pwconv1,pwconv2,gamma}``, ``norm``, ``head``; the isotropic
      ``stem``/``blocks.B`` layout), and timm's ConvNeXt layout (``conv_dw``, ``mlp.fc1`` as Linear);
    * this package's training checkpoints (``{"model": ..., "ema": ..., ...}``) and wrapped or DDP-prefixed
      state dicts.

Nothing is unpickled beyond tensors and plain containers: ``torch.load(weights_only=True)`` or safetensors.
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import UserError

__all__ = [
    "CheckpointError",
    "read_checkpoint",
    "extract_state_dict",
    "detect_layout",
    "remap_state_dict",
    "load_state_dict_checked",
    "load_checkpoint",
    "LoadReport",
]

_WRAPPER_KEYS = ("state_dict", "model", "module", "net")
_EMA_KEYS = ("ema", "model_ema", "state_dict_ema")
_PREFIXES = ("module.", "_orig_mod.", "model.")


class CheckpointError(UserError, RuntimeError):
    """A checkpoint that cannot be read or does not fit the model; the message says which keys and why."""


def read_checkpoint(path: str | os.PathLike) -> Any:
    """Load a checkpoint file without executing code: safetensors, or ``torch.load(weights_only=True)``."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint file not found: {path}")
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint file is empty: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except Exception as e:
            raise CheckpointError(f"{path} is not a readable safetensors file ({type(e).__name__}: {e})") from e
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise _load_error(path, e) from e


_ZIP_MAGIC = b"PK\x03\x04"  # torch.save's format since PyTorch 1.6


def _load_error(path: Path, e: Exception) -> CheckpointError:
    """What a failed ``torch.load(weights_only=True)`` means, from the file's first bytes and the error.

    The weights-only unpickler reports a pickled code object, an unknown class and plain garbage all as
    ``UnpicklingError``, so the file's format decides the wording: only a zip checkpoint or a pickle stream can hold
    pickled Python objects; anything else is not a checkpoint file at all.
    """
    text = str(e)
    msg = text.splitlines()[0] if text else type(e).__name__
    with open(path, "rb") as f:
        head = f.read(8)
    is_pickle = len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5  # PROTO opcode: a pickle stream
    globals_refused = "Unsupported global" in text or "unsupported GLOBAL" in text
    if (head.startswith(_ZIP_MAGIC) or is_pickle) and (globals_refused or "weights_only" in text):
        # the unpickler's own line (which global, which opcode), not torch's advice to load it unsafely
        lines = [ln.strip() for ln in text.splitlines()]
        found = next((ln for ln in lines if "GLOBAL" in ln), None) or next(
            (ln for ln in lines if ln.startswith("Unsupported")), "refused by the weights-only unpickler"
        )
        return CheckpointError(
            f"{path} contains pickled Python objects beyond tensors; it is refused because loading it could "
            f"execute code. Re-save only the state dict (torch.save(model.state_dict(), ...)). ({found})"
        )
    if head.startswith(_ZIP_MAGIC) or is_pickle:
        return CheckpointError(
            f"{path} is corrupt or not a PyTorch/safetensors checkpoint (truncated?) ({type(e).__name__}: {msg})"
        )
    return CheckpointError(
        f"{path} is not a checkpoint file: it is neither a PyTorch checkpoint (zip or pickle) nor safetensors "
        f"(first bytes {head!r})"
    )


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(isinstance(v, torch.Tensor) for v in obj.values())


def extract_state_dict(obj: Any, use_ema: bool = False) -> dict[str, torch.Tensor]:
    """The state dict inside a checkpoint object: unwraps ``{"model": ...}``-style containers (``ema`` first when
    ``use_ema``) and strips ``module.`` (DDP), ``_orig_mod.`` (torch.compile) prefixes."""
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"expected a state dict or a dict holding one, got {type(obj).__name__}")
    keys = (*_EMA_KEYS, *_WRAPPER_KEYS) if use_ema else _WRAPPER_KEYS
    if use_ema and not any(isinstance(obj.get(k), Mapping) for k in _EMA_KEYS):
        what = "a plain state dict" if _is_state_dict(obj) else f"keys: {', '.join(sorted(map(str, obj))[:10])}"
        raise CheckpointError(
            f"use_ema (--use-ema) was asked for but the checkpoint holds no EMA weights ({what}); leave it out to use "
            "the weights it has"
        )
    while not _is_state_dict(obj):
        inner = next((obj[k] for k in keys if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
            if tensors:  # state dict with a few non-tensor extras (e.g. an epoch counter)
                obj = tensors
                break
            raise CheckpointError(f"no state dict found in checkpoint (top-level keys: {sorted(obj)[:10]})")
        obj = inner
    sd = dict(obj)
    for prefix in _PREFIXES:
        if all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix) :]: v for k, v in sd.items()}
    return sd


def detect_layout(sd: Mapping[str, torch.Tensor]) -> str:
    """``"convnext"`` (original ConvNeXt code), ``"convnext_iso"``, ``"timm_convnext"`` or ``"native"``."""
    if any(k.startswith("downsample_layers.") for k in sd):
        return "convnext"
    if "stem.weight" in sd and any(k.startswith("blocks.") for k in sd):
        return "convnext_iso"
    if any(".conv_dw." in k for k in sd):
        return "timm_convnext"
    return "native"


def _linear_to_conv(k: str, v: torch.Tensor) -> torch.Tensor:
    return v[:, :, None, None] if re.search(r"\.mlp\.fc[12]\.weight$", k) and v.ndim == 2 else v


def remap_state_dict(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename (and reshape) the keys of a foreign-layout state dict to this package's layout. Pure function.

    ConvNeXt's MLP is ``nn.Linear`` on channels-last tensors; here it is a 1x1 convolution, so its weights gain two
    trailing unit dimensions. Everything else is a rename.
    """
    layout = detect_layout(sd)
    if layout == "native":
        return dict(sd)
    out: dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        nk = k
        if layout == "convnext":
            nk = re.sub(r"^downsample_layers\.0\.", "stem.", nk)
            nk = re.sub(r"^downsample_layers\.(\d+)\.", r"stages.\1.downsample.", nk)
            nk = re.sub(r"^stages\.(\d+)\.(\d+)\.", r"stages.\1.blocks.\2.", nk)
        elif layout == "convnext_iso":
            nk = re.sub(r"^stem\.", "stem.0.", nk)
            nk = re.sub(r"^blocks\.", "stages.0.blocks.", nk)
        if layout in ("convnext", "convnext_iso"):
            nk = re.sub(r"\.dwconv\.(conv\.)?", ".token_mixer.conv.", nk)
            nk = re.sub(r"\.pwconv([12])\.", r".mlp.fc\1.", nk)
            nk = re.sub(r"^norm\.", "head.norm.", nk)
            nk = re.sub(r"^head\.(weight|bias)$", r"head.fc.\1", nk)
        else:  # timm_convnext
            nk = nk.replace(".conv_dw.", ".token_mixer.conv.")
        out[nk] = _linear_to_conv(nk, v)
    return out


@dataclass
class LoadReport:
    """What :func:`load_state_dict_checked` did, for logs."""

    layout: str
    reinitialized: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)


def _listing(keys: list[str], limit: int = 12) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys)} in all)" if len(keys) > limit else "")


def load_state_dict_checked(
    model: nn.Module, sd: Mapping[str, torch.Tensor], *, source: str = "checkpoint", strict: bool = True,
    reinit_head: bool = True,
) -> LoadReport:  # fmt: skip
    """Load a (possibly foreign-layout) state dict into ``model`` with clear errors.

    * Missing or unexpected keys and shape mismatches raise :class:`CheckpointError` listing them (``strict``).
    * A classifier of another size (another ``num_classes``) is left at its fresh init, with a warning, to be
      fine-tuned; with ``reinit_head=False`` (inference, where a random head gives meaningless predictions) it
      raises :class:`CheckpointError` naming both class counts.
    * A features-only backbone ignores the head (and pruned stages) of a classification checkpoint.

    Foreign layouts are renamed only for models that declare ``accepts_foreign_layouts`` (this package's MetaNeXt):
    a timm model keeps timm's keys. The flag, rather than an isinstance check, keeps this module free of the model
    classes, which import it.
    """
    layout = detect_layout(sd) if getattr(model, "accepts_foreign_layouts", False) else "native"
    if layout != "native":
        sd = remap_state_dict(sd)
    own = model.state_dict()
    report = LoadReport(layout)

    if getattr(model, "features_only", False):
        report.ignored = sorted(k for k in sd if k not in own and (k.startswith("head.") or k.startswith("stages.")))
        sd = {k: v for k, v in sd.items() if k not in report.ignored}
    classifier = set(model.classifier_keys()) if hasattr(model, "classifier_keys") else set()
    mismatched = [k for k in sd if k in own and sd[k].shape != own[k].shape]
    if not reinit_head:
        _refuse_other_head(model, source, [k for k in mismatched if k in (classifier or _classifier_keys(model))],
                           sd, own)  # fmt: skip
    head_mismatch = [k for k in mismatched if k in classifier]
    if head_mismatch:
        report.reinitialized = head_mismatch
        warnings.warn(
            f"{source}: classifier {', '.join(head_mismatch)} has shape {tuple(sd[head_mismatch[0]].shape)}, the "
            f"model {tuple(own[head_mismatch[0]].shape)} (another num_classes); it is re-initialised for fine-tuning.",
            stacklevel=3,
        )
    sd = {k: v for k, v in sd.items() if k not in head_mismatch}
    other_mismatch = [k for k in mismatched if k not in classifier]
    missing = [k for k in own if k not in sd and not k.endswith("num_batches_tracked") and k not in head_mismatch]
    unexpected = [k for k in sd if k not in own]

    problems = []
    if other_mismatch:
        problems.append(
            "shape mismatch: "
            + _listing([f"{k} {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}" for k in other_mismatch], 6)
        )
    if strict and missing:
        problems.append(f"missing keys: {_listing(missing)}")
    if strict and unexpected:
        problems.append(f"unexpected keys: {_listing(unexpected)}")
    if problems:
        hint = ""
        if missing and len(missing) > len(own) // 2:
            hint = "\nMost of the model's keys are absent: is this a checkpoint of another architecture?"
        raise CheckpointError(
            f"{source} does not fit {type(model).__name__} (layout detected: {layout}):\n  "
            + "\n  ".join(problems)
            + hint
        )
    model.load_state_dict({k: v for k, v in sd.items() if k in own}, strict=False)  # strictness is checked above
    return report


def _classifier_keys(model: nn.Module) -> set[str]:
    """The parameter names of a timm model's classifier (``get_classifier()``), for models without
    ``classifier_keys``."""
    get = getattr(model, "get_classifier", None)
    head = get() if callable(get) else None
    if not isinstance(head, nn.Module):
        return set()
    for name, module in model.named_modules():
        if module is head:
            return {f"{name}.{p}" if name else p for p, _ in module.named_parameters()}
    return set()


def _refuse_other_head(
    model: nn.Module, source: str, keys: list[str], sd: Mapping[str, torch.Tensor], own: Mapping[str, torch.Tensor]
) -> None:
    if not keys:
        return
    key = next((k for k in keys if k.endswith("weight")), keys[0])
    theirs, ours = sd[key].shape[0], own[key].shape[0]
    raise CheckpointError(
        f"{source} has a {theirs}-class classifier ({key} {tuple(sd[key].shape)}) but the model is built for {ours} "
        f"classes; its predictions would come from a random head. Build the model with the checkpoint's {theirs} "
        f"classes (num_classes={theirs}; on the command line --num-classes {theirs}, or the right --model) or use a "
        "checkpoint that carries its class names (a training checkpoint of this package)"
    )


def load_checkpoint(
    model: nn.Module, path: str | os.PathLike, *, use_ema: bool = False, strict: bool = True
) -> LoadReport:
    """Load a checkpoint file into ``model`` (any layout of this module's docstring). Returns a :class:`LoadReport`."""
    sd = extract_state_dict(read_checkpoint(path), use_ema=use_ema)
    return load_state_dict_checked(model, sd, source=str(path), strict=strict)
