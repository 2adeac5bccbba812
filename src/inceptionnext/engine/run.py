"""The engine core: the life cycle of one training run, shared by every task.

A task (classification, segmentation, the next one) subclasses :class:`TrainingRun` and writes its model, data,
loss and metric loop only: :meth:`~TrainingRun.build`, then either :meth:`~TrainingRun.train_one_epoch` and
:meth:`~TrainingRun.evaluate` for a run counted in epochs, or its own :meth:`~TrainingRun.fit` for a run counted
in optimizer steps. Everything else is done here, the same way for all of them:

* device, DDP and mixed precision (:mod:`.runtime`): :meth:`~TrainingRun.wrap`, :meth:`~TrainingRun.autocast`,
  :meth:`~TrainingRun.no_sync`, :meth:`~TrainingRun.backward` (GradScaler only for fp16);
* :meth:`~TrainingRun.optimizer_step`: gradient clipping, the scaler, the step count, the EMA, the scheduler's
  per-step update and the fault hooks the resume tests use (:data:`FAULT_ENV`, :data:`FAULT_RANK_ENV`,
  :data:`FAULT_SAVE_ENV`: a hard exit, or a hang, at a given step, rank or checkpoint write, as a kill would);
* the NaN policy: :meth:`~TrainingRun.check_finite` stops with :class:`NonFiniteLossError` naming the last good
  checkpoint; before every save the loss, the weights (and EMA) and the evaluation are checked, so a checkpoint
  never holds, and ``best.pth`` is never chosen by, non-finite numbers, and the last good one is never overwritten;
* atomic ``last.pth`` / ``best.pth`` holding everything needed to continue exactly (model, EMA, optimizer,
  scheduler, scaler, epoch/step, best, RNG states, config, git revision), and resume: from ``resume=PATH`` or else
  ``OUTPUT/last.pth``, read safely and checked against this run before anything in the output folder is written.
  A resume continues the checkpoint's run: keys that define its math must equal the checkpoint's config (else
  :class:`~inceptionnext.errors.ConfigError`), only :attr:`~TrainingRun.runtime_keys` may change. After a kill at
  any instant the folder is consistent again on the next start: ``best.pth`` is re-written from the record when the
  kill fell between the two writes, ``metrics.csv`` loses the rows past the resumed position, a killed write's
  temporary file is removed;
* under torchrun, a failure of one process while the run is being set up stops every process with its message, and
  a process whose peers died or hang fails after ``INCEPTIONNEXT_DIST_TIMEOUT`` seconds instead of waiting forever;
* ``metrics.csv`` (and TensorBoard) keyed on the task's :attr:`~TrainingRun.x_column`, ``curves.png`` from the
  task's :attr:`~TrainingRun.curves`, ``log.txt``, progress, the resolved ``config.yaml`` with the git revision,
  and ``summary.json``. Progress is drawn as bars only on a terminal: redirected to a file or a CI log, stderr gets
  one plain line per ``log_interval`` steps instead of carriage-return redraws (:class:`PlainProgress`), next to
  the line per epoch that :meth:`~TrainingRun.log` always writes; ``INCEPTIONNEXT_NO_PROGRESS`` silences bars and
  step lines.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import random
import sys
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, ClassVar, Protocol

import numpy as np
import torch
import yaml
from torch import nn
from tqdm import tqdm

from ..checkpoint import CheckpointError, read_checkpoint
from ..errors import ConfigError, UserError
from . import runtime
from .checkpointing import (
    CheckpointWriteError,
    atomic_save,
    capture_rng,
    load_exact,
    read_training_checkpoint,
    restore_rng,
    temporaries,
)
from .config import git_revision
from .ema import average_bn_statistics, batchnorm_layers
from .report import MetricsLog, Panel, plot_curves
from .runtime import (
    DIST_TIMEOUT_ENV,
    DistInfo,
    all_reduce_max,
    all_reduce_mean,
    cleanup_distributed,
    gather_errors,
    init_distributed,
    wrap_ddp,
)

__all__ = [
    "FAULT_ENV",
    "FAULT_RANK_ENV",
    "FAULT_SAVE_ENV",
    "NonFiniteLossError",
    "PeerFailedError",
    "PlainProgress",
    "RunConfig",
    "RunningLoss",
    "TrainingRun",
    "launch",
]

#: test hook: after optimizer step ``k`` exit hard (status 137, no clean-up, as SIGKILL would); ``k:hang`` sleeps
#: instead, as a process that stops answering
FAULT_ENV = "INCEPTIONNEXT_FAULT_AT_STEP"
#: test hook: only this rank takes :data:`FAULT_ENV`'s fault (default: every rank)
FAULT_RANK_ENV = "INCEPTIONNEXT_FAULT_RANK"
#: test hook: ``NAME[:k]`` exits hard during the k-th (default first) write of ``OUTPUT/NAME`` (``last.pth``,
#: ``best.pth``), its data on disk in the temporary file and not yet renamed
FAULT_SAVE_ENV = "INCEPTIONNEXT_FAULT_AT_SAVE"
_CHECKPOINTS = ("last.pth", "best.pth")  # written in this order; see TrainingRun._restore_best
_SETUP = "while setting up the run"


class NonFiniteLossError(RuntimeError):
    """The loss, the weights or an evaluation became NaN or infinite; training stopped without overwriting the last
    good checkpoint."""


class PeerFailedError(RuntimeError):
    """Another process of a torchrun launch failed; this one stops too (the message is the failing one's)."""


class PeerUserError(PeerFailedError, UserError):
    """Another process stopped on bad input (a :class:`~inceptionnext.errors.UserError`): printed in one line."""


class RunConfig(Protocol):
    """What the core reads from a task's config dataclass (an epoch-counted run also has ``epochs``)."""

    output: str
    seed: int
    amp: str

    def to_dict(self) -> dict[str, Any]: ...


class RunningLoss:
    """Sum and count of the training loss since the last reset, kept on the device so a step needs no sync."""

    def __init__(self, device: torch.device) -> None:
        self.sum = torch.zeros((), device=device)
        self.count = 0

    def update(self, loss: torch.Tensor) -> None:
        self.sum += loss.detach().float()
        self.count += 1

    def local_mean(self) -> float:
        """This process's mean (for progress bars: no collective)."""
        return self.sum.item() / max(self.count, 1)

    def mean(self) -> float:
        """The mean over all processes (a collective: call it on every rank)."""
        return all_reduce_mean(self.sum / max(self.count, 1)).item()

    def reset(self) -> None:
        self.sum.zero_()
        self.count = 0


class PlainProgress:
    """What :meth:`TrainingRun.progress_bar` gives when stderr is not a terminal: tqdm's calls, one plain line per
    :meth:`set_postfix` (a task calls it every ``log_interval`` steps) and nothing else; ``enabled=False``: silent.

    A bar redraws itself with carriage returns many times a second, which a file or a CI log keeps as one endless
    line; the line per interval (``epoch 3/30 step 40/120: loss 0.5123, lr 1.00e-03, img_s 812``) reads as a log.
    """

    def __init__(
        self, iterable: Iterable | None = None, *, desc: str = "", total: int | None = None, initial: int = 0,
        enabled: bool = True, **_: Any,
    ) -> None:  # fmt: skip
        self.iterable, self.desc, self.enabled = iterable, desc, enabled
        self.total = total if total is not None or iterable is None else _len_or_none(iterable)
        self.n = initial

    def __iter__(self):
        for item in self.iterable:
            yield item
            self.n += 1

    def update(self, n: int = 1) -> None:
        self.n += n

    def set_postfix(self, **values: Any) -> None:
        if self.enabled:
            where = f"{self.n}/{self.total}" if self.total is not None else str(self.n)
            text = ", ".join(f"{k} {v}" for k, v in values.items())
            print(f"{self.desc} step {where}: {text}".lstrip(), file=sys.stderr, flush=True)

    def set_description(self, desc: str, refresh: bool = True) -> None:
        self.desc = desc

    def close(self) -> None:
        pass


def _len_or_none(iterable: Iterable) -> int | None:
    try:
        return len(iterable)  # type: ignore[arg-type]
    except TypeError:
        return None


class TrainingRun:
    """One process of a training run. Subclasses set the class attributes below and write :meth:`build` and
    their loop; see the module docstring for what the core provides."""

    #: the task's name in messages ("not a <task> training checkpoint")
    task: ClassVar[str] = "training"
    #: the metrics column rows are keyed on: ``epoch`` (1-based) or ``step``
    x_column: ClassVar[str] = "epoch"
    #: the subplots of ``curves.png``: (y label, ((column, legend label), ...))
    curves: ClassVar[tuple[Panel, ...]] = (("loss", (("train_loss", "train loss"), ("val_loss", "val loss"))),)
    #: the entry of :attr:`best` (and by default the metrics column) that selects ``best.pth``; higher is better
    best_key: ClassVar[str] = "val_acc"
    #: keys a training checkpoint of this task holds beyond the core's
    checkpoint_keys: ClassVar[tuple[str, ...]] = ()
    #: the advice closing a :class:`NonFiniteLossError`
    nan_advice: ClassVar[str] = "Lower the learning rate or use --amp fp32/bf16 instead of fp16."
    #: config keys a resume may change: they decide how the run executes, not what it computes
    runtime_keys: ClassVar[tuple[str, ...]] = ("output", "workers", "log_interval")
    #: config keys that describe where a run came from; a resume keeps the checkpoint's
    provenance_keys: ClassVar[tuple[str, ...]] = ("recipe", "notes")
    #: how to train with changed keys instead of resuming (closes the :class:`~inceptionnext.errors.ConfigError`)
    new_run_advice: ClassVar[str] = "start a new run in another --output"

    def __init__(self, cfg: RunConfig, dist: DistInfo, *, resume: str | os.PathLike | None = None) -> None:
        self.cfg, self.dist = cfg, dist
        self.out = Path(cfg.output)
        self.main = dist.is_main
        # progress is reported by the main process unless silenced; drawn as bars only on a terminal
        self.report_progress = self.main and os.environ.get("INCEPTIONNEXT_NO_PROGRESS") is None
        self.progress = self.report_progress and _is_terminal(sys.stderr)
        self.resume_from = Path(resume) if resume is not None else None
        self.amp_dtype, use_scaler = runtime.autocast_settings(dist.device, cfg.amp)
        self.scaler = torch.amp.GradScaler("cuda", enabled=use_scaler)
        # set by build(): the model that is saved (unwrapped), what training calls (DDP of it), the optimizer
        self.model: nn.Module | None = None
        self.ddp: nn.Module | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.ema: Any = None  # timm ModelEmaV3 (or anything with .module and .update(model, step=))
        self.scheduler: Any = None  # timm scheduler (or anything with step_update(step) and state_dict())
        self.clip_grad: float | None = None
        self.class_names: list[str] | None = None  # a classifying task's classes: checkpointed, checked on resume
        self.lr: float | None = None  # the peak lr of this launch (scaled to its batch), for config.yaml
        self.step = 0  # optimizer steps done
        self.epoch: int | None = None  # the epoch under way (0-based) in an epoch-counted run
        self.start_epoch = 0
        self.best: dict[str, Any] = self.initial_best()
        self.running_loss = RunningLoss(dist.device)
        self.metrics: MetricsLog | None = None
        self.last_good: tuple[Path, str] | None = None  # (checkpoint, position) that a NaN stop points the user to
        self._nonfinite = torch.zeros((), dtype=torch.bool, device=dist.device)
        self._fault_step, self._fault_hang = _parse_fault_step(os.environ.get(FAULT_ENV, ""))
        fault_rank = os.environ.get(FAULT_RANK_ENV)
        if fault_rank is not None and int(fault_rank) != dist.rank:
            self._fault_step = 0
        self._fault_save = _parse_fault_save(os.environ.get(FAULT_SAVE_ENV, ""))
        self._writes = dict.fromkeys(_CHECKPOINTS, 0)

    # ---------------------------------------------------------------------------------------------- task hooks
    def build(self) -> None:
        """Datasets, model (registered with :meth:`wrap`), optimizer and the task's loss. Writes no file."""
        raise NotImplementedError

    def train_one_epoch(self, epoch: int) -> dict[str, float]:
        """One pass over the training data (epoch-counted runs); returns the row's training columns."""
        raise NotImplementedError

    def evaluate(self, epoch: int) -> dict[str, float]:
        """The row's evaluation columns after ``epoch`` (epoch-counted runs)."""
        raise NotImplementedError

    def initial_best(self) -> dict[str, Any]:
        return {self.best_key: float("-inf"), self.x_column: 0}

    def best_record(self, row: dict[str, Any]) -> dict[str, Any]:
        """What :attr:`best` becomes when ``row`` is the best so far."""
        return {self.best_key: row[self.best_key], self.x_column: row[self.x_column]}

    def task_state(self) -> dict[str, Any]:
        """Entries the task adds to its checkpoints: :attr:`class_names` when set (extend for preprocessing, ...)."""
        return {} if self.class_names is None else {"class_names": list(self.class_names)}

    def load_task_state(self, ckpt: Mapping[str, Any], source: str) -> None:
        """Check (and restore) the task's own entries of a checkpoint being resumed; raise CheckpointError. A run
        trained on other classes cannot be continued on this data."""
        if self.class_names is not None and "class_names" in ckpt and list(ckpt["class_names"]) != self.class_names:
            raise CheckpointError(
                f"{source} was trained on the classes {list(ckpt['class_names'])[:5]}..., the data has "
                f"{self.class_names[:5]}...: it cannot resume this run"
            )

    def config_extras(self) -> dict[str, Any]:
        """Values of this launch written to ``config.yaml`` after the config: the effective batch and scaled lr
        (when the config and :attr:`lr` have them) and the number of classes."""
        extras: dict[str, Any] = {}
        if hasattr(self.cfg, "effective_batch"):
            extras["effective_batch"] = self.cfg.effective_batch(self.dist.world_size)
        if self.lr is not None:
            extras["scaled_lr"] = self.lr
        if self.class_names is not None:
            extras["num_classes"] = len(self.class_names)
        return extras

    def describe(self) -> str | None:
        """A line of ``log.txt`` describing this launch (data, batch, learning rate, device)."""
        return None

    def epoch_message(self, row: dict[str, Any]) -> str:
        values = ", ".join(f"{k} {v:.4g}" for k, v in row.items() if k != "epoch" and isinstance(v, float))
        return f"epoch {row['epoch']}/{self.num_epochs}: {values}"

    @property
    def num_epochs(self) -> int:
        """Epochs an epoch-counted run trains (a task's config may add cool-down epochs to ``epochs``)."""
        return self.cfg.epochs

    # ---------------------------------------------------------------------------------------------- life cycle
    def run(self) -> dict[str, Any]:
        """Build, resume if there is something to resume, train, and write the run's summary."""
        seed_everything(self.cfg.seed)  # the same initial weights in every process
        error, ckpt, source = None, None, self.resume_from
        try:
            self._check_output()
            self.build()
            if self.model is None or self.optimizer is None:
                raise RuntimeError(f"{type(self).__name__}.build() must register a model (self.wrap) and an optimizer")
            # the training loop's own draws (drop path, Mixup/CutMix, erasing, RoI sampling) differ between processes,
            # as in timm's train.py (process 0, and a single process, go on with the stream the model was built from);
            # a resume replaces these with each process's saved states
            if self.dist.rank > 0:
                seed_everything(self.cfg.seed + self.dist.rank)
            if source is None and (self.out / "last.pth").exists():
                source = self.out / "last.pth"
            ckpt = self.resume(source) if source is not None else None
        except Exception as e:
            error = e
        self._stop_if_any_failed(error, _SETUP)
        # nothing in the output folder is written before this point
        try:
            self.out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ConfigError(f"cannot create the output folder {self.out}: {e.strerror or e}") from e
        if self.main:
            for name in _CHECKPOINTS:  # a write killed before its rename
                for tmp in temporaries(self.out, name):
                    tmp.unlink(missing_ok=True)
        self.metrics = MetricsLog(self.out, enabled=self.main, x=self.x_column)
        # rows past the checkpoint (all rows when starting afresh) belong to work that is about to be redone
        self.metrics.truncate_after(self._x_of(ckpt) if ckpt is not None else 0)
        if ckpt is not None:
            done = f"{_position(ckpt.get('epoch'), self.step)} done"
            if "epoch" in ckpt:
                done += f", step {self.step}"
            self.log(f"resumed from {source} ({done})")
            if self.main:
                self._restore_best(ckpt, Path(source))
        if self.main:
            self.write_resolved_config(source if ckpt is not None else None)
            line = self.describe()
            if line:
                self.log(line)
        try:
            summary = self.fit()
        except torch.distributed.DistError as e:
            e.add_note(self._peer_note())
            raise
        except RuntimeError as e:  # gloo reports a lost peer as a plain RuntimeError
            if self.dist.distributed and _is_collective_failure(e):
                e.add_note(self._peer_note())
            raise
        self.finish(summary)
        return summary

    def _check_output(self) -> None:
        """``--output`` must be a folder (or not exist yet): say so before anything is built or written."""
        for parent in (self.out, *self.out.parents):
            if parent.exists():
                if not parent.is_dir():
                    what = "the output folder" if parent == self.out else f"a folder above the output {self.out}"
                    raise ConfigError(f"{parent} is a file, not a folder: it cannot be {what}; give another --output")
                return

    def _stop_if_any_failed(self, error: Exception | None, phase: str) -> None:
        """Raise ``error`` here, and on every other process a :class:`PeerFailedError` with its message, so that no
        process waits in a collective for one that has stopped. One process: just raise ``error``."""
        if isinstance(error, PeerFailedError):  # raised by an exchange already (in wrap): all know
            raise error
        failures = gather_errors(error) if self.dist.distributed else []
        if error is not None:
            raise error
        if failures:
            rank, message, user = failures[0]
            cls = PeerUserError if user else PeerFailedError
            raise cls(f"process {rank} of {self.dist.world_size} stopped {phase}: {message}")

    def _peer_note(self) -> str:
        timeout = os.environ.get(DIST_TIMEOUT_ENV, "1800")
        kept = "no checkpoint had been written yet"
        if self.last_good is not None:
            kept = f"the last good checkpoint is {self.last_good[0]} ({self.last_good[1]})"
        return (
            f"Another process of this run died or stopped answering (collectives time out after "
            f"{DIST_TIMEOUT_ENV}={timeout} s); {kept}: rerun the same command to resume."
        )

    def fit(self) -> dict[str, Any]:
        """The epoch loop: train, evaluate, record (metrics, best, checkpoint) and log, from the resumed epoch."""
        epochs = self.num_epochs
        row: dict[str, Any] = {}
        for epoch in self.progress_bar(
            range(self.start_epoch, epochs), desc="training", unit="epoch", initial=self.start_epoch, total=epochs
        ):
            self.epoch = epoch
            t0 = time.perf_counter()
            self.running_loss.reset()
            stats = self.train_one_epoch(epoch)
            self.check_finite()
            self.average_bn_statistics()
            row = {"epoch": epoch + 1, **stats, **self.evaluate(epoch)}
            row["epoch_time_s"] = time.perf_counter() - t0
            self.record(row)
            self.log(self.epoch_message(row))
        return {"best": self.best, "last": row, "output": str(self.out)}

    def average_bn_statistics(self) -> None:
        """Under torchrun, average the BatchNorm running statistics of the model (the layers that train; frozen ones
        never change) and of its EMA over the processes before they are evaluated and saved (timm's ``--dist-bn
        reduce``): each process evaluates, and the checkpoint holds, the same model."""
        if not self.dist.distributed:
            return
        layers = [m for m in batchnorm_layers(self.model) if m.training]
        if self.ema is not None:
            layers += batchnorm_layers(self.ema.module)
        average_bn_statistics(layers)

    def finish(self, summary: dict[str, Any]) -> None:
        self.metrics.close()
        if self.main and self.metrics.path.exists():
            png = plot_curves(self.metrics.path, self.out / "curves.png", self.curves, x=self.x_column)
            if png:
                self.log(f"curves: {png}")
        if self.main:
            (self.out / "summary.json").write_text(json.dumps(summary, indent=1))

    # ---------------------------------------------------------------------------------------------- training
    def wrap(self, model: nn.Module) -> nn.Module:
        """Register ``model`` (on its device) as the run's model, the one saved and resumed, and return what training
        calls: a DistributedDataParallel of it under torchrun, else the model itself (also :attr:`ddp`).

        Building DDP is the processes' first collective: a process that failed earlier in :meth:`build` never
        reaches it and meets the others in :meth:`run`'s exchange of errors instead, so they first exchange theirs
        here and stop together rather than pair mismatched collectives."""
        self._stop_if_any_failed(None, _SETUP)
        self.model = model
        self.ddp = wrap_ddp(model, self.dist)
        return self.ddp

    def autocast(self) -> contextlib.AbstractContextManager:
        return runtime.autocast(self.dist.device, self.amp_dtype)

    def no_sync(self, update: bool) -> contextlib.AbstractContextManager:
        """No DDP all-reduce on the micro-steps of gradient accumulation that end without an optimizer step."""
        if update or not self.dist.distributed:
            return contextlib.nullcontext()
        return self.ddp.no_sync()

    def backward(self, loss: torch.Tensor, accum: int = 1) -> None:
        """Backward of ``loss / accum`` through the GradScaler; the loss is counted and checked for NaN/inf."""
        self.scaler.scale(loss / accum).backward()
        loss = loss.detach()
        self.running_loss.update(loss)
        self._nonfinite |= ~torch.isfinite(loss)

    def optimizer_step(self) -> None:
        if self.clip_grad is not None:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip_grad)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        if self.ema is not None:
            self.ema.update(self.model, step=self.step)
        if self.scheduler is not None:
            self.scheduler.step_update(self.step)
        if self._fault_step and self.step == self._fault_step:
            if self._fault_hang:  # a process that stops answering: its peers must time out, not wait forever
                while True:
                    time.sleep(60)
            os._exit(137)  # simulate a hard kill mid-run, no clean-up

    def current_lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def check_finite(self) -> None:
        """Stop (on every process) if any process has seen a non-finite loss since the run started."""
        if all_reduce_max(self._nonfinite.float()).item() == 0:
            return
        self._stop_nonfinite(f"the loss became NaN/inf {self._where()}")

    def _where(self) -> str:
        if self.epoch is not None:
            return f"in epoch {self.epoch + 1} (around optimizer step {self.step})"
        return f"by optimizer step {self.step}"

    def _stop_nonfinite(self, what: str) -> None:
        kept = "no checkpoint had been written yet"
        if self.last_good is not None:
            kept = f"the last good checkpoint is {self.last_good[0]} ({self.last_good[1]})"
        raise NonFiniteLossError(f"{what}; training stopped and {kept}. {self.nan_advice}")

    def check_weights(self) -> None:
        """Stop (on every process) if a weight or buffer of the model or its EMA is NaN/inf.

        The loss is checked before each step; a step can still overflow the weights (the last step of a run, say)
        with a finite loss, and those weights must not be saved.
        """
        flags = []
        for module in (self.model, self.ema.module if self.ema is not None else None):
            if module is not None:
                tensors = [t for t in module.state_dict().values() if t.is_floating_point()]
                if tensors:
                    flags.append(torch.stack([torch.isfinite(t).all() for t in tensors]).all().to(self.dist.device))
        bad = ~torch.stack(flags).all() if flags else torch.zeros((), dtype=torch.bool, device=self.dist.device)
        if all_reduce_max(bad.float()).item() != 0:
            self._stop_nonfinite(f"the weights became NaN/inf {self._where()} (the loss was finite)")

    # ---------------------------------------------------------------------------------------------- checkpoints
    def record(self, row: dict[str, Any]) -> bool:
        """After an evaluation: update :attr:`best`, append ``row`` to the metrics and save; True if it is the best.

        Nothing is recorded, saved or chosen as best when the loss, the weights or a value of ``row`` is not finite.
        ``row`` is appended before the save: a kill between the two leaves a row past the checkpoint, which the next
        start drops (the work is redone); the other order would lose the row.
        """
        self.check_finite()
        self.check_weights()  # first: the cause, when it is also why the evaluation is NaN
        bad = [f"{k} {v}" for k, v in row.items() if isinstance(v, float) and not math.isfinite(v)]
        if bad:
            at = f"{self.x_column} {row.get(self.x_column)}"
            self._stop_nonfinite(f"the evaluation at {at} gave NaN/inf ({', '.join(bad)})")
        candidate = self.best_record(row)
        is_best = candidate[self.best_key] > self.best[self.best_key]
        if is_best:
            self.best = candidate
        self.metrics.append(row)
        self._write(is_best)
        return is_best

    def save(self, is_best: bool = False) -> None:
        """Atomically write ``last.pth`` (and ``best.pth``); refuses after a non-finite loss or with non-finite
        weights. Call on every rank."""
        self.check_finite()
        self.check_weights()
        self._write(is_best)

    def _write(self, is_best: bool) -> None:
        """``last.pth`` then, if best, ``best.pth``: a kill between the two leaves ``last.pth`` recording a best that
        ``best.pth`` lacks, which :meth:`_restore_best` repairs from ``last.pth`` itself. A failed write (full disk)
        stops every process, with the intact previous checkpoint named."""
        error, position = None, _position(self.epoch, self.step)
        # every process's generators: the detectors' proposal and RoI sampling draw different amounts per process
        rng = runtime.gather_objects(capture_rng())
        if self.main:
            try:
                state = self.checkpoint_state(rng)
                self._save_file(state, "last.pth")
                self.last_good = (self.out / "last.pth", position)
                if is_best:
                    self._save_file(state, "best.pth")
            except CheckpointWriteError as e:
                kept = "no checkpoint had been written yet"
                if self.last_good is not None:
                    kept = f"the last good checkpoint is {self.last_good[0]} ({self.last_good[1]})"
                error = CheckpointWriteError(f"{e}. Training stopped and {kept}; free space and rerun to resume.")
                error.__cause__ = e.__cause__
        if self.dist.distributed:
            failed = all_reduce_max(torch.tensor(float(error is not None), device=self.dist.device)).item()
            if failed and error is None:
                raise PeerFailedError("process 0 could not write the checkpoint (see its message); stopping too")
        if error is not None:
            raise error
        self.last_good = (self.out / "last.pth", position)

    def _save_file(self, state: dict[str, Any], name: str) -> None:
        self._writes[name] += 1
        hook = None
        if self._fault_save == (name, self._writes[name]):

            def hook(tmp: Path) -> None:
                os._exit(137)  # a kill during this write: the temporary file is left, the previous file intact

        atomic_save(state, self.out / name, before_replace=hook)

    def _x_of(self, ckpt: Mapping[str, Any]) -> int:
        """A checkpoint's position on the metrics' x column (``epoch`` is 1-based there, 0-based in checkpoints)."""
        return int(ckpt["epoch"]) + 1 if self.x_column == "epoch" else int(ckpt["step"])

    def _restore_best(self, ckpt: Mapping[str, Any], source: Path) -> None:
        """Make ``best.pth`` hold what the resumed checkpoint records as best, or forget a best it cannot hold.

        ``best.pth`` is up to date when its own record equals the checkpoint's. Else the best is taken from the
        resumed folder's ``best.pth`` (a resume from another folder), or is the resumed checkpoint itself (a kill
        between writing ``last.pth`` and ``best.pth``); failing both (a deleted file), the best is chosen afresh
        from the next evaluation, so that ``summary.json`` never reports a best that no file holds.
        """
        record = dict(ckpt["best"])
        if record == self.initial_best():
            return
        target = self.out / "best.pth"
        for candidate in dict.fromkeys([target.resolve(), (source.parent / "best.pth").resolve()]):
            found = self._read_best(candidate, record)
            if found is not None:
                if candidate != target.resolve():
                    self._save_file(found, "best.pth")
                    self.log(f"best.pth copied from {candidate} ({self.x_column} {record.get(self.x_column)})")
                return
        if record.get(self.x_column) == self._x_of(ckpt):
            self._save_file(dict(ckpt), "best.pth")
            self.log(f"best.pth re-written from {source}: the run had stopped before writing it")
            return
        self.log(
            f"warning: no best.pth holds the recorded best ({self.x_column} {record.get(self.x_column)}); "
            "the best is chosen afresh from the next evaluation"
        )
        self.best = self.initial_best()

    def _read_best(self, path: Path, record: Mapping[str, Any]) -> dict[str, Any] | None:
        """The checkpoint at ``path`` if it is the one ``record`` describes (None if absent, unreadable or other)."""
        if not path.is_file():
            return None
        try:
            ckpt = read_checkpoint(path)
        except CheckpointError:
            return None
        if not isinstance(ckpt, Mapping) or not isinstance(ckpt.get("best"), Mapping) or dict(ckpt["best"]) != record:
            return None
        try:
            same = self._x_of(ckpt) == record.get(self.x_column)
        except (KeyError, TypeError, ValueError):
            return None
        return dict(ckpt) if same else None

    def checkpoint_state(self, rng: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        """Everything a resume needs; ``rng``: every process's generator states in rank order (default: this
        process's alone)."""
        state: dict[str, Any] = {
            "model": self.model.state_dict(),
            "ema": self.ema.module.state_dict() if self.ema is not None else None,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "scaler": self.scaler.state_dict(),
        }
        if self.epoch is not None:
            state["epoch"] = self.epoch
        rng = rng or [capture_rng()]
        state.update(step=self.step, best=dict(self.best), rng=rng[0], config=self.cfg.to_dict())
        if len(rng) > 1:
            state["rng_per_rank"] = rng
        state["world_size"] = self.dist.world_size
        state.update(self.task_state())
        state["git"] = git_revision()
        return state

    def resume(self, path: str | os.PathLike) -> dict[str, Any]:
        """Restore every state from a training checkpoint of this task; checks it first and writes nothing.

        Raises :class:`~inceptionnext.checkpoint.CheckpointError` for a file that is unreadable, not a training
        checkpoint of this task, or of another model, and :class:`~inceptionnext.errors.ConfigError` when this
        launch changes a key that defines the run (see :meth:`_adopt_config`).
        """
        source = str(path)
        required = ("model", "optimizer", "scaler", "step", "best", "rng", *self.checkpoint_keys)
        ckpt = read_training_checkpoint(path, required, self.task)
        if not isinstance(ckpt["best"], Mapping) or self.best_key not in ckpt["best"]:
            raise CheckpointError(
                f"{source} is a training checkpoint of another task (its best model is not chosen by "
                f"{self.best_key}): it cannot resume a {self.task} run"
            )
        self._adopt_config(ckpt, source)
        self.load_task_state(ckpt, source)
        load_exact(self.model, ckpt["model"], source)
        if self.ema is not None and ckpt.get("ema") is not None:
            load_exact(self.ema.module, ckpt["ema"], f"{source} (EMA)")
        try:
            self.optimizer.load_state_dict(ckpt["optimizer"])
            if self.scheduler is not None and ckpt.get("scheduler"):
                self.scheduler.load_state_dict(ckpt["scheduler"])
            self.scaler.load_state_dict(ckpt["scaler"])
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            raise CheckpointError(f"{source}: its optimizer state does not fit this run ({e})") from e
        self.step, self.best = int(ckpt["step"]), dict(ckpt["best"])
        if "epoch" in ckpt:
            self.start_epoch = ckpt["epoch"] + 1
        per_rank = ckpt.get("rng_per_rank")
        restore_rng(per_rank[self.dist.rank] if per_rank and len(per_rank) == self.dist.world_size else ckpt["rng"])
        self.last_good = (Path(path), _position(ckpt.get("epoch"), self.step))
        return ckpt

    def changeable_keys(self) -> tuple[str, ...]:
        """The config keys a resume may change: :attr:`runtime_keys`, less any that this run's data makes matter."""
        return self.runtime_keys

    def _adopt_config(self, ckpt: Mapping[str, Any], source: str) -> None:
        """A resume continues the checkpoint's run: refuse a launch that changes what it computes.

        Every key but :attr:`runtime_keys` and :attr:`provenance_keys` (model, data, seed, lr, schedule, epochs,
        batch, augmentation, ...) and the number of processes must equal the checkpoint's, else
        :class:`~inceptionnext.errors.ConfigError` lists the changes. Silently keeping the checkpoint's values would
        record flags that did not run; taking the new ones would mix two runs in one. Keys a checkpoint lacks (an
        older version) are not compared. :attr:`cfg` then takes the checkpoint's provenance, so ``config.yaml``
        records the run that actually continues.
        """
        saved = ckpt.get("config")
        if not isinstance(saved, Mapping):
            return
        current = self.cfg.to_dict()
        free = set(self.changeable_keys()) | set(self.provenance_keys)
        changed = [
            f"{k} {saved[k]!r} -> {v!r}" for k, v in current.items() if k in saved and k not in free and saved[k] != v
        ]
        world = ckpt.get("world_size")
        if world is not None and world != self.dist.world_size:
            changed.append(f"processes (world size) {world} -> {self.dist.world_size}")
        if changed:
            raise ConfigError(
                f"{source} continues a run that this launch changes: {'; '.join(changed)}. A resumed run keeps its "
                f"config (only {', '.join(self.changeable_keys())} may change); to train with these values, "
                f"{self.new_run_advice.format(source=source)}"
            )
        if dataclasses.is_dataclass(self.cfg):
            kept = {k: saved[k] for k in self.provenance_keys if k in saved and k in current}
            self.cfg = dataclasses.replace(self.cfg, **kept)

    # ---------------------------------------------------------------------------------------------- reporting
    def log(self, msg: str) -> None:
        if self.main:
            tqdm.write(msg)
            with open(self.out / "log.txt", "a") as f:
                f.write(msg + "\n")

    def progress_bar(self, iterable: Iterable | None = None, **kwargs: Any) -> tqdm | PlainProgress:
        """A tqdm bar on a terminal; else a :class:`PlainProgress` (a line per ``set_postfix``, or silent)."""
        if self.progress:
            return tqdm(iterable, **kwargs)
        return PlainProgress(iterable, enabled=self.report_progress, **kwargs)

    def write_resolved_config(self, resumed_from: str | os.PathLike | None = None) -> None:
        """``config.yaml`` beside the outputs: the config that runs (a resume's is the checkpoint's), the code's git
        revision and this launch."""
        resolved = self.cfg.to_dict() | {"git": git_revision(), "world_size": self.dist.world_size}
        if resumed_from is not None:
            resolved["resumed_from"] = str(resumed_from)
        (self.out / "config.yaml").write_text(yaml.safe_dump(resolved | self.config_extras(), sort_keys=False))


def seed_everything(seed: int) -> None:
    """Seed torch's generators, numpy's and python's global RNGs."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def _is_terminal(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # replaced by an object without isatty, or closed
        return False


def _position(epoch: int | None, step: int) -> str:
    return f"epoch {epoch}" if epoch is not None else f"step {step}"


def _parse_fault_step(text: str) -> tuple[int, bool]:
    """``k`` or ``k:hang`` of :data:`FAULT_ENV` as (step, hang); (0, False) when unset."""
    step, _, action = text.partition(":")
    return (int(step), action == "hang") if step else (0, False)


def _parse_fault_save(text: str) -> tuple[str, int] | None:
    """``NAME`` or ``NAME:k`` of :data:`FAULT_SAVE_ENV` as (file name, k-th write); None when unset."""
    if not text:
        return None
    name, _, count = text.partition(":")
    return name, int(count or 1)


def _is_collective_failure(e: RuntimeError) -> bool:
    text = str(e).lower()
    return any(s in text for s in ("gloo", "nccl", "connection closed", "connection reset", "timed out"))


def launch(run_cls: type[TrainingRun], cfg: RunConfig, *, resume: str | os.PathLike | None = None) -> dict[str, Any]:
    """Run ``run_cls`` in this process (set up and torn down around it); under torchrun call it in every process."""
    dist = init_distributed()
    if dist.device.type == "cpu":  # the GPU's activations live in PyTorch's caching allocator already
        runtime.keep_freed_cpu_memory()
    try:
        return run_cls(cfg, dist, resume=resume).run()
    finally:
        cleanup_distributed()
