"""Training checkpoints: written atomically, read without unpickling code, checked before a run trusts them.

A training checkpoint holds everything needed to continue exactly (model, EMA, optimizer, scheduler, scaler,
epoch/step, RNG states, config); :class:`~inceptionnext.engine.run.TrainingRun` decides what goes in.
"""

from __future__ import annotations

import errno
import glob
import os
import random
import secrets
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..checkpoint import CheckpointError, load_state_dict_checked, read_checkpoint

__all__ = [
    "CheckpointWriteError",
    "atomic_save",
    "capture_rng",
    "load_exact",
    "load_task_model",
    "read_task_config",
    "read_training_checkpoint",
    "restore_rng",
    "temporaries",
]


class CheckpointWriteError(CheckpointError):
    """A checkpoint could not be written (full disk, quota, read-only folder); the previous file is intact."""


def atomic_save(obj: Any, path: str | os.PathLike, *, before_replace: Callable[[Path], None] | None = None) -> Path:
    """Write to a temporary file in the same directory, fsync, then rename over ``path``.

    A crash or a full disk during the write leaves the previous file intact. The file gets the mode any other output
    gets (``0o666`` less the umask), not ``mkstemp``'s owner-only ``0o600``. A failed write (full disk, quota, a
    read-only or vanished folder) raises :class:`CheckpointWriteError`, a user error saying the previous file is
    intact, instead of torch's ``enforce fail at inline_container.cc``. ``before_replace(tmp)`` runs when the data
    is on disk and not yet renamed: the test hook of a kill during a save.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _create_temporary(path)
    try:
        try:
            with open(tmp, "wb") as f:
                torch.save(obj, f)
                f.flush()
                os.fsync(f.fileno())
        except (OSError, RuntimeError) as e:
            reason = _write_failure(e)
            if reason is None:
                raise
            previous = f"the previous {path.name} is intact" if path.exists() else f"no {path.name} was written"
            raise CheckpointWriteError(f"could not write {path}: {reason}; {previous}") from e
        if before_replace is not None:
            before_replace(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def _create_temporary(path: Path) -> str:
    """A new, empty ``.NAME.XXXXXXXX.tmp`` beside ``path``, created with the umask applied (``mkstemp`` forces 0600)."""
    for _ in range(100):
        tmp = str(path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp")
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"could not create a temporary file beside {path}")


def temporaries(folder: str | os.PathLike, name: str) -> list[Path]:
    """The temporary files that :func:`atomic_save` of ``folder/name`` leaves when the process is killed mid-write."""
    return sorted(Path(folder).glob(f".{glob.escape(name)}.*.tmp"))


_DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def _write_failure(e: BaseException) -> str | None:
    """Why a write failed, in words, when it is the file system's doing (else None: a bug keeps its traceback).

    torch reports a failed write of its zip container as ``RuntimeError: [enforce fail at inline_container.cc]``,
    with the ``OSError`` of the file object (if any) as the context.
    """
    for err in (e, e.__cause__, e.__context__):
        if isinstance(err, OSError) and err.errno is not None:
            if err.errno in _DISK_FULL:
                return f"the disk is full ({err.strerror})"
            return f"{err.strerror or err}"
    if isinstance(e, RuntimeError) and ("inline_container" in str(e) or "PytorchStreamWriter" in str(e)):
        return f"the write failed, most likely because the disk is full ({str(e).strip()})"
    return None


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


def read_task_config(checkpoint: str | os.PathLike, cfg_cls: type, *, key: str, task: str, command: str) -> tuple:
    """``(config, checkpoint dict)`` of a task's training checkpoint (``last.pth`` / ``best.pth``) for inference:
    the file must hold ``config`` (with the task's defining ``key``) and ``class_names``; a classification
    checkpoint, another task's, or one with config keys this version does not know is a CheckpointError saying so.
    The config comes back with ``pretrained`` off and no ``backbone_checkpoint``: the weights are the file's."""
    import dataclasses

    ckpt = read_checkpoint(checkpoint)
    if not isinstance(ckpt, dict) or "config" not in ckpt or "class_names" not in ckpt:
        raise CheckpointError(f"{checkpoint} is not a {task} checkpoint of this package (no config/class names)")
    config = ckpt["config"]
    if "model_name" in ckpt or not isinstance(config, dict) or key not in config:
        what = f"a classification checkpoint ({ckpt['model_name']})" if "model_name" in ckpt else "not one"
        raise CheckpointError(
            f"{checkpoint} is {what}, not a {task} checkpoint of this package; {command} eval/predict take the "
            f"last.pth or best.pth of `inceptionnext {command} train` (classifiers: `inceptionnext validate`/`predict`)"
        )
    known = {f.name for f in dataclasses.fields(cfg_cls)}
    unknown = sorted(set(config) - known)
    if unknown:
        raise CheckpointError(
            f"{checkpoint} has config keys this version does not know: {', '.join(unknown)} (a newer version's file?)"
        )
    return cfg_cls(**{**config, "pretrained": False, "backbone_checkpoint": None}), ckpt


def load_task_model(
    checkpoint: str | os.PathLike, cfg_cls: type, build: Callable[[Any, int], nn.Module], *, key: str, task: str,
    command: str,
) -> tuple[nn.Module, Any, list[str]]:  # fmt: skip
    """``(model in eval mode, config, class names)`` of a task's training checkpoint: the config read and checked
    as :func:`read_task_config` does, the model from ``build(config, number of classes)`` with the file's weights
    (every key checked)."""
    cfg, ckpt = read_task_config(checkpoint, cfg_cls, key=key, task=task, command=command)
    model = build(cfg, len(ckpt["class_names"]))
    load_state_dict_checked(model, ckpt["model"], source=str(checkpoint))
    return model.eval(), cfg, list(ckpt["class_names"])
