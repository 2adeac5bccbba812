"""Image classification on the engine core: the model, the data, the loss and the epoch loop, nothing else.

Launch with ``inceptionnext train`` (one process) or ``torchrun --nproc_per_node N -m inceptionnext train``.
Checkpoints, resume, DDP/AMP, the NaN policy, metrics and curves come from :class:`~.run.TrainingRun`.
"""

from __future__ import annotations

import inspect
import os
import re
import time
from typing import Any

import torch
import torch.nn.functional as F
from timm.data import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.utils import ModelEmaV3
from torch import nn
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler
from tqdm import tqdm

from ..data import (
    DataError,
    EpochIndices,
    ReadableBatches,
    SeededTransform,
    ShardStream,
    batch_erasing,
    build_dataset,
    build_transform,
    collate_readable,
    eval_preprocessing,
)
from ..errors import ConfigError
from ..layers.fused import use_fused_mixer
from ..models import get_entry, is_model
from ..models.factory import create_any_model
from ..models.metanext import MetaNeXt
from .config import TrainConfig
from .ema import RecalibrationBatches, batchnorm_layers, recalibrate_bn, recalibration_batch_count
from .optim import build_optimizer, build_scheduler
from .run import TrainingRun, launch
from .runtime import ShardSampler, autocast, loader_options

__all__ = ["ClassificationRun", "build_model", "evaluate", "evaluate_models", "train"]


@torch.inference_mode()
def evaluate_models(
    models: dict[str, nn.Module],
    loader: DataLoader,
    device: torch.device,
    amp_dtype: torch.dtype | None = None,
    desc: str = "val",
    progress: bool = True,
    channels_last: bool = False,
) -> dict[str, dict[str, float]]:
    """Top-1/top-5 accuracy (%) and mean cross-entropy of each model, summed exactly over all processes, in one pass
    over ``loader``: every batch is read and moved once, then given to each model (the raw and the EMA weights of a
    training run cost one read of the validation set, not two)."""
    for model in models.values():
        model.eval()
    sums = torch.zeros(len(models), 4, dtype=torch.float64, device=device)  # loss, correct1, correct5, count
    for x, y in tqdm(loader, desc=desc, leave=False, disable=not progress, unit="batch"):
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        for i, model in enumerate(models.values()):
            with autocast(device, amp_dtype):
                logits = model(x)
            logits = logits.float()
            top = logits.topk(min(5, logits.shape[1]), dim=1).indices
            sums[i] += torch.stack(
                [
                    F.cross_entropy(logits, y, reduction="sum").double(),
                    (top[:, 0] == y).sum().double(),
                    (top == y[:, None]).any(1).sum().double(),
                    torch.tensor(float(len(y)), dtype=torch.float64, device=device),
                ]
            )
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(sums)
    out = {}
    for name, (loss, c1, c5, n) in zip(models, sums.tolist()):
        if n == 0:
            raise DataError("the evaluation set is empty")
        out[name] = {"loss": loss / n, "top1": 100.0 * c1 / n, "top5": 100.0 * c5 / n, "count": int(n)}
    return out


def evaluate(
    model: nn.Module,
    loader: DataLoader,
    device: torch.device,
    amp_dtype: torch.dtype | None = None,
    desc: str = "val",
    progress: bool = True,
    channels_last: bool = False,
) -> dict[str, float]:
    """Top-1/top-5 accuracy (%) and mean cross-entropy, summed exactly over all processes."""
    return evaluate_models({"model": model}, loader, device, amp_dtype, desc, progress, channels_last)["model"]


# the model argument each config key sets
_MODEL_ARGS = {"drop_path_rate": "drop_path", "drop_rate": "drop", "ls_init_value": "ls_init_value"}


def _check_model_options(cfg: TrainConfig) -> None:
    """A recipe value applies only where the model defines the option: ``model_kwargs`` must be arguments of
    :class:`MetaNeXt`, and ``ls_init_value`` may set the init of a model's LayerScale but not add LayerScale to a
    model built without it (``convnext_small_iso``): that would silently train another model."""
    accepted = set(inspect.signature(MetaNeXt).parameters) | {"fused_mixer"}  # create_model's build option
    unknown = sorted(set(cfg.model_kwargs) - accepted)
    if unknown:
        raise ConfigError(f"model_kwargs {unknown}: not arguments of {cfg.model} (MetaNeXt takes {sorted(accepted)})")
    if cfg.ls_init_value is None:
        return
    arch = {**get_entry(cfg.model).arch_kwargs(), **cfg.model_kwargs}
    if not arch.get("ls_init_value", inspect.signature(MetaNeXt).parameters["ls_init_value"].default):
        raise ConfigError(
            f"ls_init_value: {cfg.model} has no LayerScale, and ls_init_value {cfg.ls_init_value:g} would add it "
            "and train another model; set ls_init_value: null (--ls-init-value none) to keep the model as defined"
        )


def build_model(cfg: TrainConfig, num_classes: int) -> nn.Module:
    """The model of ``cfg``; an option the model does not define is a :class:`ConfigError` naming the key."""
    kwargs: dict[str, Any] = dict(cfg.model_kwargs)
    kwargs.update(num_classes=num_classes, drop_path_rate=cfg.drop_path, drop_rate=cfg.drop)
    if cfg.ls_init_value is not None:
        kwargs["ls_init_value"] = cfg.ls_init_value
    if is_model(cfg.model):
        _check_model_options(cfg)
    try:
        model = create_any_model(
            cfg.model,
            pretrained=cfg.pretrained and not cfg.initial_checkpoint,
            checkpoint_path=cfg.initial_checkpoint,
            **kwargs,
        )
    except TypeError as e:  # a timm model without one of the arguments
        bad = re.search(r"unexpected keyword argument '(\w+)'", str(e))
        if bad is None or bad.group(1) not in kwargs:
            raise
        key = _MODEL_ARGS.get(bad.group(1), f"model_kwargs.{bad.group(1)}")
        raise ConfigError(f"{key}: the model {cfg.model} has no {bad.group(1)!r} argument; leave {key} unset") from e
    return use_fused_mixer(model, cfg.model) if cfg.fused_mixer else model


class ClassificationRun(TrainingRun):
    """One process of a classification training run, counted in epochs."""

    task = "classification"
    x_column = "epoch"
    curves = (
        ("loss", (("train_loss", "train loss (as optimised)"), ("val_loss", "val loss"))),
        ("val accuracy (%)", (("val_top1", "top-1"), ("ema_top1", "top-1 (EMA)"))),
    )
    best_key = "top1"
    checkpoint_keys = ("epoch", "class_names")
    nan_advice = "Lower the learning rate (--lr), set --clip-grad, or use --amp fp32/bf16 instead of fp16."
    runtime_keys = (
        *TrainingRun.runtime_keys,
        "compile",
        "channels_last",
        "grad_checkpointing",
        "fused_mixer",
        "fused_optimizer",
    )
    new_run_advice = "start a new run in another --output, with --initial-checkpoint {source} to start from its weights"

    def changeable_keys(self) -> tuple[str, ...]:
        keys = super().changeable_keys()
        if str(self.cfg.data or "").startswith("wds:"):  # a shard stream's sample order depends on the worker count
            keys = tuple(k for k in keys if k != "workers")
        return keys

    def initial_best(self) -> dict[str, Any]:
        return {"top1": -1.0, "epoch": -1, "which": "raw"}

    @property
    def num_epochs(self) -> int:
        return self.cfg.total_epochs()

    def build(self) -> None:
        cfg, dist = self.cfg, self.dist
        resuming = self.resume_from is not None or (self.out / "last.pth").exists()
        if cfg.finetune and not (cfg.initial_checkpoint or cfg.pretrained or resuming):
            name = f"recipe {cfg.recipe}" if cfg.recipe else "this config"
            raise ConfigError(
                f"{name} fine-tunes a trained model and no starting weights were given: pass --initial-checkpoint "
                f"FILE (the official fine-tune starts from the 224 model, e.g. inceptionnext_base.pth) or "
                f"--pretrained (the released weights of {cfg.model}); --no-finetune trains from scratch on purpose"
            )
        if dist.device.type == "cuda":
            # the paper's A100 runs: fp32 with TF32 matmuls and convolutions; off, strict fp32
            torch.backends.cuda.matmul.allow_tf32 = cfg.tf32
            torch.backends.cudnn.allow_tf32 = cfg.tf32
        skip_log = self.out / "skipped_images.txt"  # appended to only when an unreadable image is met
        train_base = build_dataset(cfg.data, "train", cfg.img_size, skip_log=skip_log)
        # an unreadable val image is left out, not replaced by the next one: no accuracy over duplicates
        val_base = build_dataset(cfg.data, "val", cfg.img_size, skip_log=skip_log, unreadable="skip")
        self.class_names = list(train_base.classes)
        if list(val_base.classes) != self.class_names:
            raise DataError(
                f"train and val class folders differ: {self.class_names[:5]}... vs {val_base.classes[:5]}..."
            )

        model = build_model(cfg, len(self.class_names))
        self.model_cfg = model.pretrained_cfg
        train_tf, val_tf = build_transform(cfg, self.model_cfg, True), build_transform(cfg, self.model_cfg, False)
        if isinstance(train_base, ShardStream):  # shards: the stream splits, orders and seeds itself (data/streams.py)
            self.train_set = train_base.configure(train_tf, cfg.seed, dist.rank, dist.world_size, cfg.batch_size)
            self.val_set = val_base.configure(val_tf, cfg.seed, dist.rank, dist.world_size, cfg.batch_size)
            self.sampler = val_sampler = None
        else:
            self.train_set = SeededTransform(train_base, train_tf, cfg.seed)
            self.val_set = SeededTransform(val_base, val_tf, cfg.seed)
            # (epoch, index) keys: the workers live across epochs and still seed every sample with its epoch
            self.sampler = EpochIndices(
                DistributedSampler(
                    self.train_set, dist.world_size, dist.rank, shuffle=True, seed=cfg.seed, drop_last=True
                )
            )
            val_sampler = ShardSampler(len(self.val_set), dist.rank, dist.world_size)
        loader_kw = loader_options(cfg.workers, dist.device, persistent=self.sampler is not None, seed=cfg.seed)
        self.train_loader = DataLoader(
            self.train_set, cfg.batch_size, sampler=self.sampler, drop_last=True, **loader_kw
        )
        self.val_loader = ReadableBatches(
            DataLoader(
                self.val_set,
                cfg.batch_size,
                sampler=val_sampler,
                collate_fn=collate_readable,
                **loader_kw,
            )
        )
        if len(self.train_loader) < cfg.grad_accum_steps:
            raise ConfigError(
                f"{len(self.train_set)} training images give {len(self.train_loader)} batches of {cfg.batch_size} per "
                f"process: fewer than grad_accum_steps={cfg.grad_accum_steps}; lower --batch-size"
            )
        self.updates_per_epoch = len(self.train_loader) // cfg.grad_accum_steps
        self._prefetched: tuple[int, Any] | None = None  # (epoch, its loader iterator) started ahead

        if cfg.grad_checkpointing:
            model.set_grad_checkpointing(True)
        if cfg.sync_bn and dist.distributed:
            if dist.device.type != "cuda":
                raise ConfigError("--sync-bn needs CUDA (SyncBatchNorm has no CPU implementation)")
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        model.to(dist.device)
        if cfg.channels_last:
            model.to(memory_format=torch.channels_last)
        self.ema = ModelEmaV3(model, decay=cfg.model_ema_decay) if cfg.model_ema else None

        self.lr = cfg.scaled_lr(dist.world_size)
        self.optimizer = build_optimizer(
            model,
            self.lr,
            opt=cfg.opt,
            weight_decay=cfg.weight_decay,
            eps=cfg.opt_eps,
            betas=cfg.opt_betas,
            fused=cfg.fused_optimizer,
        )
        self.scheduler = build_scheduler(
            self.optimizer,
            sched=cfg.sched,
            sched_on=cfg.sched_on,
            epochs=cfg.epochs,
            warmup_epochs=cfg.warmup_epochs,
            updates_per_epoch=self.updates_per_epoch,
            min_lr=cfg.min_lr,
            warmup_lr=cfg.warmup_lr,
        )
        self.clip_grad = cfg.clip_grad

        self.erasing = batch_erasing(cfg, dist.device)
        self.mixup = None
        if cfg.mixup > 0 or cfg.cutmix > 0:
            self.mixup = Mixup(
                mixup_alpha=cfg.mixup,
                cutmix_alpha=cfg.cutmix,
                switch_prob=cfg.mixup_switch_prob,
                label_smoothing=cfg.smoothing,
                num_classes=len(self.class_names),
            )
            self.criterion: nn.Module = SoftTargetCrossEntropy()
        elif cfg.smoothing > 0:
            self.criterion = LabelSmoothingCrossEntropy(cfg.smoothing)
        else:
            self.criterion = nn.CrossEntropyLoss()

        ddp = self.wrap(model)
        self.forward_model = torch.compile(ddp) if cfg.compile else ddp
        self.bn_recal = self._bn_recal_batches()

    def _bn_recal_batches(self) -> RecalibrationBatches | None:
        """The batches that recalibrate the EMA's BatchNorm statistics (:mod:`.ema`), or None: no EMA, no BatchNorm
        (nothing is built and no time spent) or ``ema_bn_recal`` 0."""
        cfg, dist = self.cfg, self.dist
        if self.ema is None or cfg.ema_bn_recal == 0 or not batchnorm_layers(self.ema.module):
            return None
        num_batches = recalibration_batch_count(cfg.ema_bn_recal, len(self.train_loader))
        if isinstance(self.train_set, ShardStream):
            return self.train_set.recalibration_batches(build_transform(cfg, self.model_cfg, False), num_batches)
        return RecalibrationBatches(
            self.train_set.dataset,  # the training images before their (random) training transform
            build_transform(cfg, self.model_cfg, False),
            num_batches=num_batches,
            batch_size=cfg.batch_size,
            seed=cfg.seed,
            rank=dist.rank,
            world_size=dist.world_size,
            workers=cfg.workers,
            pin_memory=dist.device.type == "cuda",
        )

    # ------------------------------------------------------------------------------------------------ state
    def task_state(self) -> dict[str, Any]:
        pre = eval_preprocessing(self.cfg, self.model_cfg)
        return super().task_state() | {
            "model_name": self.cfg.model,
            "eval_preprocessing": {k: list(v) if isinstance(v, tuple) else v for k, v in pre.items()},
        }

    def describe(self) -> str:
        cfg, world = self.cfg, self.dist.world_size
        return (
            f"{cfg.model}: {len(self.train_set)} train / {len(self.val_set)} val images, "
            f"{len(self.class_names)} classes; effective batch {cfg.effective_batch(world)} "
            f"({world} proc x {cfg.batch_size} x {cfg.grad_accum_steps} accum); lr {cfg.lr:g} for "
            f"batch {cfg.lr_base_batch} scaled to {self.lr:.4g}; device {self.dist.device}, "
            f"amp {self.amp_dtype or 'fp32'}{' (TF32 allowed)' if cfg.tf32 and self.dist.device.type == 'cuda' else ''}"
        )

    # ------------------------------------------------------------------------------------------------ loops
    def train_one_epoch(self, epoch: int) -> dict[str, float]:
        cfg, device = self.cfg, self.dist.device
        self.ddp.train()
        if self.scheduler is not None and cfg.sched_on == "epoch":
            self.scheduler.step(epoch)  # the lr of this epoch, as timm's train.py sets it (also right after a resume)
        if self.sampler is not None:
            self.sampler.set_epoch(epoch)
        self.train_set.set_epoch(epoch)
        accum = cfg.grad_accum_steps
        n_micro = self.updates_per_epoch * accum
        seen, t0 = 0, time.perf_counter()
        bar = self.progress_bar(
            total=self.updates_per_epoch, desc=f"epoch {epoch + 1}/{self.num_epochs}", unit="step", leave=False
        )
        prefetched, self._prefetched = self._prefetched, None
        data_iter = prefetched[1] if prefetched is not None and prefetched[0] == epoch else iter(self.train_loader)
        for micro in range(n_micro):
            x, y = next(data_iter)
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            if cfg.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            if self.mixup is not None:
                x, y = self.mixup(x, y)
            if self.erasing is not None:  # after Mixup/CutMix, as the official runs (data.transforms.batch_erasing)
                x = self.erasing(x)
            update = (micro + 1) % accum == 0
            with self.no_sync(update):
                with self.autocast():
                    loss = self.criterion(self.forward_model(x), y)
                self.backward(loss, accum)
            seen += len(x) * self.dist.world_size
            if not update:
                continue
            self.optimizer_step()
            bar.update(1)  # before the postfix: a log without a terminal writes the line then, at this step
            n_update = (micro + 1) // accum
            if n_update % cfg.log_interval == 0 or n_update == self.updates_per_epoch:
                self.check_finite()
                rate = seen / (time.perf_counter() - t0)
                bar.set_postfix(
                    loss=f"{self.running_loss.local_mean():.4f}", lr=f"{self.current_lr():.2e}", img_s=f"{rate:.0f}"
                )
        bar.close()
        self.check_finite()
        mean_loss = self.running_loss.mean()
        rate = seen / (time.perf_counter() - t0)
        self._prefetch_next_epoch(epoch)
        return {"train_loss": mean_loss, "lr": self.current_lr(), "img_per_s": rate}

    def _prefetch_next_epoch(self, epoch: int) -> None:
        """Start the loader workers on the next epoch's first batches now, so that they read and augment while this
        epoch is evaluated and saved instead of after it. Only where the samples cannot depend on when they are read:
        persistent workers and ``(epoch, index)`` keys (:class:`~inceptionnext.data.EpochIndices`), the order and
        every augmentation fixed by (seed, epoch, index). A run stopped or resumed here reads the same batches."""
        if self.sampler is None or self.cfg.workers == 0 or epoch + 1 >= self.num_epochs:
            return
        self.sampler.set_epoch(epoch + 1)
        self._prefetched = (epoch + 1, iter(self.train_loader))

    def evaluate(self, epoch: int) -> dict[str, float]:
        cfg, device = self.cfg, self.dist.device
        models = {"raw": self.ddp}
        if self.ema is not None:
            if self.bn_recal is not None:  # in place: the EMA saved (and chosen as best) holds these statistics
                batches = self.bn_recal(epoch, device, cfg.channels_last)
                recalibrate_bn(self.ema.module, batches, autocast=self.autocast)
            models["ema"] = self.ema.module
        desc = "val (raw + EMA)" if len(models) > 1 else "val"
        res = evaluate_models(models, self.val_loader, device, self.amp_dtype, desc, self.progress, cfg.channels_last)
        val = res["raw"]
        row = {"val_loss": val["loss"], "val_top1": val["top1"], "val_top5": val["top5"]}
        if "ema" in res:
            row.update(ema_top1=res["ema"]["top1"], ema_top5=res["ema"]["top5"])
        return row

    def best_record(self, row: dict[str, Any]) -> dict[str, Any]:
        """The better of the raw and the EMA weights (the EMA wins only when strictly better)."""
        top1, which = row["val_top1"], "raw"
        if "ema_top1" in row and row["ema_top1"] > top1:
            top1, which = row["ema_top1"], "ema"
        return {"top1": top1, "epoch": row["epoch"], "which": which}

    def epoch_message(self, row: dict[str, Any]) -> str:
        ema_txt = f", EMA top-1 {row['ema_top1']:.2f}" if "ema_top1" in row else ""
        return (
            f"epoch {row['epoch']}/{self.num_epochs}: train loss {row['train_loss']:.4f}, val loss "
            f"{row['val_loss']:.4f}, top-1 {row['val_top1']:.2f}, top-5 {row['val_top5']:.2f}{ema_txt}, "
            f"{row['img_per_s']:.0f} img/s, {row['epoch_time_s']:.1f}s"
        )

    def fit(self) -> dict[str, Any]:
        summary = super().fit()
        skipped = self.out / "skipped_images.txt"
        if self.main and skipped.exists():
            n = len(skipped.read_text().splitlines())
            self.log(f"{n} unreadable image reads were skipped (replaced by the next image); list: {skipped}")
        return summary


def train(cfg: TrainConfig, *, resume: str | os.PathLike | None = None) -> dict[str, Any]:
    """Run a classification training as described by ``cfg``; under torchrun, call it in every process.

    ``resume``: a training checkpoint to continue from (read and checked before anything is written, never copied);
    by default ``OUTPUT/last.pth`` is resumed when it exists. A file that cannot resume this run raises
    :class:`~inceptionnext.checkpoint.CheckpointError` and leaves the output folder untouched.
    """
    return launch(ClassificationRun, cfg, resume=resume)
