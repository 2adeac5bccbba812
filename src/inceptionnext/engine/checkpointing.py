"""Training checkpoints: written atomically, read without unpickling code, checked before a run trusts them.

A training checkpoint holds everything needed to continue exactly (model, EMA, optimizer, scheduler, scaler,
epoch/step, RNG states, config); :class:`~inceptionnext.engine.run.TrainingRun` decides what goes in.
"""

from __future__ import annotations

import os
import random
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..checkpoint import CheckpointError, read_checkpoint

__all__ = ["atomic_save", "capture_rng", "load_exact", "read_training_checkpoint", "restore_rng"]


def atomic_save(obj: Any, path: str | os.PathLike) -> Path:
    """Write to a temporary file in the same directory, fsync, then rename over ``path``.

    A crash or a full disk during the write leaves the previous file intact.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def capture_rng() -> dict[str, Any]:
    """Python, numpy and torch (CPU and CUDA) generator states, as plain types that load with weights_only."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "python": [list(x) if isinstance(x, tuple) else x for x in random.getstate()],
        "numpy": {
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "gauss": float(gauss),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    np_state = state["numpy"]
    np.random.set_state(
        (
            "MT19937",
            np_state["keys"].numpy().astype(np.uint32),
            np_state["pos"],
            np_state["has_gauss"],
            np_state["gauss"],
        )
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def read_training_checkpoint(path: str | os.PathLike, required: Iterable[str], what: str) -> dict[str, Any]:
    """Read ``path`` safely (``weights_only``) and check that it is a training checkpoint of ``what``: a mapping
    holding every ``required`` key. Anything else raises :class:`CheckpointError` saying what the file is."""
    ckpt = read_checkpoint(path)
    if not isinstance(ckpt, Mapping):
        raise CheckpointError(f"{path} is not a training checkpoint (it holds a {type(ckpt).__name__})")
    if ckpt and all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        raise CheckpointError(
            f"{path} holds weights only (a state dict), not a {what} training checkpoint with optimizer, step and RNG "
            "states: it can start a new run (--initial-checkpoint, --backbone-checkpoint) but not resume one"
        )
    missing = [k for k in required if k not in ckpt]
    if missing:
        raise CheckpointError(f"{path} is not a {what} training checkpoint: it lacks {', '.join(missing)}")
    return dict(ckpt)


def load_exact(module: nn.Module, state_dict: Mapping[str, torch.Tensor], source: str) -> None:
    """Load a state dict that must match ``module`` key for key and shape for shape.

    Resuming continues the same run, so unlike fine-tuning nothing is remapped or re-initialised: any difference
    means the file belongs to another model and raises :class:`CheckpointError` listing the differences.
    """
    own = module.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    shapes = [
        f"{k} {tuple(state_dict[k].shape)} vs {tuple(own[k].shape)}"
        for k in own
        if k in state_dict and tuple(state_dict[k].shape) != tuple(own[k].shape)
    ]
    problems = [
        f"{label}: {', '.join(keys[:6])}{f', ... ({len(keys)} in all)' if len(keys) > 6 else ''}"
        for label, keys in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatch", shapes))
        if keys
    ]
    if problems:
        raise CheckpointError(f"{source} does not fit this run's {type(module).__name__}:\n  " + "\n  ".join(problems))
    module.load_state_dict(state_dict)
