"""The training engine: one process of a (possibly distributed) run, from config to checkpoints.

Launch with ``inceptionnext train`` (one process) or ``torchrun --nproc_per_node N -m inceptionnext train``.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from timm.data import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from timm.scheduler import CosineLRScheduler
from timm.utils import ModelEmaV3
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Sampler
from torch.utils.data.distributed import DistributedSampler
from tqdm import tqdm

from ..checkpoint import load_state_dict_checked
from ..data import SeededTransform, build_dataset, build_transform, eval_preprocessing
from ..models import is_model
from ..models.factory import create_any_model
from .checkpointing import atomic_save, capture_rng, restore_rng
from .config import TrainConfig, git_revision
from .distributed import DistInfo, all_reduce_mean, cleanup_distributed, init_distributed
from .report import MetricsLog, plot_curves

__all__ = [
    "NonFiniteLossError",
    "ShardSampler",
    "autocast_settings",
    "build_model",
    "build_optimizer",
    "evaluate",
    "train",
]

FAULT_ENV = "INCEPTIONNEXT_FAULT_AT_STEP"  # test hook: hard-exit (like SIGKILL) after this optimizer step


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; training stopped without overwriting the last good checkpoint."""


def autocast_settings(device: torch.device, amp: str) -> tuple[torch.dtype | None, bool]:
    """(autocast dtype or None for fp32, whether a GradScaler is needed). CPU always runs fp32."""
    if device.type != "cuda" or amp == "fp32":
        return None, False
    if amp == "fp16":
        return torch.float16, True
    if amp == "bf16" or torch.cuda.is_bf16_supported():
        return torch.bfloat16, False
    return torch.float16, True


def _autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


class ShardSampler(Sampler[int]):
    """Evaluation sharding without padding: rank r takes indices r, r + world, ... (every sample counted once)."""

    def __init__(self, n: int, rank: int, world: int) -> None:
        self.indices = list(range(rank, n, world))

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


@torch.inference_mode()
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
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss, correct1, correct5, count
    for x, y in tqdm(loader, desc=desc, leave=False, disable=not progress, unit="batch"):
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with _autocast(device, amp_dtype):
            logits = model(x)
        logits = logits.float()
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        sums += torch.stack(
            [
                F.cross_entropy(logits, y, reduction="sum").double(),
                (top[:, 0] == y).sum().double(),
                (top == y[:, None]).any(1).sum().double(),
                torch.tensor(float(len(y)), dtype=torch.float64, device=device),
            ]
        )
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(sums)
    loss, c1, c5, n = sums.tolist()
    if n == 0:
        raise ValueError("the evaluation set is empty")
    return {"loss": loss / n, "top1": 100.0 * c1 / n, "top5": 100.0 * c5 / n, "count": int(n)}


def build_model(cfg: TrainConfig, num_classes: int) -> nn.Module:
    kwargs: dict[str, Any] = dict(cfg.model_kwargs)
    kwargs.update(num_classes=num_classes, drop_path_rate=cfg.drop_path, drop_rate=cfg.drop)
    if cfg.ls_init_value is not None and is_model(cfg.model):  # timm peers have no LayerScale argument
        kwargs["ls_init_value"] = cfg.ls_init_value
    return create_any_model(
        cfg.model,
        pretrained=cfg.pretrained and not cfg.initial_checkpoint,
        checkpoint_path=cfg.initial_checkpoint,
        **kwargs,
    )


def build_optimizer(
    model: nn.Module, lr: float, *, opt: str = "adamw", weight_decay: float = 0.05, eps: float = 1e-8,
    betas: tuple[float, float] = (0.9, 0.999),
) -> torch.optim.Optimizer:  # fmt: skip
    """AdamW (or another timm optimizer) with weight decay on weights only: 1-D parameters (norms, biases) and
    the model's ``no_weight_decay()`` names (LayerScale) go to a group without decay."""
    return create_optimizer_v2(model, opt=opt, lr=lr, weight_decay=weight_decay, eps=eps, betas=tuple(betas))


class RunBase:
    """What every training run shares: its config, process info, output directory and rank-0 logging."""

    def __init__(self, cfg: Any, dist: DistInfo) -> None:
        self.cfg, self.dist = cfg, dist
        self.out = Path(cfg.output)
        self.main = dist.is_main
        self.progress = self.main and os.environ.get("INCEPTIONNEXT_NO_PROGRESS") is None

    def log(self, msg: str) -> None:
        if self.main:
            tqdm.write(msg)
            with open(self.out / "log.txt", "a") as f:
                f.write(msg + "\n")

    def write_resolved_config(self) -> None:
        """``config.yaml`` beside the outputs: the resolved config, the code's git revision and this launch."""
        resolved = self.cfg.to_dict() | {
            "git": git_revision(),
            "world_size": self.dist.world_size,
            "effective_batch": self.cfg.effective_batch(self.dist.world_size),
            "scaled_lr": self.lr,
            "num_classes": len(self.class_names),
        }
        (self.out / "config.yaml").write_text(yaml.safe_dump(resolved, sort_keys=False))


class _Run(RunBase):
    """State of one process of a classification training run."""

    # ------------------------------------------------------------------------------------------------ set-up
    def setup(self) -> None:
        cfg, dist = self.cfg, self.dist
        self.out.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(cfg.seed)
        np.random.seed(cfg.seed)

        skip_log = self.out / "skipped_images.txt"
        train_base = build_dataset(cfg.data, "train", cfg.img_size, skip_log=skip_log)
        val_base = build_dataset(cfg.data, "val", cfg.img_size, skip_log=skip_log)
        self.class_names = list(train_base.classes)
        if list(val_base.classes) != self.class_names:
            raise ValueError(
                f"train and val class folders differ: {self.class_names[:5]}... vs {val_base.classes[:5]}..."
            )

        model = build_model(cfg, len(self.class_names))
        self.model_cfg = model.pretrained_cfg
        self.train_set = SeededTransform(train_base, build_transform(cfg, self.model_cfg, True), cfg.seed)
        self.val_set = SeededTransform(val_base, build_transform(cfg, self.model_cfg, False), cfg.seed)
        self.sampler = DistributedSampler(
            self.train_set, num_replicas=dist.world_size, rank=dist.rank, shuffle=True, seed=cfg.seed, drop_last=True
        )
        loader_kw = dict(num_workers=cfg.workers, pin_memory=dist.device.type == "cuda")
        self.train_loader = DataLoader(
            self.train_set, cfg.batch_size, sampler=self.sampler, drop_last=True, **loader_kw
        )
        self.val_loader = DataLoader(
            self.val_set,
            cfg.batch_size,
            sampler=ShardSampler(len(self.val_set), dist.rank, dist.world_size),
            **loader_kw,
        )
        if len(self.train_loader) < cfg.grad_accum_steps:
            raise ValueError(
                f"{len(self.train_set)} training images give {len(self.train_loader)} batches of {cfg.batch_size} per "
                f"process: fewer than grad_accum_steps={cfg.grad_accum_steps}; lower --batch-size"
            )
        self.updates_per_epoch = len(self.train_loader) // cfg.grad_accum_steps

        if cfg.grad_checkpointing:
            model.set_grad_checkpointing(True)
        if cfg.sync_bn and dist.distributed:
            if dist.device.type != "cuda":
                raise ValueError("--sync-bn needs CUDA (SyncBatchNorm has no CPU implementation)")
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        model.to(dist.device)
        if cfg.channels_last:
            model.to(memory_format=torch.channels_last)
        self.model = model
        self.ema = ModelEmaV3(model, decay=cfg.model_ema_decay) if cfg.model_ema else None

        self.lr = cfg.scaled_lr(dist.world_size)
        self.optimizer = build_optimizer(
            model, self.lr, opt=cfg.opt, weight_decay=cfg.weight_decay, eps=cfg.opt_eps, betas=cfg.opt_betas
        )
        total = cfg.epochs * self.updates_per_epoch
        self.scheduler = None
        if cfg.sched == "cosine":
            self.scheduler = CosineLRScheduler(
                self.optimizer,
                t_initial=total,
                lr_min=cfg.min_lr,
                warmup_t=round(cfg.warmup_epochs * self.updates_per_epoch),
                warmup_lr_init=cfg.warmup_lr,
                warmup_prefix=True,
                t_in_epochs=False,
            )
        self.amp_dtype, use_scaler = autocast_settings(dist.device, cfg.amp)
        self.scaler = torch.amp.GradScaler("cuda", enabled=use_scaler)

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

        self.ddp = model
        if dist.distributed:
            self.ddp = DistributedDataParallel(
                model, device_ids=[dist.local_rank] if dist.device.type == "cuda" else None
            )
        self.forward_model = torch.compile(self.ddp) if cfg.compile else self.ddp
        self.start_epoch, self.step, self.best = 0, 0, {"top1": -1.0, "epoch": -1, "which": "raw"}
        self.metrics = MetricsLog(self.out, enabled=self.main)

    # ------------------------------------------------------------------------------------------------ state
    def state(self, epoch: int) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "ema": self.ema.module.state_dict() if self.ema else None,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler else None,
            "scaler": self.scaler.state_dict(),
            "epoch": epoch,
            "step": self.step,
            "best": dict(self.best),
            "rng": capture_rng(),
            "config": self.cfg.to_dict(),
            "model_name": self.cfg.model,
            "class_names": self.class_names,
            "eval_preprocessing": {k: list(v) if isinstance(v, tuple) else v for k, v in self.eval_pre().items()},
            "git": git_revision(),
        }

    def eval_pre(self) -> dict[str, Any]:
        return eval_preprocessing(self.cfg, self.model_cfg)

    def save(self, epoch: int, is_best: bool) -> None:
        if not self.main:
            return
        state = self.state(epoch)
        atomic_save(state, self.out / "last.pth")
        if is_best:
            atomic_save(state, self.out / "best.pth")

    def resume(self, path: Path) -> None:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        load_state_dict_checked(self.model, ckpt["model"], source=str(path))
        if self.ema is not None and ckpt.get("ema") is not None:
            self.ema.module.load_state_dict(ckpt["ema"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        if self.scheduler is not None and ckpt.get("scheduler"):
            self.scheduler.load_state_dict(ckpt["scheduler"])
        self.scaler.load_state_dict(ckpt["scaler"])
        self.start_epoch, self.step, self.best = ckpt["epoch"] + 1, ckpt["step"], ckpt["best"]
        restore_rng(ckpt["rng"])
        self.metrics.truncate_after(ckpt["epoch"] + 1)  # CSV epochs are 1-based
        self.log(f"resumed from {path} (epoch {ckpt['epoch']} done, step {self.step})")

    # ------------------------------------------------------------------------------------------------ loops
    def train_one_epoch(self, epoch: int) -> dict[str, float]:
        cfg, device = self.cfg, self.dist.device
        self.ddp.train()
        self.sampler.set_epoch(epoch)
        self.train_set.set_epoch(epoch)
        accum = cfg.grad_accum_steps
        n_micro = self.updates_per_epoch * accum
        loss_sum = torch.zeros((), device=device)
        nonfinite = torch.zeros((), dtype=torch.bool, device=device)
        seen, t0 = 0, time.perf_counter()
        fault_step = int(os.environ.get(FAULT_ENV, "0"))
        bar = tqdm(
            total=self.updates_per_epoch,
            desc=f"epoch {epoch + 1}/{cfg.epochs}",
            unit="step",
            leave=False,
            disable=not self.progress,
        )
        data_iter = iter(self.train_loader)
        for micro in range(n_micro):
            x, y = next(data_iter)
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            if cfg.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            if self.mixup is not None:
                x, y = self.mixup(x, y)
            update = (micro + 1) % accum == 0
            sync = contextlib.nullcontext() if update or not self.dist.distributed else self.ddp.no_sync()
            with sync:
                with _autocast(device, self.amp_dtype):
                    loss = self.criterion(self.forward_model(x), y)
                self.scaler.scale(loss / accum).backward()
            loss_sum += loss.detach().float()
            nonfinite |= ~torch.isfinite(loss.detach())
            seen += len(x) * self.dist.world_size
            if not update:
                continue
            if cfg.clip_grad is not None:
                self.scaler.unscale_(self.optimizer)
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.clip_grad)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.optimizer.zero_grad(set_to_none=True)
            self.step += 1
            if self.ema is not None:
                self.ema.update(self.model, step=self.step)
            if self.scheduler is not None:
                self.scheduler.step_update(self.step)
            if fault_step and self.step == fault_step:
                os._exit(137)  # simulate a hard kill mid-epoch, no clean-up
            n_update = (micro + 1) // accum
            if n_update % cfg.log_interval == 0 or n_update == self.updates_per_epoch:
                self._check_finite(nonfinite, epoch)
                rate = seen / (time.perf_counter() - t0)
                bar.set_postfix(
                    loss=f"{loss_sum.item() / (micro + 1):.4f}", lr=f"{self._lr():.2e}", img_s=f"{rate:.0f}"
                )
            bar.update(1)
        bar.close()
        self._check_finite(nonfinite, epoch)
        mean_loss = all_reduce_mean(loss_sum / n_micro).item()
        return {"train_loss": mean_loss, "lr": self._lr(), "img_per_s": seen / (time.perf_counter() - t0)}

    def _lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def _check_finite(self, nonfinite: torch.Tensor, epoch: int) -> None:
        flag = nonfinite.clone().float()
        if torch.distributed.is_initialized():
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        if flag.item() > 0:
            last = self.out / "last.pth"
            kept = (
                f"the last good checkpoint is {last} (epoch {self.start_epoch_done})"
                if last.exists()
                else ("no checkpoint had been written yet")
            )
            raise NonFiniteLossError(
                f"the loss became NaN/inf in epoch {epoch + 1} (around optimizer step {self.step}); training stopped "
                f"and {kept}. Lower the learning rate (--lr), set --clip-grad, or use --amp fp32/bf16 instead of fp16."
            )

    # ------------------------------------------------------------------------------------------------ fit
    def fit(self) -> dict[str, Any]:
        cfg = self.cfg
        last = self.out / "last.pth"
        if last.exists():
            self.resume(last)
        self.start_epoch_done = self.start_epoch - 1
        if self.main:
            self.write_resolved_config()
            self.log(
                f"{cfg.model}: {len(self.train_set)} train / {len(self.val_set)} val images, "
                f"{len(self.class_names)} classes; effective batch {cfg.effective_batch(self.dist.world_size)} "
                f"({self.dist.world_size} proc x {cfg.batch_size} x {cfg.grad_accum_steps} accum); lr {cfg.lr:g} for "
                f"batch {cfg.lr_base_batch} scaled to {self.lr:.4g}; device {self.dist.device}, "
                f"amp {self.amp_dtype or 'fp32'}"
            )
        result: dict[str, Any] = {}
        epochs = range(self.start_epoch, cfg.epochs)
        for epoch in tqdm(
            epochs, desc="training", unit="epoch", disable=not self.progress, initial=self.start_epoch, total=cfg.epochs
        ):
            t0 = time.perf_counter()
            stats = self.train_one_epoch(epoch)
            val = evaluate(
                self.ddp, self.val_loader, self.dist.device, self.amp_dtype, "val", self.progress, cfg.channels_last
            )
            row: dict[str, Any] = {
                "epoch": epoch + 1,
                **stats,
                "val_loss": val["loss"],
                "val_top1": val["top1"],
                "val_top5": val["top5"],
            }
            top1, which = val["top1"], "raw"
            if self.ema is not None:
                ema_val = evaluate(
                    self.ema.module,
                    self.val_loader,
                    self.dist.device,
                    self.amp_dtype,
                    "val (EMA)",
                    self.progress,
                    cfg.channels_last,
                )
                row.update(ema_top1=ema_val["top1"], ema_top5=ema_val["top5"])
                if ema_val["top1"] > top1:
                    top1, which = ema_val["top1"], "ema"
            row["epoch_time_s"] = time.perf_counter() - t0
            is_best = top1 > self.best["top1"]
            if is_best:
                self.best = {"top1": top1, "epoch": epoch + 1, "which": which}
            self.metrics.append(row)
            self.save(epoch, is_best)
            self.start_epoch_done = epoch
            ema_txt = f", EMA top-1 {row['ema_top1']:.2f}" if "ema_top1" in row else ""
            self.log(
                f"epoch {epoch + 1}/{cfg.epochs}: train loss {stats['train_loss']:.4f}, val loss {val['loss']:.4f}, "
                f"top-1 {val['top1']:.2f}, top-5 {val['top5']:.2f}{ema_txt}, {stats['img_per_s']:.0f} img/s, "
                f"{row['epoch_time_s']:.1f}s"
            )
            result = row
        skipped = self.out / "skipped_images.txt"
        if self.main and skipped.exists():
            n = len(skipped.read_text().splitlines())
            self.log(f"{n} unreadable image reads were skipped (replaced by the next image); list: {skipped}")
        if self.main and (self.out / "metrics.csv").exists():
            png = plot_curves(self.out / "metrics.csv", self.out / "curves.png")
            if png:
                self.log(f"curves: {png}")
        self.metrics.close()
        summary = {"best": self.best, "last": result, "output": str(self.out)}
        if self.main:
            (self.out / "summary.json").write_text(json.dumps(summary, indent=1))
        return summary


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Run (or resume) training as described by ``cfg``; in a torchrun launch, call it in every process."""
    dist = init_distributed()
    try:
        run = _Run(cfg, dist)
        run.setup()
        return run.fit()
    finally:
        cleanup_distributed()
