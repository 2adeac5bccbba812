"""The engine core: the life cycle of one training run, shared by every task.

A task (classification, segmentation, the next one) subclasses :class:`TrainingRun` and writes its model, data,
loss and metric loop only: :meth:`~TrainingRun.build`, then either :meth:`~TrainingRun.train_one_epoch` and
:meth:`~TrainingRun.evaluate` for a run counted in epochs, or its own :meth:`~TrainingRun.fit` for a run counted
in optimizer steps. Everything else is done here, the same way for all of them:

* device, DDP and mixed precision (:mod:`.runtime`): :meth:`~TrainingRun.wrap`, :meth:`~TrainingRun.autocast`,
  :meth:`~TrainingRun.no_sync`, :meth:`~TrainingRun.backward` (GradScaler only for fp16);
* :meth:`~TrainingRun.optimizer_step`: gradient clipping, the scaler, the step count, the EMA, the scheduler's
  per-step update and the fault hook (``INCEPTIONNEXT_FAULT_AT_STEP=k`` exits hard after step k, as a kill would:
  the resume tests use it);
* the NaN policy: :meth:`~TrainingRun.check_finite` stops with :class:`NonFiniteLossError` naming the last good
  checkpoint, and no checkpoint is written after a non-finite loss, so that one is never overwritten;
* atomic ``last.pth`` / ``best.pth`` holding everything needed to continue exactly (model, EMA, optimizer,
  scheduler, scaler, epoch/step, best, RNG states, config, git revision), and resume: from ``resume=PATH`` or else
  ``OUTPUT/last.pth``, read safely and checked against this run before anything in the output folder is written;
* ``metrics.csv`` (and TensorBoard) keyed on the task's :attr:`~TrainingRun.x_column`, ``curves.png`` from the
  task's :attr:`~TrainingRun.curves`, ``log.txt``, progress bars, the resolved ``config.yaml`` with the git revision,
  and ``summary.json``.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, ClassVar, Protocol

import numpy as np
import torch
import yaml
from torch import nn
from tqdm import tqdm

from ..checkpoint import CheckpointError
from . import runtime
from .checkpointing import atomic_save, capture_rng, load_exact, read_training_checkpoint, restore_rng
from .config import git_revision
from .report import MetricsLog, Panel, plot_curves
from .runtime import DistInfo, all_reduce_max, all_reduce_mean, cleanup_distributed, init_distributed, wrap_ddp

__all__ = ["FAULT_ENV", "NonFiniteLossError", "RunConfig", "RunningLoss", "TrainingRun", "launch"]

FAULT_ENV = "INCEPTIONNEXT_FAULT_AT_STEP"  # test hook: hard-exit (like SIGKILL) after this optimizer step


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; training stopped without overwriting the last good checkpoint."""


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

    def __init__(self, cfg: RunConfig, dist: DistInfo, *, resume: str | os.PathLike | None = None) -> None:
        self.cfg, self.dist = cfg, dist
        self.out = Path(cfg.output)
        self.main = dist.is_main
        self.progress = self.main and os.environ.get("INCEPTIONNEXT_NO_PROGRESS") is None
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
        self.step = 0  # optimizer steps done
        self.epoch: int | None = None  # the epoch under way (0-based) in an epoch-counted run
        self.start_epoch = 0
        self.best: dict[str, Any] = self.initial_best()
        self.running_loss = RunningLoss(dist.device)
        self.metrics: MetricsLog | None = None
        self.last_good: tuple[Path, str] | None = None  # (checkpoint, position) that a NaN stop points the user to
        self._nonfinite = torch.zeros((), dtype=torch.bool, device=dist.device)
        self._fault_step = int(os.environ.get(FAULT_ENV, "0"))

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
        """Entries the task adds to its checkpoints (class names, preprocessing, ...)."""
        return {}

    def load_task_state(self, ckpt: Mapping[str, Any], source: str) -> None:
        """Check (and restore) the task's own entries of a checkpoint being resumed; raise CheckpointError."""

    def config_extras(self) -> dict[str, Any]:
        """Values of this launch written to ``config.yaml`` after the config (effective batch, scaled lr, ...)."""
        return {}

    def describe(self) -> str | None:
        """A line of ``log.txt`` describing this launch (data, batch, learning rate, device)."""
        return None

    def epoch_message(self, row: dict[str, Any]) -> str:
        values = ", ".join(f"{k} {v:.4g}" for k, v in row.items() if k != "epoch" and isinstance(v, float))
        return f"epoch {row['epoch']}/{self.cfg.epochs}: {values}"

    # ---------------------------------------------------------------------------------------------- life cycle
    def run(self) -> dict[str, Any]:
        """Build, resume if there is something to resume, train, and write the run's summary."""
        torch.manual_seed(self.cfg.seed)
        np.random.seed(self.cfg.seed)
        self.build()
        if self.model is None or self.optimizer is None:
            raise RuntimeError(f"{type(self).__name__}.build() must register a model (self.wrap) and an optimizer")
        source = self.resume_from
        if source is None and (self.out / "last.pth").exists():
            source = self.out / "last.pth"
        ckpt = self.resume(source) if source is not None else None
        # nothing in the output folder is written before this point
        self.out.mkdir(parents=True, exist_ok=True)
        self.metrics = MetricsLog(self.out, enabled=self.main, x=self.x_column)
        if ckpt is not None:
            self.metrics.truncate_after(ckpt["epoch"] + 1 if self.x_column == "epoch" else ckpt["step"])
            done = f"{_position(ckpt.get('epoch'), self.step)} done"
            if "epoch" in ckpt:
                done += f", step {self.step}"
            self.log(f"resumed from {source} ({done})")
        if self.main:
            self.write_resolved_config()
            line = self.describe()
            if line:
                self.log(line)
        summary = self.fit()
        self.finish(summary)
        return summary

    def fit(self) -> dict[str, Any]:
        """The epoch loop: train, evaluate, record (metrics, best, checkpoint) and log, from the resumed epoch."""
        epochs = self.cfg.epochs
        row: dict[str, Any] = {}
        for epoch in self.progress_bar(
            range(self.start_epoch, epochs), desc="training", unit="epoch", initial=self.start_epoch, total=epochs
        ):
            self.epoch = epoch
            t0 = time.perf_counter()
            self.running_loss.reset()
            stats = self.train_one_epoch(epoch)
            self.check_finite()
            row = {"epoch": epoch + 1, **stats, **self.evaluate(epoch)}
            row["epoch_time_s"] = time.perf_counter() - t0
            self.record(row)
            self.log(self.epoch_message(row))
        return {"best": self.best, "last": row, "output": str(self.out)}

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
        calls: a DistributedDataParallel of it under torchrun, else the model itself (also :attr:`ddp`)."""
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
            os._exit(137)  # simulate a hard kill mid-run, no clean-up

    def current_lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def check_finite(self) -> None:
        """Stop (on every process) if any process has seen a non-finite loss since the run started."""
        if all_reduce_max(self._nonfinite.float()).item() == 0:
            return
        if self.epoch is not None:
            where = f"in epoch {self.epoch + 1} (around optimizer step {self.step})"
        else:
            where = f"by optimizer step {self.step}"
        kept = "no checkpoint had been written yet"
        if self.last_good is not None:
            kept = f"the last good checkpoint is {self.last_good[0]} ({self.last_good[1]})"
        raise NonFiniteLossError(f"the loss became NaN/inf {where}; training stopped and {kept}. {self.nan_advice}")

    # ---------------------------------------------------------------------------------------------- checkpoints
    def record(self, row: dict[str, Any]) -> bool:
        """After an evaluation: update :attr:`best`, append ``row`` to the metrics and save; True if it is the best."""
        self.check_finite()
        candidate = self.best_record(row)
        is_best = candidate[self.best_key] > self.best[self.best_key]
        if is_best:
            self.best = candidate
        self.metrics.append(row)
        self._write(is_best)
        return is_best

    def save(self, is_best: bool = False) -> None:
        """Atomically write ``last.pth`` (and ``best.pth``); refuses after a non-finite loss. Call on every rank."""
        self.check_finite()
        self._write(is_best)

    def _write(self, is_best: bool) -> None:
        if self.main:
            state = self.checkpoint_state()
            atomic_save(state, self.out / "last.pth")
            if is_best:
                atomic_save(state, self.out / "best.pth")
        self.last_good = (self.out / "last.pth", _position(self.epoch, self.step))

    def checkpoint_state(self) -> dict[str, Any]:
        state: dict[str, Any] = {
            "model": self.model.state_dict(),
            "ema": self.ema.module.state_dict() if self.ema is not None else None,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "scaler": self.scaler.state_dict(),
        }
        if self.epoch is not None:
            state["epoch"] = self.epoch
        state.update(step=self.step, best=dict(self.best), rng=capture_rng(), config=self.cfg.to_dict())
        state.update(self.task_state())
        state["git"] = git_revision()
        return state

    def resume(self, path: str | os.PathLike) -> dict[str, Any]:
        """Restore every state from a training checkpoint of this task; checks it first and writes nothing.

        Raises :class:`~inceptionnext.checkpoint.CheckpointError` for a file that is unreadable, not a training
        checkpoint of this task, or of another model.
        """
        source = str(path)
        required = ("model", "optimizer", "scaler", "step", "best", "rng", *self.checkpoint_keys)
        ckpt = read_training_checkpoint(path, required, self.task)
        if not isinstance(ckpt["best"], Mapping) or self.best_key not in ckpt["best"]:
            raise CheckpointError(
                f"{source} is a training checkpoint of another task (its best model is not chosen by "
                f"{self.best_key}): it cannot resume a {self.task} run"
            )
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
        restore_rng(ckpt["rng"])
        self.last_good = (Path(path), _position(ckpt.get("epoch"), self.step))
        return ckpt

    # ---------------------------------------------------------------------------------------------- reporting
    def log(self, msg: str) -> None:
        if self.main:
            tqdm.write(msg)
            with open(self.out / "log.txt", "a") as f:
                f.write(msg + "\n")

    def progress_bar(self, iterable: Iterable | None = None, **kwargs: Any) -> tqdm:
        return tqdm(iterable, disable=not self.progress, **kwargs)

    def write_resolved_config(self) -> None:
        """``config.yaml`` beside the outputs: the resolved config, the code's git revision and this launch."""
        resolved = self.cfg.to_dict() | {"git": git_revision(), "world_size": self.dist.world_size}
        (self.out / "config.yaml").write_text(yaml.safe_dump(resolved | self.config_extras(), sort_keys=False))


def _position(epoch: int | None, step: int) -> str:
    return f"epoch {epoch}" if epoch is not None else f"step {step}"


def launch(run_cls: type[TrainingRun], cfg: RunConfig, *, resume: str | os.PathLike | None = None) -> dict[str, Any]:
    """Run ``run_cls`` in this process (set up and torn down around it); under torchrun call it in every process."""
    dist = init_distributed()
    try:
        return run_cls(cfg, dist, resume=resume).run()
    finally:
        cleanup_distributed()
