"""Segmentation training and evaluation, with the classification engine's conventions (torchrun, AMP, atomic
checkpoints with exact resume, progress bars, CSV logs).

Training is counted in optimizer steps (iterations), as in the ADE20K recipes. Data order comes from a
``DistributedSampler`` per pass over the training set and per-sample seeds from (seed, pass, index), so a run
resumed from a checkpoint at step k continues with exactly the batches it would have seen.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler
from tqdm import tqdm

from ..checkpoint import load_state_dict_checked, read_checkpoint
from ..engine.checkpointing import atomic_save, capture_rng, restore_rng
from ..engine.config import git_revision
from ..engine.distributed import all_reduce_mean, cleanup_distributed, init_distributed
from ..engine.report import MetricsLog
from ..engine.trainer import (
    FAULT_ENV,
    NonFiniteLossError,
    RunBase,
    ShardSampler,
    _autocast,
    autocast_settings,
    build_optimizer,
)
from .config import SegConfig
from .data import IGNORE_INDEX, EvalPipeline, TrainPipeline, build_seg_dataset
from .metrics import ConfusionMatrix
from .segmentor import Segmentor, create_segmentor

__all__ = ["train_segmentation", "evaluate_segmentation", "infer_logits", "build_segmentor", "poly_lr"]


def poly_lr(step: int, cfg: SegConfig, base_lr: float) -> float:
    """Poly decay to ``min_lr`` over all steps, multiplied during warm-up by a factor rising linearly from
    ``warmup_ratio`` to 1 (the ADE20K schedule)."""
    lr = (base_lr - cfg.min_lr) * (1 - step / cfg.iterations) ** cfg.poly_power + cfg.min_lr
    if step < cfg.warmup_iters:
        lr *= 1 - (1 - step / cfg.warmup_iters) * (1 - cfg.warmup_ratio)
    return lr


def build_segmentor(cfg: SegConfig, num_classes: int) -> Segmentor:
    return create_segmentor(
        cfg.head,
        cfg.backbone,
        num_classes,
        drop_path_rate=cfg.drop_path,
        stage_norm=cfg.stage_norm,
        head_channels=cfg.head_channels,
        pretrained=cfg.pretrained and not cfg.backbone_checkpoint,
        backbone_checkpoint=cfg.backbone_checkpoint,
    )


def _seg_loss(model: nn.Module, outputs: dict[str, torch.Tensor], target: torch.Tensor) -> torch.Tensor:
    def ce(logits: torch.Tensor) -> torch.Tensor:
        logits = F.interpolate(logits, size=target.shape[-2:], mode="bilinear", align_corners=False)
        return F.cross_entropy(logits.float(), target, ignore_index=IGNORE_INDEX)

    loss = ce(outputs["out"])
    if "aux" in outputs:
        loss = loss + getattr(model, "aux_weight", 0.4) * ce(outputs["aux"])
    return loss


@torch.inference_mode()
def infer_logits(
    model: Segmentor,
    img: torch.Tensor,
    out_size: tuple[int, int],
    *,
    mode: str = "whole",
    crop: tuple[int, int] = (512, 512),
    stride: tuple[int, int] = (341, 341),
) -> torch.Tensor:
    """Class probabilities (1, C, *out_size) for one normalised image (1, 3, H, W): whole image or sliding window."""
    if mode == "whole":
        logits = model.predict(img)
    else:
        _, _, h, w = img.shape
        ch, cw = min(crop[0], h), min(crop[1], w)
        rows = max(math.ceil((h - ch) / stride[0]), 0) + 1
        cols = max(math.ceil((w - cw) / stride[1]), 0) + 1
        logits = None
        count = torch.zeros(1, 1, h, w, device=img.device)
        for r in range(rows):
            for c in range(cols):
                y0 = min(r * stride[0], h - ch)
                x0 = min(c * stride[1], w - cw)
                part = model.predict(img[:, :, y0 : y0 + ch, x0 : x0 + cw])
                if logits is None:
                    logits = img.new_zeros(1, part.shape[1], h, w)
                logits[:, :, y0 : y0 + ch, x0 : x0 + cw] += part
                count[:, :, y0 : y0 + ch, x0 : x0 + cw] += 1
        logits = logits / count
    return F.interpolate(logits, size=out_size, mode="bilinear", align_corners=False).softmax(1)


@torch.inference_mode()
def evaluate_segmentation(
    model: Segmentor,
    dataset,
    device: torch.device,
    *,
    mode: str = "whole",
    crop=(512, 512),
    stride=(341, 341),
    aug_test: bool = False,
    ratios=(0.5, 0.75, 1.0, 1.25, 1.5, 1.75),
    amp_dtype=None,
    progress: bool = True,
) -> dict[str, Any]:
    """mIoU / mAcc / aAcc over ``dataset`` (its EvalPipeline leaves masks at full resolution), summed exactly
    over processes. ``aug_test`` averages the class probabilities over scales and horizontal flips."""
    model.eval()
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    cm = ConfusionMatrix(model.num_classes, IGNORE_INDEX, device)
    loader = DataLoader(
        dataset,
        batch_size=1,
        sampler=ShardSampler(len(dataset), rank, world),
        num_workers=0,
        generator=torch.Generator(),
    )  # leaves the global RNG alone
    for img, mask in tqdm(loader, desc="eval", leave=False, disable=not progress, unit="img"):
        img, mask = img.to(device), mask.to(device)
        size = tuple(mask.shape[-2:])
        scales = ratios if aug_test else (1.0,)
        probs = 0
        with _autocast(device, amp_dtype):
            for s in scales:
                x = img if s == 1.0 else F.interpolate(img, scale_factor=s, mode="bilinear", align_corners=False)
                for flip in (False, True) if aug_test else (False,):
                    xi = x.flip(-1) if flip else x
                    p = infer_logits(model, xi, size, mode=mode, crop=crop, stride=stride).float()
                    probs = probs + (p.flip(-1) if flip else p)
        cm.update(probs.argmax(1), mask)
    cm.all_reduce()
    return cm.compute()


class _SegRun(RunBase):
    """State of one process of a segmentation training run."""

    def setup(self) -> None:
        cfg, dist = self.cfg, self.dist
        self.out.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(cfg.seed)
        train_pipe = TrainPipeline(
            scale=tuple(cfg.scale),
            ratio_range=tuple(cfg.ratio_range),
            crop_size=tuple(cfg.crop_size),
            cat_max_ratio=cfg.cat_max_ratio,
            photometric=cfg.photometric,
        )
        self.train_set = build_seg_dataset(cfg.data, "train", train_pipe, seed=cfg.seed)
        self.val_set = build_seg_dataset(cfg.data, "val", EvalPipeline(scale=tuple(cfg.scale)), seed=cfg.seed)
        self.class_names = list(self.train_set.classes)
        model = build_segmentor(cfg, len(self.class_names)).to(dist.device)
        if dist.distributed and dist.device.type == "cuda":
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)  # the ADE20K recipes train with SyncBN
        self.model = model
        self.lr = cfg.scaled_lr(dist.world_size)
        self.optimizer = build_optimizer(model, self.lr, weight_decay=cfg.weight_decay, betas=cfg.betas)
        self.amp_dtype, use_scaler = autocast_settings(dist.device, cfg.amp)
        self.scaler = torch.amp.GradScaler("cuda", enabled=use_scaler)
        self.ddp = model
        if dist.distributed:
            self.ddp = DistributedDataParallel(
                model, device_ids=[dist.local_rank] if dist.device.type == "cuda" else None
            )
        self.sampler = DistributedSampler(
            self.train_set, num_replicas=dist.world_size, rank=dist.rank, shuffle=True, seed=cfg.seed, drop_last=True
        )
        self.steps_per_pass = len(self.sampler) // cfg.batch_size
        if self.steps_per_pass < 1:
            raise ValueError(f"{len(self.train_set)} training images are fewer than one batch of {cfg.batch_size}")
        self.step, self.best = 0, {"mIoU": -1.0, "step": 0}
        self.metrics = MetricsLog(self.out, enabled=self.main)

    def _loader(self, pass_index: int, skip_batches: int) -> DataLoader:
        self.sampler.set_epoch(pass_index)
        self.train_set.set_epoch(pass_index)
        indices = list(self.sampler)[skip_batches * self.cfg.batch_size :]
        # its own generator: creating the loader must not draw from the global RNG, or a run resumed mid-pass
        # would see different drop-path masks than the uninterrupted one
        generator = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + pass_index)
        return DataLoader(
            self.train_set,
            self.cfg.batch_size,
            sampler=indices,
            drop_last=True,
            num_workers=self.cfg.workers,
            pin_memory=self.dist.device.type == "cuda",
            generator=generator,
        )

    def state(self) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "step": self.step,
            "best": dict(self.best),
            "rng": capture_rng(),
            "config": self.cfg.to_dict(),
            "class_names": self.class_names,
            "git": git_revision(),
        }

    def save(self, is_best: bool) -> None:
        if self.main:
            state = self.state()
            atomic_save(state, self.out / "last.pth")
            if is_best:
                atomic_save(state, self.out / "best.pth")

    def resume(self, path: Path) -> None:
        ckpt = read_checkpoint(path)
        load_state_dict_checked(self.model, ckpt["model"], source=str(path))
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scaler.load_state_dict(ckpt["scaler"])
        self.step, self.best = ckpt["step"], ckpt["best"]
        restore_rng(ckpt["rng"])
        self.metrics.truncate_after(self.step, column="step")
        self.log(f"resumed from {path} at step {self.step}")

    def evaluate(self) -> dict[str, Any]:
        cfg = self.cfg
        return evaluate_segmentation(
            self.model,
            self.val_set,
            self.dist.device,
            mode=cfg.eval_mode,
            crop=tuple(cfg.slide_crop),
            stride=tuple(cfg.slide_stride),
            aug_test=cfg.aug_test,
            amp_dtype=self.amp_dtype,
            progress=self.progress,
        )

    def fit(self) -> dict[str, Any]:
        cfg = self.cfg
        if (self.out / "last.pth").exists():
            self.resume(self.out / "last.pth")
        if self.main:
            self.write_resolved_config()
            self.log(
                f"{cfg.head} + {cfg.backbone}: {len(self.train_set)} train / {len(self.val_set)} val images, "
                f"{len(self.class_names)} classes; batch {cfg.effective_batch(self.dist.world_size)}, "
                f"lr {cfg.lr:g} for batch {cfg.lr_base_batch} scaled to {self.lr:.3g}; {self.dist.device}"
            )
        bar = tqdm(
            total=cfg.iterations, initial=self.step, desc="segment train", unit="step", disable=not self.progress
        )
        loss_sum = torch.zeros((), device=self.dist.device)
        n_loss, t0, seen = 0, time.perf_counter(), 0
        last_eval: dict[str, Any] = {}
        fault_step = int(os.environ.get(FAULT_ENV, "0"))
        while self.step < cfg.iterations:
            pass_index, offset = divmod(self.step, self.steps_per_pass)
            for img, mask in self._loader(pass_index, offset):
                if self.step >= cfg.iterations:
                    break
                self.ddp.train()
                for g in self.optimizer.param_groups:
                    g["lr"] = poly_lr(self.step, cfg, self.lr)
                img = img.to(self.dist.device, non_blocking=True)
                mask = mask.to(self.dist.device, non_blocking=True)
                with _autocast(self.dist.device, self.amp_dtype):
                    loss = _seg_loss(self.model, self.ddp(img), mask)
                self.scaler.scale(loss).backward()
                self.scaler.step(self.optimizer)
                self.scaler.update()
                self.optimizer.zero_grad(set_to_none=True)
                self.step += 1
                if fault_step and self.step == fault_step:
                    os._exit(137)  # test hook: a hard kill mid-run, no clean-up
                loss_sum += loss.detach().float()
                n_loss += 1
                seen += len(img) * self.dist.world_size
                bar.update(1)
                if self.step % cfg.log_interval == 0 or self.step % cfg.eval_interval == 0:
                    mean = all_reduce_mean(loss_sum / max(n_loss, 1)).item()
                    if not math.isfinite(mean):
                        raise NonFiniteLossError(
                            f"the loss became NaN/inf before step {self.step}; training stopped and the last good "
                            f"checkpoint ({self.out / 'last.pth'}) was kept. Lower --lr or use --amp fp32/bf16."
                        )
                    bar.set_postfix(
                        loss=f"{mean:.4f}",
                        lr=f"{self.optimizer.param_groups[0]['lr']:.2e}",
                        img_s=f"{seen / (time.perf_counter() - t0):.1f}",
                    )
                if self.step % cfg.eval_interval == 0 or self.step == cfg.iterations:
                    train_loss = all_reduce_mean(loss_sum / max(n_loss, 1)).item()
                    res = self.evaluate()
                    is_best = res["mIoU"] > self.best["mIoU"]
                    if is_best:
                        self.best = {"mIoU": res["mIoU"], "step": self.step}
                    row = {
                        "epoch": self.step // cfg.eval_interval + (self.step % cfg.eval_interval > 0),
                        "step": self.step,
                        "train_loss": train_loss,
                        "lr": self.optimizer.param_groups[0]["lr"],
                        "mIoU": res["mIoU"],
                        "mAcc": res["mAcc"],
                        "aAcc": res["aAcc"],
                        "img_per_s": seen / (time.perf_counter() - t0),
                    }
                    self.metrics.append(row)
                    self.save(is_best)
                    self.log(
                        f"step {self.step}/{cfg.iterations}: train loss {train_loss:.4f}, mIoU {res['mIoU']:.2f}, "
                        f"mAcc {res['mAcc']:.2f}, aAcc {res['aAcc']:.2f}"
                    )
                    last_eval = res
                    loss_sum.zero_()
                    n_loss = 0
        bar.close()
        self.metrics.close()
        if self.main and (self.out / "metrics.csv").exists():
            _plot(self.out / "metrics.csv", self.out / "curves.png")
        summary = {
            "best": self.best,
            "last": {k: v for k, v in last_eval.items() if k not in ("IoU", "Acc")},
            "per_class_IoU": dict(zip(self.class_names, last_eval.get("IoU", []))),
            "output": str(self.out),
        }
        if self.main:
            (self.out / "summary.json").write_text(json.dumps(summary, indent=1))
        return summary


def _plot(csv_path: Path, png: Path) -> None:
    import csv

    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    rows = list(csv.DictReader(csv_path.read_text().splitlines()))
    steps = [int(r["step"]) for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.5), dpi=120)
    a.plot(steps, [float(r["train_loss"]) for r in rows])
    a.set_xlabel("step")
    a.set_ylabel("train loss")
    a.grid(alpha=0.3)
    for key in ("mIoU", "mAcc", "aAcc"):
        b.plot(steps, [float(r[key]) for r in rows], label=key)
    b.set_xlabel("step")
    b.set_ylabel("%")
    b.legend()
    b.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png)
    plt.close(fig)


def train_segmentation(cfg: SegConfig) -> dict[str, Any]:
    """Run (or resume) a segmentation training run; under torchrun call it in every process."""
    dist = init_distributed()
    try:
        run = _SegRun(cfg, dist)
        run.setup()
        return run.fit()
    finally:
        cleanup_distributed()
